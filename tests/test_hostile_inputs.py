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
