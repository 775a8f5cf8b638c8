"""Hostile and careless inputs: each gets a one-line error (exit 2 from the CLI), runs no
code it was not asked to run, and loses nothing. A growing catalogue: add the case with
the fix."""

from __future__ import annotations

import json
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
    if entry == "train --resume":  # a run folder handed over: kdgraph's record beside the payload
        (out / "run.json").write_text(json.dumps({"spec": load_spec(str(spec)).to_dict()}))
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



def _binary(text: str) -> str:
    import base64

    return "!!binary " + base64.b64encode(text.encode()).decode()


def _code_overrides(marker) -> list[list[str]]:
    """Overrides that would make the student ``os.system("touch MARKER")`` if they got through:
    a YAML !!binary value (bytes, which pydantic would coerce to the reference), a merge key, an
    anchor, a plain string, and a python tag."""
    kwargs = f"student.kwargs={{command: 'touch {marker}'}}"
    return [
        [f"student.model={_binary('module:os:system')}", kwargs],
        [f"student={{<<: {{model: 'module:os:system'}}, kwargs: {{command: 'touch {marker}'}}}}"],
        [f"student={{model: &m 'module:os:system', kwargs: {{command: 'touch {marker}'}}}}"],
        ["student.model=module:os:system", kwargs],
        ["student.model=!!python/name:os.system", kwargs],
    ]


@pytest.mark.parametrize("case", range(5))
def test_set_cannot_introduce_code_in_any_yaml_form(tmp_path, case):
    from typer.testing import CliRunner

    from cli.main import app

    marker = tmp_path / "PWNED"
    overrides = _code_overrides(marker)[case]
    raw = tiny_spec(tmp_path / "run", "kd")
    with pytest.raises(SpecError) as info:
        load_spec(raw, overrides)
    assert "student" in str(info.value)
    spec = write_spec(raw, tmp_path / "spec.yaml")
    for command in ("plan", "train", "eval", "export"):
        args = [command, str(spec), *[a for o in overrides for a in ("--set", o)]]
        args += ["--to", str(tmp_path / "out")] if command == "export" else []
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (command, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        assert "student" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_binary_is_refused_even_with_allow_code(tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(SpecError, match="!!binary value is not accepted"):
        load_spec(tiny_spec(tmp_path / "run", "kd"), _code_overrides(marker)[0], allow_code=True)
    text = "name: x\nstudent:\n  model: " + _binary("timm:resnet18") + "\n"
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"spec.yaml, at student.model: a !!binary value"):
        load_spec(tmp_path / "spec.yaml")
    assert not marker.exists()


def test_stored_overrides_on_resume_pass_the_same_guard(tmp_path):
    """A run folder whose stored --set overrides name code: --resume replays them through the guard."""
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from kdgraph.runtime.runs import RunFolder

    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    spec = write_spec(tiny_spec(out, "kd"), tmp_path / "spec.yaml")
    out.mkdir()
    RunFolder(out).stored_spec.write_text(json.dumps({"spec": {}, "overrides": _code_overrides(marker)[0]}))
    res = CliRunner().invoke(app, ["train", str(spec), "--resume", "--quiet"])
    assert res.exit_code == 2, res.output
    assert "!!binary" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not marker.exists()

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


@pytest.mark.parametrize("content", ["", "{not json", '{"pid": "abc", "host": "h"}', '{"pid": 1e30}',
                                     '{"pid": 100000000000000000000000000000}', '{"pid": -5}', "[1, 2]"])
def test_a_corrupt_lock_is_one_line_and_left_alone(tmp_path, content):
    spec, out = _tiny_run(tmp_path)
    out.mkdir()
    (out / ".kdgraph.lock").write_text(content)
    proc = run_cli("train", str(spec), "--quiet")
    _one_line_error(proc, f"{out / '.kdgraph.lock'} is not a kdgraph run lock", "delete it if no kdgraph run")
    assert (out / ".kdgraph.lock").read_text() == content
    assert sorted(p.name for p in out.iterdir()) == [".kdgraph.lock"]

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
    # --force starts over, deleting only what the run wrote
    (out / "checkpoints" / "my-notes.txt").write_text("mine")
    forced = run_cli("train", str(spec), "--quiet", "--force", "--set", "optim.lr=0.02")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert '"lr": 0.02' in (out / "run.json").read_text()
    assert (out / "checkpoints" / "my-notes.txt").read_text() == "mine"


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    """Another run's last.pt copied into an unfinished run (same plan and seed, other lr and
    kl_weight) was adopted: the checkpoint carries its spec, compared whole on --resume."""
    import shutil

    spec_a, out_a = _tiny_run(tmp_path, "a")
    first = run_cli("train", str(spec_a), "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    raw = tiny_spec(tmp_path / "b", "kd", epochs=1, fraction=0.1, optim={"lr": 0.02}, loss={"kl_weight": 0.5})
    spec_b = write_spec(raw, tmp_path / "b.yaml")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text(json.dumps({"spec": load_spec(raw).to_dict(), "overrides": []}))
    shutil.copytree(out_a / "checkpoints", tmp_path / "b" / "checkpoints")
    before = _snapshot(tmp_path / "b" / "checkpoints")
    proc = run_cli("train", str(spec_b), "--quiet", "--resume")
    _one_line_error(proc, "was written by a run with another spec", "optim.lr: 0.1 -> 0.02",
                    "loss.kl_weight: 1.0 -> 0.5")
    assert _snapshot(tmp_path / "b" / "checkpoints") == before
    assert not (tmp_path / "b" / "summary.json").exists()

@pytest.mark.parametrize("output", ["", "/", ".", "./", "~", "cwd"])
def test_output_that_is_a_root_home_or_the_working_directory_is_refused(tmp_path, output):
    from pathlib import Path

    output = {"~": str(Path.home()), "cwd": os.getcwd()}.get(output, output)
    with pytest.raises(SpecError) as info:
        load_spec(tiny_spec(output, "kd"))
    assert info.value.path == "output" and "a folder of the run's own" in info.value.message
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    proc = run_cli("train", str(spec), "--quiet", "--set", f"output='{output}'")
    _one_line_error(proc, "output:", "a folder of the run's own")
    assert not (tmp_path / "run").exists()


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
    # the real spec path, and epochs counted from 1 as the progress lines count them
    assert f"kdgraph train {spec} --resume" in " ".join(err.split()) and "error:" not in err
    assert "stopped at epoch 1," in err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_full_disk_while_checkpointing_keeps_last_pt_and_says_how_to_resume(tmp_path, monkeypatch):
    import errno

    from kdgraph.runtime import checkpoint
    from kdgraph.runtime.loop import train

    spec = load_spec(tiny_spec(tmp_path / "run", "kd", epochs=2, fraction=0.1))
    calls = {"n": 0}
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the first checkpoint is written; the disk fills before the second
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KDGraphError) as info:
            train(spec, source={"spec_file": "/specs/mine.yaml", "overrides": []})
    finally:
        torch.set_num_threads(threads)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    message = str(info.value)
    assert "No space left on device" in message and f"{last} from before is intact" in message
    assert "kdgraph train /specs/mine.yaml --resume" in message and "\n" not in message
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert ckpt.load(last)["position"]["epoch"] == 1  # the first epoch's checkpoint, whole
    assert not list(last.parent.glob(".*.tmp"))


# --- checkpoints: checksummed, the previous one kept ---------------------------------------

def _checkpoint_state(weights):
    return {"model": {"w": weights, "half": torch.ones(3, dtype=torch.bfloat16)}, "optimizer": {}, "scheduler": {},
            "rng": ckpt.rng_state(), "position": {"epoch": 1, "step": 0, "global_step": 4}, "plan": {"k": 4}}


def _flip_tensor_bytes(path, weights, count=2000, seed=0):
    """Flip ``count`` bytes inside the stored data of ``weights`` (not the zip/pickle frame, whose
    damage torch.load would notice anyway): only the checksum can tell."""
    import random

    raw = bytearray(path.read_bytes())
    start = raw.find(weights.numpy().tobytes()[:64])
    assert start > 0
    for i in random.Random(seed).sample(range(start, start + weights.numel() * weights.element_size()), count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_checkpoint_are_refused_not_trained_on(tmp_path):
    weights = torch.randn(128, 128)
    path = ckpt.save_atomic(_checkpoint_state(weights), tmp_path / "last.pt")
    assert "sha256" in torch.load(path, weights_only=True)  # still a weights_only file
    assert torch.equal(ckpt.load(path)["model"]["w"], weights)
    _flip_tensor_bytes(path, weights)
    damaged = path.read_bytes()
    with pytest.raises(KDGraphError, match=r"checkpoint .*last\.pt is corrupt: its content does not match"):
        ckpt.load(path)
    assert path.read_bytes() == damaged  # left for inspection


def test_writing_last_keeps_the_previous_checkpoint_and_load_latest_falls_back(tmp_path):
    weights = torch.randn(64, 64)
    first = _checkpoint_state(weights)
    path = ckpt.save_atomic(first, tmp_path / "last.pt", keep_previous=True)
    assert not (tmp_path / "prev.pt").exists()
    second = _checkpoint_state(weights + 1)
    second["position"]["epoch"] = 2
    ckpt.save_atomic(second, path, keep_previous=True)
    assert ckpt.load(tmp_path / "prev.pt")["position"]["epoch"] == 1
    state, warning = ckpt.load_latest(path)
    assert warning is None and state["position"]["epoch"] == 2
    _flip_tensor_bytes(path, weights + 1)
    state, warning = ckpt.load_latest(path)
    assert state["position"]["epoch"] == 1 and torch.equal(state["model"]["w"], weights)
    assert "last.pt is corrupt" in warning and "prev.pt" in warning
    (tmp_path / "prev.pt").write_bytes(b"")  # neither is good: one error naming both
    with pytest.raises(KDGraphError, match=r"last\.pt is corrupt.*previous checkpoint is no good either.*prev\.pt"):
        ckpt.load_latest(path)


class _Interrupted(BaseException):
    """What a SIGTERM or Ctrl-C raises in the middle of a save: not an Exception."""


@pytest.mark.parametrize("keep_previous", [False, True], ids=["alone", "keep_previous"])
@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_an_interrupted_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch, where,
                                                                              keep_previous):
    """Atomicity itself, at the exact points: a save stopped half-way through writing its bytes,
    or after writing them and before the rename, leaves ``last.pt`` byte for byte the old,
    loadable checkpoint and no temporary file beside it; the file the rename would have put in
    place was whole, synced and in the same folder (a rename across file systems is a copy)."""
    import io
    from pathlib import Path

    folder = tmp_path / "checkpoints"
    weights = torch.randn(64, 64)
    path = ckpt.save_atomic(_checkpoint_state(weights), folder / "last.pt", keep_previous=keep_previous)
    old = path.read_bytes()
    new = _checkpoint_state(weights + 1)
    new["position"]["epoch"] = 2
    events = []
    if where == "writing":
        real_save = torch.save

        def torn_save(obj, f, *args, **kwargs):  # half the bytes reach the file, then the signal
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(half)
                f.flush()
            else:
                Path(f).write_bytes(half)
            raise _Interrupted

        monkeypatch.setattr(torch, "save", torn_save)
    else:
        real_replace, real_fsync = os.replace, os.fsync

        def fsync(fd):
            events.append("fsync")
            return real_fsync(fd)

        def interrupted_replace(src, dst, *args, **kwargs):
            if Path(dst) != path:  # prev.pt's staging
                return real_replace(src, dst, *args, **kwargs)
            events.append("rename")
            assert Path(src).parent == path.parent, src
            assert ckpt.load(Path(src))["position"]["epoch"] == 2  # whole before it is put in place
            raise _Interrupted

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(_Interrupted):
        ckpt.save_atomic(new, path, keep_previous=keep_previous)
    monkeypatch.undo()
    if where == "renaming":
        assert events == ["fsync", "rename"]
    assert path.read_bytes() == old
    state = ckpt.load(path)
    assert state["position"]["epoch"] == 1 and torch.equal(state["model"]["w"], weights)
    kept = {"last.pt", "prev.pt"} if keep_previous and where == "renaming" else {"last.pt"}
    assert {p.name for p in folder.iterdir()} == kept  # no .last.pt.*.tmp, no .prev.pt.tmp
    if "prev.pt" in kept:
        assert ckpt.load(folder / "prev.pt")["position"]["epoch"] == 1
    state, warning = ckpt.load_latest(path)
    assert warning is None and state["position"]["epoch"] == 1
    ckpt.save_atomic(new, path, keep_previous=keep_previous)  # the next save goes through
    assert ckpt.load(path)["position"]["epoch"] == 2
    assert {p.name for p in folder.iterdir()} == ({"last.pt", "prev.pt"} if keep_previous else {"last.pt"})


def test_resume_from_a_corrupt_last_checkpoint(tmp_path):
    """End to end: both damaged -> exit 2 naming both, nothing changed; prev.pt good -> the run
    continues from it with a warning, the damaged file set aside, and finishes."""
    out = tmp_path / "run"
    spec = write_spec(tiny_spec(out, "kd", epochs=2, fraction=0.1), tmp_path / "run.yaml")
    first = run_cli("train", str(spec), "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    last, prev = out / "checkpoints" / "last.pt", out / "checkpoints" / "prev.pt"
    assert ckpt.load(last)["position"]["epoch"] == 2 and ckpt.load(prev)["position"]["epoch"] == 1
    (out / "summary.json").unlink()  # as if stopped between the last checkpoint and the export
    good_prev = prev.read_bytes()
    weights = next(v for v in ckpt.load(last)["model"].values() if v.numel() >= 256)
    _flip_tensor_bytes(last, weights, count=min(2000, weights.numel()))
    prev.write_bytes(good_prev[: len(good_prev) // 2])
    before = _snapshot(out)
    _one_line_error(run_cli("train", str(spec), "--quiet", "--resume"), f"checkpoint {last} is corrupt",
                    f"{prev}", "no good either")
    kept = ("checkpoints", "metrics.jsonl", "student.safetensors")  # plan.json is rewritten, with timings
    assert {k: v for k, v in _snapshot(out).items() if k.parts[0] in kept} == \
        {k: v for k, v in before.items() if k.parts[0] in kept}
    prev.write_bytes(good_prev)
    again = run_cli("train", str(spec), "--quiet", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    text = " ".join(again.stdout.split())
    assert "is corrupt" in text and "continuing from the previous checkpoint" in text, again.stdout[-2000:]
    assert (out / "checkpoints" / "last.pt.corrupt").exists() and (out / "summary.json").exists()
    assert ckpt.load(last)["position"]["epoch"] == 2


# --- data --------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_out_of_range_name_the_split_and_the_values(split):
    from kdgraph import data
    from kdgraph.errors import DataError
    from kdgraph.spec import DataSpec

    def bad_labels(data_spec, seed):
        x = torch.rand(20, 1, 4, 4)
        y = torch.arange(20) % 3
        if split == "train":
            y[[2, 5]] = torch.tensor([7, -1])
        test_y = torch.tensor([0, 1, 2, 9, 9]) if split == "test" else torch.tensor([0, 1, 2, 0, 1])
        return data.RawSplits(x, y, x[:5], test_y, 3, "none")

    data.register_dataset("badlabels", bad_labels)
    try:
        spec = DataSpec.model_construct(dataset="badlabels", input_size=None, fraction=1.0, num_classes=None,
                                        resize="resample")
        with pytest.raises(DataError) as info:
            data.create_dataset(spec, 0)
    finally:
        data.DATASETS.unregister("badlabels")
    message = str(info.value)
    assert f"the {split} split has 2 label(s) outside 0..2" in message and "num_classes 3" in message
    assert ("from -1 to 7" if split == "train" else "from 9 to 9") in message
    assert "\n" not in message


def test_a_gz_idx_file_that_is_not_gzip_is_a_data_error(tmp_path):
    from kdgraph.data import create_dataset
    from kdgraph.errors import DataError

    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for stem in stems:
        (tmp_path / f"{stem}.gz").write_bytes(b"this is not gzip at all")
    spec = load_spec({"name": "x", "student": {"model": "timm:resnet18"},
                      "data": {"dataset": "fashion-mnist", "root": str(tmp_path)}})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read \(BadGzipFile"):
        create_dataset(spec.data, 0)


# --- models and tracing --------------------------------------------------------------------

def test_a_factory_that_raises_is_one_line_naming_the_reference(tmp_path):
    (tmp_path / "raising_models.py").write_text(
        "def make(**kwargs):\n    raise ValueError('depth must be one of 18, 34')\n")
    raw = tiny_spec(tmp_path / "run", "supervised", student="module:raising_models:make", teacher=False)
    spec = write_spec(raw, tmp_path / "spec.yaml")
    _one_line_error(run_cli("plan", str(spec)), "module:raising_models:make", "raised ValueError",
                    "depth must be one of 18, 34")


def test_a_wrong_channel_count_names_input_size_and_in_chans(tmp_path, capfd):
    from kdgraph.compiler import compile_spec
    from kdgraph.errors import TraceError

    spec = load_spec(tiny_spec(tmp_path / "run", "kd"), ["student.kwargs.in_chans=3"])
    with pytest.raises(TraceError) as info:
        compile_spec(spec)
    message = str(info.value)
    assert "takes 3 input channels but data.input_size gives 1" in message
    assert "student.kwargs.in_chans: 1" in message and "\n" not in message and "ShapeProp" not in message
    assert "Traceback" not in capfd.readouterr().err  # ShapeProp's own print is swallowed


def test_a_num_classes_mismatch_names_num_classes_not_an_invariant(tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.errors import PlanError

    spec = load_spec(tiny_spec(tmp_path / "run", "kd"), ["student.kwargs.num_classes=7"])
    with pytest.raises(PlanError) as info:
        compile_spec(spec)
    message = str(info.value)
    assert "teacher predicts 10 classes, the student 7" in message and "kwargs.num_classes" in message
    assert "invariant" not in message


# --- spec: strict types, bounds, bounded reading -----------------------------------------

@pytest.mark.parametrize("override,path,fragments", [
    ("schedule.epochs=true", "schedule.epochs", ["true/false is not a number", "an integer from 1 to 100000"]),
    ("schedule.epochs=1.0e+23", "schedule.epochs", ["an integer from 1 to 100000"]),
    ("schedule.epochs=2.5", "schedule.epochs", ["must be a valid integer"]),
    ("schedule.epochs='3'", "schedule.epochs", ["must be a valid integer", "an integer from 1 to 100000"]),
    ("schedule.epochs=3.0", "schedule.epochs", ["must be a valid integer"]),
    ("data.batch_size=64.0", "data.batch_size", ["must be a valid integer", "an integer from 1 to 65536"]),
    ("optim.lr=true", "optim.lr", ["true/false is not a number", "a number > 0 and <= 10"]),
    ("optim.lr=1.0e+23", "optim.lr", ["a number > 0 and <= 10"]),
    ("data.batch_size=10000000", "data.batch_size", ["an integer from 1 to 65536"]),
    ("loss.temperature=-1", "loss.temperature", ["a number >= 0.001 and <= 1000"]),
    ("runtime.compile=1", "runtime.compile", ["must be a valid boolean", "true/false"]),
    ("seed=18446744073709551616", "seed", ["an integer from 0 to 4294967295"]),
    ("seed=-1", "seed", ["an integer from 0 to 4294967295"]),
    ("data.input_size=[1, 100000, 100000]", "data.input_size.1", ["an integer from 1 to 16384"]),
    ("data.input_size=[16, 4096, 4096]", "data.input_size", ["268,435,456 values", "C*H*W <= 67,108,864"]),
])
def test_numbers_are_strictly_typed_and_bounded(tmp_path, override, path, fragments):
    with pytest.raises(SpecError) as info:
        load_spec(tiny_spec(tmp_path / "run", "kd"), [override])
    assert info.value.path == path
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    assert load_spec(tiny_spec(tmp_path / "run", "kd"), ["schedule.epochs=3"]).schedule.epochs == 3


def test_a_key_given_twice_is_refused_naming_the_key_and_line(tmp_path):
    text = ("name: dup\nstudent:\n  model: timm:resnet18\nschedule:\n  epochs: 3\n  method: supervised\n"
            "  epochs: 30\n")
    (tmp_path / "spec.yaml").write_text(text)
    proc = run_cli("plan", str(tmp_path / "spec.yaml"))
    _one_line_error(proc, "spec.yaml:7:3", "key 'epochs' appears twice", "first at line 5")
    with pytest.raises(SpecError, match="key 'epochs' appears twice"):
        load_spec(tiny_spec(tmp_path / "run", "kd"), ["schedule={epochs: 3, epochs: 4}"])
    # a merge key may be overridden, as YAML intends
    merged = "name: m\nstudent:\n  <<: {model: timm:resnet18, kwargs: {num_classes: 10}}\n  model: timm:resnet34\n"
    (tmp_path / "merged.yaml").write_text(merged)
    assert load_spec(tmp_path / "merged.yaml").student.model == "timm:resnet34"

def _billion_laughs():
    lines = ["    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "name: lol\nstudent:\n  model: timm:resnet18\n  kwargs:\n" + "\n".join(lines) + "\n"


def test_a_billion_laughs_in_kwargs_is_refused_fast(tmp_path):
    import time

    path = tmp_path / "lol.yaml"
    path.write_text(_billion_laughs())
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="more than 10,000 values"):
        load_spec(path)
    assert time.perf_counter() - t0 < 5
    _one_line_error(run_cli("plan", str(path), timeout=60), str(path), "more than 10,000 values")


# --- output paths ------------------------------------------------------------------------

def test_an_unwritable_output_is_refused_before_building(tmp_path):
    out = "/proc/kdgraph-cannot-write-here/run"  # not writable even for root
    with pytest.raises(KDGraphError, match=f"output {out} is not writable"):
        from kdgraph.runtime.runs import prepare_output

        prepare_output(out)


def test_plan_png_into_a_folder_reports_the_file_and_unwritable_is_one_line(tmp_path):
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    folder = tmp_path / "pictures"
    folder.mkdir()
    ok = run_cli("plan", str(spec), "--png", str(folder))
    assert ok.returncode == 0, ok.stderr[-2000:]
    drawn = folder / "tiny-kd.png"
    assert drawn.is_file() and str(drawn) in " ".join(ok.stderr.split())
    _one_line_error(run_cli("plan", str(spec), "--png", "/proc/kdgraph-nope/graph.png"),
                    "cannot write --png /proc/kdgraph-nope/graph.png")


def test_export_to_an_existing_folder_writes_inside_and_unwritable_is_one_line(tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.distiller import Distiller
    from kdgraph.runtime.commands import export_spec

    spec = load_spec(tiny_spec(tmp_path / "run", "kd"))
    distiller = Distiller(compile_spec(spec))
    state = {"model": distiller.state_dict(), "optimizer": {}, "scheduler": {}, "rng": {}, "position": {},
             "plan": {}}
    checkpoint = ckpt.save_atomic(state, tmp_path / "c.pt")
    folder = tmp_path / "exported"
    folder.mkdir()
    result = export_spec(spec, folder, checkpoint)
    assert result["folder"] == str(folder) and result["format"] == "state_dict"
    assert (folder / "model.safetensors").stat().st_size > 0 and (folder / "config.json").is_file()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(KDGraphError, match=r"cannot write --to .*blocker/s"):
        export_spec(spec, blocker / "s", checkpoint)
    with pytest.raises(KDGraphError, match=r"export --to .*blocker: a file is there"):
        export_spec(spec, blocker, checkpoint)
    assert blocker.read_text() == "a file"
    again = export_spec(spec, folder, checkpoint)  # an earlier export is replaced
    assert again["folder"] == str(folder)


def test_export_refuses_a_folder_that_is_not_a_kdgraph_export(tmp_path):
    """`export --to .` in a repository overwrote its README.md; a user's config.json too."""
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("my project")
    (repo / "config.json").write_text('{"mine": true}')
    before = _snapshot(repo)
    for extra in ([], ["--checkpoint", str(tmp_path / "missing.pt")]):
        proc = run_cli("export", str(spec), "--to", str(repo), *extra)
        _one_line_error(proc, f"export --to {repo}", "not a kdgraph export", "new or empty folder")
    assert _snapshot(repo) == before
    assert not (tmp_path / "run").exists()


# --- runtime values the machine or the model cannot use ---------------------------------------

def test_micro_batches_that_leave_batchnorm_tiny_parts_are_refused(tmp_path):
    spec = write_spec(tiny_spec(tmp_path / "run", "kd", batch_size=16, runtime={"micro_batches": 16}),
                      tmp_path / "spec.yaml")
    _one_line_error(run_cli("plan", str(spec)), "runtime.micro_batches", "parts of 1 sample", "BatchNorm",
                    "at most 4")
    _one_line_error(run_cli("train", str(spec), "--quiet"), "runtime.micro_batches")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(SpecError, match="leave empty parts") as info:
        load_spec(tiny_spec(tmp_path / "run", "kd", batch_size=16, runtime={"micro_batches": 17}))
    assert info.value.path == "runtime.micro_batches"
    assert load_spec(tiny_spec(tmp_path / "run", "kd", batch_size=16, runtime={"micro_batches": 4}))


def test_more_workers_than_the_cpus_can_use_are_refused_before_decoding(tmp_path):
    from test_stream import folder_spec, write_folder

    from kdgraph.stream import available_cpus

    root = write_folder(tmp_path / "images")
    workers = 4 * max(available_cpus(), 8) + 1
    spec = write_spec(folder_spec(root, tmp_path / "run", workers=workers), tmp_path / "spec.yaml")
    _one_line_error(run_cli("train", str(spec), "--quiet"), "runtime.num_workers", f"{workers} worker processes",
                    "allowed: 0 to")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- image folders ------------------------------------------------------------------------

def _image_folder_spec(tmp_path, **data):
    from test_stream import folder_spec, write_folder

    root = write_folder(tmp_path / "images")
    return root, folder_spec(root, tmp_path / "run", loader="memory", **data)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_class_whose_every_image_is_unreadable_is_an_error(tmp_path, loader):
    root, raw = _image_folder_spec(tmp_path)
    raw["data"]["loader"] = loader
    for image in (root / "train" / "bee").iterdir():
        image.write_bytes(b"not a png")
    spec = write_spec(raw, tmp_path / "spec.yaml")
    proc = run_cli("train", str(spec), "--quiet")
    _one_line_error(proc, "every image of class 'bee' in train/ is unreadable", "8 files")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_plan_stops_a_num_classes_that_disagrees_with_the_class_folders(tmp_path):
    root, raw = _image_folder_spec(tmp_path)
    for role in ("teacher", "student"):
        raw[role]["kwargs"]["num_classes"] = 10  # the folder has 3
    spec = write_spec(raw, tmp_path / "spec.yaml")
    _one_line_error(run_cli("plan", str(spec)), "student.kwargs.num_classes", "predicts 10 classes",
                    "3 class folders")


def test_a_data_root_that_is_a_file_and_a_spec_that_is_a_folder_are_named_as_such(tmp_path):
    root, raw = _image_folder_spec(tmp_path)
    raw["data"]["root"] = str(tmp_path / "file.txt")
    (tmp_path / "file.txt").write_text("not a folder")
    spec = write_spec(raw, tmp_path / "spec.yaml")
    for command in ("plan", "train"):
        _one_line_error(run_cli(command, str(spec), *(["--quiet"] if command == "train" else [])),
                        f"data.root: {tmp_path / 'file.txt'} is a file")
    _one_line_error(run_cli("plan", str(tmp_path)), f"spec {tmp_path} is a folder")
    assert (tmp_path / "file.txt").read_text() == "not a folder"


# --- paths the OS refuses for their length ----------------------------------------------------

_LONG = "n" * 300  # one path component over NAME_MAX (255 bytes)


@pytest.mark.parametrize("where", ["spec", "output", "student.checkpoint", "data.root", "--png", "--checkpoint",
                                   "--to"])
def test_a_path_component_over_255_bytes_is_one_line(tmp_path, where):
    raw = tiny_spec(tmp_path / "run", "kd")
    long = str(tmp_path / _LONG / "x")
    fragment = "bytes"
    if where == "spec":
        args = ["plan", str(tmp_path / f"{_LONG}.yaml")]
    else:
        if where == "output":
            raw["output"] = long
        elif where == "student.checkpoint":
            raw["student"]["checkpoint"] = long
        elif where == "data.root":
            raw["data"] = {**raw["data"], "dataset": "imagefolder", "root": long}
        spec = str(write_spec(raw, tmp_path / "spec.yaml"))
        args = {"--png": ["plan", spec, "--png", long + ".png"],
                "--checkpoint": ["eval", spec, "--checkpoint", long],
                "--to": ["export", spec, "--to", long]}.get(where, ["train", spec, "--quiet"])
        fragment = where if where.startswith("--") else f"{where}: the path has a name of"
    _one_line_error(run_cli(*args), fragment, "at most 255")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["spec.yaml"] if where != "spec" else [])


@pytest.mark.parametrize("other", [{"classes": 5}, {"channels": 3}, {"dynamic": False}])
def test_eval_of_a_program_exported_from_another_pair_is_one_line(tmp_path, other):
    folder = tmp_path / "export"
    folder.mkdir()
    from test_runtime_program import _tiny_program

    _tiny_program(folder / "model.pt2", **other)
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    what = {"classes": "predicts 5 classes, this spec's student 10", "channels": "does not take this spec's input",
            "dynamic": "takes a fixed batch size"}[next(iter(other))]
    fits = "dynamic" not in other  # a fixed batch fits the pair, not evaluation's batches
    _one_line_error(run_cli("eval", str(spec), "--checkpoint", str(folder)), str(folder / "model.pt2"), what,
                    *(["does not fit the student"] if fits else []))


@pytest.mark.parametrize("name,instead", [("ImageFolder", "imagefolder"), ("FakeData", "synthetic")])
def test_a_torchvision_dataset_without_a_split_keyword_is_one_line(tmp_path, name, instead):
    raw = tiny_spec(tmp_path / "run", "kd")
    raw["data"] = {**raw["data"], "dataset": f"torchvision:{name}", "root": str(tmp_path), "input_size": [1, 8, 8]}
    spec = write_spec(raw, tmp_path / "spec.yaml")
    _one_line_error(run_cli("train", str(spec), "--quiet"), f"torchvision.datasets.{name} does not take",
                    f"use dataset: {instead}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- newcomer paths ---------------------------------------------------------------------------

def test_eval_and_export_reuse_the_runs_stored_overrides_and_export_needs_no_teacher(tmp_path):
    """A run trained with --set (here a student of other widths): eval and export without
    repeating it load the same student; export ignores a teacher file that does not fit."""
    spec, out = _tiny_run(tmp_path)
    widths = "student.kwargs.widths=[16, 32, 48]"
    first = run_cli("train", str(spec), "--quiet", "--set", widths)
    assert first.returncode == 0, first.stderr[-2000:]
    scored = run_cli("eval", str(spec), "--format", "json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["student_top1"] >= 0
    misfit = tmp_path / "misfit.safetensors"
    import shutil

    shutil.copy(out / "student.safetensors", misfit)  # the student's weights: not the teacher's shapes
    shipped = run_cli("export", str(spec), "--to", str(tmp_path / "ship"), "--set", f"teacher.checkpoint={misfit}")
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    card = (tmp_path / "ship" / "README.md").read_text()
    assert "widths=[16, 32, 48]" in card or "widths" in json.loads((tmp_path / "ship" / "config.json").read_text())[
        "kdgraph"]["command"]


def test_small_messages_a_newcomer_reads(tmp_path):
    from test_stream import write_folder

    # eval --checkpoint that is not there: no advice to pass --checkpoint
    spec = write_spec(tiny_spec(tmp_path / "run", "kd"), tmp_path / "spec.yaml")
    proc = run_cli("eval", str(spec), "--checkpoint", str(tmp_path / "missing.pt"))
    _one_line_error(proc, f"no trained student at {tmp_path / 'missing.pt'}")
    assert "pass --checkpoint" not in proc.stderr
    # with both val/ and test/, the plan says which one is evaluated
    root = write_folder(tmp_path / "images")
    (root / "val").rename(root / "test")
    write_folder(root)  # val/ again, beside test/
    raw = tiny_spec(tmp_path / "run", "kd")
    raw["data"] = {"dataset": "imagefolder", "root": str(root), "input_size": [1, 8, 8], "batch_size": 4}
    for role in ("teacher", "student"):
        raw[role]["kwargs"]["num_classes"] = 3
    planned = run_cli("plan", str(write_spec(raw, tmp_path / "folder.yaml")))
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "val/ is evaluated, test/ is not read" in " ".join(planned.stdout.split())
    # a skipped image is a plain 'warning:' line, not Python's file:line format
    (root / "train" / "bee" / "0.png").write_bytes(b"not a png")
    raw["data"]["loader"] = "memory"
    raw["schedule"]["epochs"] = 1
    trained = run_cli("train", str(write_spec(raw, tmp_path / "folder.yaml")), "--quiet")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "warning: skipping unreadable image" in trained.stderr and "BadImageWarning" not in trained.stderr


def test_the_in_memory_image_folder_is_decoded_into_one_array(tmp_path):
    """The in-memory path peaked at 3.4x what data.memory_budget_mb counts: a list of decoded
    images, then a stacked copy. Now one uint8 array, the bytes the budget counts. numpy
    reports its allocations to tracemalloc."""
    import tracemalloc

    from test_stream import write_folder

    from kdgraph.data import _load_imagefolder
    from kdgraph.spec import DataSpec

    root = write_folder(tmp_path / "images", channels=3, side=48, train=16, val=4)
    spec = DataSpec(dataset="imagefolder", root=root, input_size=(3, 48, 48))
    decoded = (3 * 16 + 3 * 4) * 3 * 48 * 48  # uint8
    tracemalloc.start()
    try:
        raw = _load_imagefolder(spec, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert raw.train_x.shape == (48, 3, 48, 48) and raw.test_x.shape == (12, 3, 48, 48)
    assert raw.train_x.dtype == torch.uint8
    assert peak < 1.3 * decoded, (peak, decoded)


def test_the_resume_command_repeats_an_output_override(tmp_path):
    from kdgraph.runtime.runs import RunFolder, resume_command

    out = tmp_path / "elsewhere"
    out.mkdir()
    assert resume_command(out) == "kdgraph train SPEC --resume"
    RunFolder(out).stored_spec.write_text(json.dumps({"spec": {}, "spec_file": "/specs/my spec.yaml",
                                            "overrides": ["optim.lr=0.1", f"output={out}"]}))
    assert resume_command(out) == f"kdgraph train '/specs/my spec.yaml' --set output={out} --resume"


def test_sigkill_during_a_background_checkpoint_write_leaves_a_whole_checkpoint(tmp_path):
    """The Trainer's saves are written by a thread (BackgroundWriter): a SIGKILL while that
    thread writes leaves last.pt the previous whole, checksummed checkpoint and a stray temp
    file at most (the next save's mkstemp never reuses its name)."""
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "checkpoints"
    script = f"""
import time, torch
from pathlib import Path
from kdgraph.runtime import checkpoint as ckpt
path = Path({str(folder / 'last.pt')!r})
state = lambda w, e: {{"model": {{"w": w}}, "optimizer": {{}}, "scheduler": {{}}, "rng": ckpt.rng_state(),
                      "position": {{"epoch": e, "step": 0, "global_step": e}}, "plan": {{}}}}
ckpt.save_atomic(state(torch.zeros(4), 1), path, keep_previous=True)
writer = ckpt.BackgroundWriter()
writer.submit(state(torch.randn(64, 2**20), 2), path, keep_previous=True)  # 256 MB
print("submitted", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "submitted"
    deadline = time.monotonic() + 30
    while not list(folder.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state, warning = ckpt.load_latest(folder / "last.pt")
    assert warning is None and state["position"]["epoch"] in (1, 2)  # whole: its checksum holds
    if state["position"]["epoch"] == 1:
        assert torch.equal(state["model"]["w"], torch.zeros(4))


def test_a_background_write_copies_the_state_at_submit(tmp_path):
    """Training goes on while the thread writes: what is saved is the state at submit time."""
    weights = torch.zeros(256, 256)
    state = {"model": {"w": weights}, "optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state(),
             "position": {"epoch": 1, "step": 0, "global_step": 1}, "plan": {}, "history": {"n": 1}}
    writer = ckpt.BackgroundWriter()
    writer.submit(state, tmp_path / "last.pt")
    weights.add_(1)  # an optimizer step, in place
    state["history"]["n"] = 2
    writer.wait()
    saved = ckpt.load(tmp_path / "last.pt")
    assert torch.equal(saved["model"]["w"], torch.zeros(256, 256)) and saved["history"]["n"] == 1
