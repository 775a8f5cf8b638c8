"""The run folder's paths are named once (``RunFolder``), the epoch -> stage mapping is one
function, and the Trainer keeps no spec: the loop reads the plan and the resolved config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kdgraph.runtime.runs import RunFolder
from kdgraph.schedules import stage_at, stage_starts

ROOT = Path(__file__).resolve().parents[1]


def test_every_run_folder_path_is_spelled_in_runs_py_only():
    folder = RunFolder(Path("out"))
    # file names (the folders checkpoints/ and tensorboard/ share their names with other words)
    names = {p.name for p in (*folder.outputs(), folder.last_checkpoint, folder.corrupt_checkpoint, folder.lock)
             if "." in p.name}
    assert {"last.pt", "metrics.jsonl", "summary.json", "student.safetensors", "run.json", ".kdgraph.lock"} <= names
    spelled = []
    for path in [*(ROOT / "kdgraph").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        if path == ROOT / "kdgraph" / "runtime" / "runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert spelled == []


def test_run_folder_paths():
    folder = RunFolder("runs/x")
    assert folder.last_checkpoint == Path("runs/x/checkpoints/last.pt")
    assert folder.corrupt_checkpoint.parent == folder.checkpoints
    assert folder.tensorboard in folder.written_in_folders() and folder.lock not in folder.outputs()


def test_epoch_to_stage():
    """Stages of 2, 3 and 1 epochs: epochs 0-1 are stage 0, 2-4 stage 1, 5 stage 2; past the
    end, the last stage; a stage of no epochs holds none."""
    assert stage_starts([2, 3, 1]) == (0, 2, 5)
    assert [stage_at([2, 3, 1], e) for e in range(8)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [stage_at([2, 0, 1], e) for e in range(3)] == [0, 0, 2]


@pytest.mark.parametrize("method", ["stablekd"])
def test_the_trainer_keeps_no_spec(tmp_path, method):
    from kdgraph.runtime.loop import Trainer
    from kdgraph.spec import Spec, load_spec

    from _runtime_helpers import tiny_spec

    trainer = Trainer(load_spec(tiny_spec(tmp_path / "run", method, runtime={"micro_batches": 2})))
    assert not any(isinstance(v, Spec) for v in vars(trainer).values())
    assert trainer.config.micro_batches == 2 and trainer.config.device.type == "cpu"
    assert "micro_batches: 2" in str(trainer.config).splitlines()
