"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and resumed with --resume ends
with the same student as the run that was never interrupted.

Independent truth: run A, uninterrupted, in its own process. Run B is the same spec in
another output folder, interrupted and resumed in fresh processes; its exported student and
its per-step losses must equal A's.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from _runtime_helpers import popen_cli, run_cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow

EPOCHS = 3


def _spec(tmp_path, name, **data):
    spec = tiny_spec(tmp_path / name, "stablekd", recompositions=1, epochs=EPOCHS,
                     runtime={"checkpoint_every": 3, "log_every": 1}, data=data)
    return write_spec(spec, tmp_path / f"{name}.yaml")


def _steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in recs if r["kind"] == "step"]


def _wait_for_step(proc, out, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = _steps(out)
        if done and done[-1]["global_step"] >= step:
            return done[-1]["global_step"]
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the run")


def _losses(out):
    keep = ("stage", "epoch", "step", "global_step", "lr", "loss", "mse1", "mse2", "mse3", "ce", "kl")
    return [{k: r[k] for k in keep if k in r} for r in _steps(out)]


def _assert_same_student(a, b):
    ta, tb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_a")
    spec = _spec(tmp, "a")
    proc = popen_cli("train", str(spec), "--quiet")
    return proc, tmp / "a"


def _finish(proc_out):
    proc, out = proc_out
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out


def test_sigkill_then_resume_is_exact(run_a, tmp_path):
    spec = _spec(tmp_path, "b")
    out_b = tmp_path / "b"
    proc = popen_cli("train", str(spec), "--quiet")  # runs alongside run A
    _wait_for_step(proc, out_b, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    pos = torch.load(out_b / "checkpoints" / "last.pt", weights_only=False)["position"]
    steps_per_epoch = max(r["step"] for r in _steps(out_b) if r["epoch"] == 0)
    assert 0 < pos["global_step"] < EPOCHS * steps_per_epoch  # mid-run
    assert pos["global_step"] % 3 == 0 or pos["step"] == 0
    res = run_cli("train", str(spec), "--quiet", "--resume")
    assert res.returncode == 0, res.stderr
    out_a = _finish(run_a)
    _assert_same_student(out_a, out_b)
    la, lb = _losses(out_a), _losses(out_b)
    assert len(la) == len(lb) == EPOCHS * steps_per_epoch
    assert la == lb  # the resumed run replays the lost steps with the same data, lr and losses
    assert json.loads((out_b / "summary.json").read_text())["student_top1"] == \
        json.loads((out_a / "summary.json").read_text())["student_top1"]


def test_sigterm_saves_and_resumes(run_a, tmp_path):
    spec = _spec(tmp_path, "c")
    out_c = tmp_path / "c"
    proc = popen_cli("train", str(spec), "--quiet")
    _wait_for_step(proc, out_c, 10)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    text = stdout + stderr
    assert "--resume" in text and "Traceback" not in text
    state = torch.load(out_c / "checkpoints" / "last.pt", weights_only=False)
    pos = state["position"]
    last = _steps(out_c)[-1]
    # the checkpoint is at the step the signal stopped: the last logged step, mid-run
    assert pos["global_step"] == last["global_step"] and pos["step"] == last["step"] > 0
    assert not (out_c / "student.safetensors").exists()
    res = run_cli("train", str(spec), "--quiet", "--resume")
    assert res.returncode == 0, res.stderr
    _assert_same_student(_finish(run_a), out_c)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    spec = _spec(tmp_path, "d")
    res = run_cli("train", str(spec), "--quiet", "--resume")
    assert res.returncode == 2
    assert "checkpoint" in res.stderr and "Traceback" not in res.stderr + res.stdout
    assert str(tmp_path / "d") in res.stderr.replace("\n", "")


def test_validation_split_resumes_exactly_and_guards_its_fraction(tmp_path):
    """A run with a validation split, killed and resumed, ends as the uninterrupted one (student,
    losses, validation and test scores); resuming it with another val_fraction is refused."""
    spec_a, spec_b = _spec(tmp_path, "va", val_fraction=0.2), _spec(tmp_path, "vb", val_fraction=0.2)
    run = popen_cli("train", str(spec_a), "--quiet")
    proc = popen_cli("train", str(spec_b), "--quiet")
    _wait_for_step(proc, tmp_path / "vb", 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = write_spec(tiny_spec(tmp_path / "vb", "stablekd", recompositions=1, epochs=EPOCHS,
                                 runtime={"checkpoint_every": 3, "log_every": 1}, data={"val_fraction": 0.3}),
                       tmp_path / "vb-other.yaml")  # the same run folder, another validation split
    refused = run_cli("train", str(other), "--quiet", "--resume")
    assert refused.returncode == 2 and "val_fraction" in refused.stderr, refused.stderr
    res = run_cli("train", str(spec_b), "--quiet", "--resume")
    assert res.returncode == 0, res.stderr
    out_a = _finish((run, tmp_path / "va"))
    _assert_same_student(out_a, tmp_path / "vb")
    assert _losses(out_a) == _losses(tmp_path / "vb")
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("va", "vb"))
    assert sa["eval_split"] == sb["eval_split"] == "val"
    assert {k: sa[k] for k in ("student_top1", "student_val_top1", "best_top1", "best_epoch")} == \
        {k: sb[k] for k in ("student_top1", "student_val_top1", "best_top1", "best_epoch")}
