"""The run folder's paths are named once (``RunFolder``), the epoch -> stage mapping is one
function, and the Trainer keeps no spec: the loop reads the plan and the resolved config."""

from __future__ import annotations

import ast
import json
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

    trainer = Trainer.from_spec(load_spec(tiny_spec(tmp_path / "run", method, runtime={"micro_batches": 2})))
    assert not any(isinstance(v, Spec) for v in vars(trainer).values())
    assert trainer.config.micro_batches == 2 and trainer.config.device.type == "cpu"
    assert "micro_batches: 2" in str(trainer.config).splitlines()


# --- a run deletes or overwrites only files kdgraph can show it wrote -----------------------

def _users_files(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's own {name}")
    return {name: (folder / name).read_text() for name in names}


def _unchanged(folder, before):
    return {name: (folder / name).read_text() for name in before if (folder / name).exists()} == before


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("names", [["plan.json", "curves.png", "metrics.jsonl", "run.json"],
                                   ["samples.png", "best.safetensors"],
                                   ["student.safetensors", "best.safetensors"],
                                   ["checkpoints/last.pt"], ["samples.txt"], ["tokens/0123-bytes.tokens"]],
                         ids=["plan-curves-metrics-run", "samples-best", "student-best", "last.pt", "samples.txt",
                              "tokens"])
def test_a_users_files_at_a_runs_names_are_never_replaced(tmp_path, names, force):
    """A folder without kdgraph's run record: its files at the names a run writes are the user's."""
    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.runs import claim

    out = tmp_path / "mine"
    before = _users_files(out, [*names, "notes.md"])
    with pytest.raises(KDGraphError, match="holds files kdgraph did not write .*never overwrites or deletes"):
        claim(out, {"seed": 0}, resume=False, force=force)
    assert _unchanged(out, before)


def test_an_output_symlinked_to_a_users_folder_keeps_its_weights_under_force(tmp_path):
    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.runs import claim

    before = _users_files(tmp_path / "mine", ["student.safetensors", "best.safetensors"])
    (tmp_path / "out").symlink_to(tmp_path / "mine")
    with pytest.raises(KDGraphError, match="student.safetensors"):
        claim(tmp_path / "out", {"seed": 0}, resume=False, force=True)
    assert _unchanged(tmp_path / "mine", before)


def test_the_cli_refuses_a_users_folder_and_leaves_every_file(tmp_path):
    """Through `kdgraph train`: one line, exit 2, the folder as it was (no run.json added)."""
    from _runtime_helpers import run_cli, tiny_spec, write_spec

    out = tmp_path / "mine"
    before = _users_files(out, ["plan.json", "curves.png", "metrics.jsonl", "run.json", "samples.png"])
    spec = write_spec(tiny_spec(out, "kd", epochs=1), tmp_path / "spec.yaml")
    proc = run_cli("train", str(spec), "--force", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "did not write" in proc.stderr
    assert _unchanged(out, before) and sorted(p.name for p in out.iterdir()) == sorted(before)


def _kdgraph_run(out, files=("student.safetensors", "best.safetensors", "metrics.jsonl", "summary.json",
                             "checkpoints/last.pt")):
    _users_files(out, files)
    (out / "run.json").write_text(json.dumps({"spec": {"seed": 0}, "kept": []}))


@pytest.mark.parametrize("key,name", [("teacher.checkpoint", "student.safetensors"),
                                      ("teacher.checkpoint", "checkpoints/last.pt"),
                                      ("student.checkpoint", "best.safetensors")])
def test_a_spec_input_inside_the_output_is_refused_before_deleting_anything(tmp_path, key, name):
    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.runs import claim

    out = tmp_path / "qt"
    _kdgraph_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    section, field = key.split(".")
    resolved = {"seed": 0, section: {"model": "x", field: str(out / name)}}
    with pytest.raises(KDGraphError, match=f"{key} is .*{name}.* would delete or overwrite it"):
        claim(out, resolved, resume=False, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_force_on_a_kdgraph_run_deletes_its_files_and_keeps_another_tools_files(tmp_path):
    from kdgraph.runtime.runs import claim

    out = tmp_path / "qt"
    theirs = _users_files(out, ["tensorboard/events.out.tfevents.1.other-tool", "notes.md"])
    claim(out, {"seed": 0}, resume=False, force=False)  # the first claim records what was there
    assert json.loads((out / "run.json").read_text())["kept"] == ["tensorboard/events.out.tfevents.1.other-tool"]
    _users_files(out, ["student.safetensors", "checkpoints/last.pt", "metrics.jsonl",
                       "tensorboard/events.out.tfevents.2.kdgraph"])
    claim(out, {"seed": 1}, resume=False, force=True)
    assert _unchanged(out, theirs)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == ["notes.md", "run.json", "tensorboard/events.out.tfevents.1.other-tool"]


@pytest.mark.parametrize("name", ["student.safetensors", "checkpoints/last.pt", "samples.txt",
                                  "tokens/0123-bytes.tokens", "tokens"])
def test_a_link_at_a_name_a_run_writes_is_refused_even_in_a_run_folder(tmp_path, name):
    """Training writes student.safetensors (and checkpoints) in place: through a link it would
    replace the user's file the link points to."""
    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.runs import claim

    precious = tmp_path / "precious.safetensors"
    precious.write_text("the user's model")
    out = tmp_path / "qt"
    _kdgraph_run(out, files=("metrics.jsonl",))
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).symlink_to(precious)
    for resume, force in ((True, False), (False, True)):
        with pytest.raises(KDGraphError, match=f"holds links at names a run writes \\({name}\\)"):
            claim(out, {"seed": 0}, resume=resume, force=force)
    assert precious.read_text() == "the user's model" and (out / name).is_symlink()


def test_the_cli_refuses_a_teacher_checkpoint_inside_the_output_before_deleting_it(tmp_path):
    """`train --force --set output=runs/qt --set teacher.checkpoint=runs/qt/student.safetensors` deleted
    the teacher's weights, then failed with "checkpoint not found"."""
    from _runtime_helpers import run_cli, tiny_spec, write_spec

    out = tmp_path / "qt"
    _kdgraph_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    spec = write_spec(tiny_spec(out, "kd", epochs=1, teacher_checkpoint=out / "student.safetensors"),
                      tmp_path / "spec.yaml")
    proc = run_cli("train", str(spec), "--force", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "teacher.checkpoint is" in proc.stderr and "would delete or overwrite it" in " ".join(proc.stderr.split())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
