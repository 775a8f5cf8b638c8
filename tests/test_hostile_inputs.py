"""Hostile and careless inputs: each gets a one-line error (exit 2 from the CLI), runs no
code it was not asked to run, and loses nothing. A growing catalogue: add the case with
the fix."""

from __future__ import annotations

import os

import pytest
import torch

from kdgraph.errors import KDGraphError, SpecError
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.spec import load_spec

from _runtime_helpers import run_cli, tiny_spec, write_spec


class _Payload:
    """Unpickling this calls os.system: a file that would run a shell command if loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path, marker):
    """A file shaped like a kdgraph checkpoint with a code payload among its values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "rng": _Payload(marker),
                "position": {"epoch": 0, "step": 0, "global_step": 0}, "plan": {}}, path)
    return path


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    text = " ".join(proc.stderr.split())
    for fragment in fragments:
        assert fragment in text, (fragment, proc.stderr[-2000:])


@pytest.mark.parametrize("entry", ["train --resume", "eval --checkpoint", "export --checkpoint"])
def test_checkpoint_with_code_payload_is_refused_unexecuted(tmp_path, entry):
    out = tmp_path / "run"
    spec = write_spec(tiny_spec(out, "kd+mse"), tmp_path / "spec.yaml")
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(out / "checkpoints" / "last.pt", marker)
    if entry == "train --resume":
        proc = run_cli("train", str(spec), "--resume", "--quiet")
    elif entry == "eval --checkpoint":
        proc = run_cli("eval", str(spec), "--checkpoint", str(evil))
    else:
        proc = run_cli("export", str(spec), "--checkpoint", str(evil), "--to", str(tmp_path / "s.safetensors"))
    _one_line_error(proc, "refusing to load", str(evil), "posix.system")
    assert not marker.exists()
    assert evil.exists()  # the file is left for the user to inspect


def test_teacher_checkpoint_with_code_payload_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "teacher.pt"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    spec = write_spec(tiny_spec(tmp_path / "run", "kd", teacher_checkpoint=evil), tmp_path / "spec.yaml")
    proc = run_cli("plan", str(spec))
    _one_line_error(proc, "cannot read checkpoint", str(evil))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None], ids=["empty", "garbage", "truncated"])
def test_unreadable_checkpoints_give_one_clear_error(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is None:  # a real checkpoint cut in half
        torch.save({"model": {"w": torch.randn(64, 64)}, "optimizer": {}, "scheduler": {}, "rng": {},
                    "position": {}, "plan": {}}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(KDGraphError, match=r"cannot read checkpoint .*last\.pt"):
        ckpt.load(path)


def test_a_state_dict_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(KDGraphError, match="not a kdgraph training checkpoint: it needs keys model, optimizer"):
        ckpt.load(path)


def test_set_cannot_introduce_code_without_allow_code(tmp_path):
    raw = tiny_spec(tmp_path / "run", "kd")
    with pytest.raises(SpecError, match=r"module:os:system.*--allow-code"):
        load_spec(raw, ["student.model=module:os:system"])
    with pytest.raises(SpecError, match="--allow-code"):  # nested inside a mapping value too
        load_spec(raw, ["teacher={model: 'module:os:system', kwargs: {}}"])
    # references already in the spec, and other overrides, are untouched
    assert load_spec(raw, ["schedule.epochs=2"]).schedule.epochs == 2
    swapped = "module:kdgraph.zoo:resnet_tiny_student_same"
    assert load_spec(raw, [f"student.model={swapped}"], allow_code=True).student.model == swapped


def test_cli_refuses_code_from_set_and_accepts_it_with_allow_code(tmp_path):
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    swap = "student.model=module:kdgraph.zoo:resnet_tiny_student_same"
    _one_line_error(run_cli("plan", str(spec), "--set", swap), "--allow-code")
    ok = run_cli("plan", str(spec), "--set", swap, "--allow-code", "--format", "json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert '"resnet_tiny_student_same"' in ok.stdout or "resnet_tiny_student_same" in ok.stdout


# --- the output folder: locked, never reused by surprise -----------------------------------

def _tiny_run(tmp_path, name="run", **kw):
    spec = tiny_spec(tmp_path / name, "kd", epochs=1, fraction=0.1, **kw)
    return write_spec(spec, tmp_path / f"{name}.yaml"), tmp_path / name


def _snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    from kdgraph.runtime.runs import RunLock

    spec, out = _tiny_run(tmp_path)
    out.mkdir()
    with RunLock(out):  # this (live) process holds it
        proc = run_cli("train", str(spec), "--quiet")
    _one_line_error(proc, "is in use by another kdgraph run", f"pid {os.getpid()}")
    assert not (out / "metrics.jsonl").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    spec, out = _tiny_run(tmp_path)
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".kdgraph.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    proc = run_cli("train", str(spec), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "summary.json").exists() and not (out / ".kdgraph.lock").exists()


def test_earlier_runs_need_resume_or_force_and_resume_checks_the_spec(tmp_path):
    spec, out = _tiny_run(tmp_path)
    first = run_cli("train", str(spec), "--quiet", "--set", "optim.lr=0.05")
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    # again without --resume or --force: refused, nothing touched
    _one_line_error(run_cli("train", str(spec), "--quiet"), "already holds a run", "--resume", "--force")
    # --resume alone reuses the stored --set; the run is finished, so nothing changes
    again = run_cli("train", str(spec), "--quiet", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stdout and "nothing was changed" in again.stdout
    # a conflicting --set or another seed: refused, naming the keys, before writing anything
    _one_line_error(run_cli("train", str(spec), "--quiet", "--resume", "--set", "seed=1"),
                    "trained with another spec", "seed: 0 -> 1")
    _one_line_error(run_cli("train", str(spec), "--quiet", "--resume", "--set", "optim.lr=0.1"),
                    "optim.lr: 0.05 -> 0.1")
    assert _snapshot(out) == before
    # --force starts over
    forced = run_cli("train", str(spec), "--quiet", "--force", "--set", "optim.lr=0.02")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert '"lr": 0.02' in (out / "run.json").read_text()


@pytest.mark.parametrize("where", ["file", "below-file"])
def test_output_that_is_a_file_is_refused_before_building(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "run"
    spec = write_spec(tiny_spec(out, "kd", epochs=1), tmp_path / "spec.yaml")
    _one_line_error(run_cli("train", str(spec), "--quiet"), f"output {out}", "file")
    assert blocker.read_text() == "not a folder"


def test_sigint_exits_130_and_prints_the_resume_command(tmp_path):
    import signal
    import time

    from _runtime_helpers import popen_cli

    spec = write_spec(tiny_spec(tmp_path / "run", "kd", epochs=50, runtime={"log_every": 1}), tmp_path / "s.yaml")
    proc = popen_cli("train", str(spec), "--quiet")
    t0 = time.time()
    while not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() - t0 < 240, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "kdgraph train SPEC --resume" in " ".join(err.split()) and "error:" not in err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
