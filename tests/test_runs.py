"""kdgraph.runtime.runs: the run folder's paths are named once (``RunFolder``); the lock admits one
writer; ``claim`` deletes or overwrites only what a run wrote, against files written by hand; the
resume checks (spec differences, stored run, resume command, judge data) against specs written out."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import RunFolder

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


# --- moved from test_hostile_inputs.py ------------------------------------------------------

def _contend(out, barrier, trials, results):
    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.runs import RunLock

    for trial in range(trials):
        barrier.wait()
        lock = RunLock(out)
        try:
            lock.acquire()
        except KDGraphError:
            pass
        results.put((trial, lock.held))
        barrier.wait()  # both have tried before either lets go
        lock.release()


def test_two_runs_starting_together_never_both_hold_the_lock(tmp_path):
    """The lock was created, then written: a second run reading it empty took it as stale."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, results, trials = ctx.Barrier(2), ctx.Queue(), 200
    procs = [ctx.Process(target=_contend, args=(tmp_path, barrier, trials, results)) for _ in range(2)]
    for p in procs:
        p.start()
    held = [results.get(timeout=120) for _ in range(2 * trials)]
    for p in procs:
        p.join(timeout=120)
    holders = [sum(h for t, h in held if t == trial) for trial in range(trials)]
    assert holders == [1] * trials, holders
    assert not (tmp_path / ".kdgraph.lock").exists() and list(tmp_path.iterdir()) == []


def test_force_deletes_only_the_files_a_run_wrote(tmp_path):
    from kdgraph.runtime.runs import claim

    out = tmp_path / "run"
    ours = ["checkpoints/last.pt", "checkpoints/prev.pt", "checkpoints/.last.pt.abc123.tmp", "metrics.jsonl",
            "summary.json", "student.safetensors", "run.json", "tensorboard/events.out.tfevents.1.host.2.0"]
    theirs = ["checkpoints/my-best.pt", "checkpoints/keep/a.txt", "tensorboard/other-run/events.out.tfevents.9",
              "tensorboard/notes.md", "notes.md", "data/x.png"]
    for name in ours + theirs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (out / "run.json").write_text(json.dumps({"spec": {"seed": 0}}))  # kdgraph's record: the folder is a run's
    claim(out, {"seed": 0}, resume=False, force=True)
    assert [n for n in ours if n != "run.json" and (out / n).exists()] == []
    assert all((out / n).read_text() == n for n in theirs)
    # folders holding only what a run wrote go with it
    (out / "tensorboard" / "notes.md").unlink()
    for name in ("tensorboard/other-run/events.out.tfevents.9",):
        (out / name).unlink()
    (out / "tensorboard" / "other-run").rmdir()
    (out / "tensorboard" / "events.out.tfevents.2").write_text("x")
    claim(out, {"seed": 0}, resume=False, force=True)
    assert not (out / "tensorboard").exists() and (out / "checkpoints" / "my-best.pt").exists()


def test_a_run_killed_before_its_first_checkpoint_can_simply_be_run_again(tmp_path):
    """--resume said 'train without --resume first' and a plain run said 'continue it with --resume'."""
    from kdgraph.runtime.runs import claim, earlier_run

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"kind": "step"}\n')
    (out / "run.json").write_text('{"spec": {"seed": 0}}')
    assert earlier_run(out) == []
    claim(out, {"seed": 0}, resume=False, force=False)  # no error: nothing would be lost
    assert not (out / "metrics.jsonl").exists()  # the killed run's own files go
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"kind": "step"}\n')
    assert earlier_run(out) == ["checkpoints/last.pt", "metrics.jsonl"]
    with pytest.raises(KDGraphError, match="already holds a run .*checkpoints/last.pt"):
        claim(out, {"seed": 0}, resume=False, force=False)


# --- the lock, claim and the resume checks, in this process ------------------------------------

def test_a_lock_from_another_host_is_refused_and_a_dead_local_one_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from kdgraph.runtime.runs import RunLock

    lock = RunFolder(tmp_path).lock
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere.example"}))
    with pytest.raises(KDGraphError, match=r"in use by another kdgraph run \(pid \d+ on elsewhere.example\)"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["host"] == "elsewhere.example"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with RunLock(tmp_path) as held:
        assert held.held and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["{not json", '{"pid": true}', '{"pid": 0}', "[1]"])
def test_a_lock_without_a_pid_is_refused_and_left(tmp_path, content):
    from kdgraph.runtime.runs import RunLock

    RunFolder(tmp_path).lock.write_text(content)
    lock = RunFolder(tmp_path).lock
    with pytest.raises(KDGraphError, match=rf"^{re.escape(str(lock))} is not a kdgraph run lock \(it holds "
                                           rf"{re.escape(repr(content))}, not a pid\); delete it if no kdgraph run "
                                           rf"is using {re.escape(str(tmp_path))}$"):
        RunLock(tmp_path).acquire()
    assert RunFolder(tmp_path).lock.read_text() == content


def test_spec_differences_names_changed_keys_but_not_the_resumable_ones():
    from kdgraph.runtime.runs import RESHARD_CHANGES, spec_differences

    old = {"seed": 0, "optim": {"lr": 0.1}, "runtime": {"device": "cpu", "log_every": 5}, "data": {"batch_size": 8}}
    assert spec_differences(old, {**old, "runtime": {"device": "cuda", "log_every": 1}}) == []
    assert spec_differences(old, {**old, "seed": 1, "optim": {"lr": 0.2}}) == ["optim.lr: 0.1 -> 0.2", "seed: 0 -> 1"]
    # a key the stored spec lacks is a field newer than the run: not a difference; one it had and lost is
    assert spec_differences(old, {**old, "loss": {"kl": 1.0}}) == []
    assert spec_differences(old, {k: v for k, v in old.items() if k != "seed"}) == ["seed: 0 -> '(unset)'"]
    batch = {**old, "data": {"batch_size": 4}}
    assert spec_differences(old, batch) == ["data.batch_size: 8 -> 4"]
    assert spec_differences(old, batch, RESHARD_CHANGES) == []


def test_claim_on_resume_refuses_another_spec_and_writes_nothing(tmp_path):
    from kdgraph.runtime.runs import claim

    claim(tmp_path, {"seed": 0, "optim": {"lr": 0.1}}, resume=False, force=False, source={"overrides": ["seed=0"]})
    record = json.loads(RunFolder(tmp_path).stored_spec.read_text())
    assert record == {"spec": {"seed": 0, "optim": {"lr": 0.1}}, "overrides": ["seed=0"], "kept": []}
    before = RunFolder(tmp_path).stored_spec.read_text()
    with pytest.raises(KDGraphError, match=r"trained with another spec; --resume needs the same one "
                                           r"\(differs: optim.lr: 0.1 -> 0.3\)"):
        claim(tmp_path, {"seed": 0, "optim": {"lr": 0.3}}, resume=True, force=False)
    with pytest.raises(KDGraphError, match="--resume and --force contradict each other"):
        claim(tmp_path, {"seed": 0, "optim": {"lr": 0.1}}, resume=True, force=True)
    assert RunFolder(tmp_path).stored_spec.read_text() == before


def test_stored_run_and_the_resume_command(tmp_path):
    from kdgraph.runtime.runs import resume_command, stored_run

    assert stored_run(tmp_path) is None
    assert resume_command(tmp_path) == "kdgraph train SPEC --resume"
    RunFolder(tmp_path).stored_spec.write_text("{cut short")
    with pytest.raises(KDGraphError, match="run.json is not valid JSON; restore it or start over with --force"):
        stored_run(tmp_path)
    assert resume_command(tmp_path) == "kdgraph train SPEC --resume"  # said while stopping: never raises
    RunFolder(tmp_path).stored_spec.write_text(json.dumps({
        "spec": {}, "spec_file": "my specs/a.yaml", "overrides": ["output=o1", "seed=2", " output = my out"]}))
    # only the last output= override is repeated (the others run.json reuses by itself), quoted for a shell
    assert resume_command(tmp_path) == "kdgraph train 'my specs/a.yaml' --set ' output = my out' --resume"


def test_a_judge_must_have_classified_the_same_data(tmp_path):
    from kdgraph.runtime.runs import check_judge_data

    data = {"dataset": "digits", "root": None, "num_classes": 10, "input_size": [1, 8, 8], "fraction": 0.5}
    judge = tmp_path / "judge"
    judge.mkdir()
    with pytest.raises(KDGraphError, match="denoise.judge: .*run.json holds no data section"):
        check_judge_data(judge, data)
    RunFolder(judge).stored_spec.write_text(json.dumps({"spec": {"data": {**data, "fraction": 1.0,
                                                                          "input_size": None}}}))
    check_judge_data(judge, data)  # another fraction, and an input size left to the dataset: the same data
    RunFolder(judge).stored_spec.write_text(json.dumps({"spec": {"data": {**data, "num_classes": 3}}}))
    with pytest.raises(KDGraphError, match=r"classifies other data \(data.num_classes 3 there, 10 here\)"):
        check_judge_data(judge, data)


def test_a_refused_build_takes_back_the_run_json_of_a_fresh_claim_only(tmp_path):
    from kdgraph.runtime.runs import claim, unclaimed_on_refusal

    folder = RunFolder(tmp_path)
    claim(tmp_path, {"seed": 0}, resume=False, force=False)
    with pytest.raises(KDGraphError, match="bad data"), unclaimed_on_refusal(tmp_path, fresh=True):
        raise KDGraphError("bad data")
    assert not folder.stored_spec.exists()
    claim(tmp_path, {"seed": 0}, resume=False, force=False)
    with pytest.raises(KDGraphError), unclaimed_on_refusal(tmp_path, fresh=False):  # a resume keeps its record
        raise KDGraphError("bad data")
    assert folder.stored_spec.exists()
    folder.metrics.write_text("{}\n")
    with pytest.raises(KDGraphError), unclaimed_on_refusal(tmp_path, fresh=True):  # not the only file: kept
        raise KDGraphError("bad data")
    with pytest.raises(ValueError), unclaimed_on_refusal(tmp_path, fresh=True):  # not a refusal: a bug, kept
        folder.metrics.unlink()
        raise ValueError("bug")
    assert folder.stored_spec.exists()


def test_prepare_output_makes_the_folder_and_refuses_a_file_on_the_way(tmp_path):
    from kdgraph.runtime.runs import prepare_output

    assert prepare_output(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write probe is gone
    (tmp_path / "f").write_text("mine")
    with pytest.raises(KDGraphError, match=r"output .*f/sub is below .*f, which is a file"):
        prepare_output(tmp_path / "f" / "sub")
    assert (tmp_path / "f").read_text() == "mine"


def test_readable_gives_a_private_file_the_umasks_mode(tmp_path):
    from kdgraph.runtime.runs import readable

    path = tmp_path / "x"
    path.write_text("")
    os.chmod(path, 0o600)
    mask = os.umask(0)
    os.umask(mask)
    assert readable(path) == path and (path.stat().st_mode & 0o777) == 0o666 & ~mask


def test_every_field_of_the_spec_record_guards_the_resume_but_the_resumable_ones(tmp_path):
    """The resume's spec check over a whole record (a real spec, every default filled in, as a
    checkpoint keeps it): each leaf changed alone is named as a difference, except the runtime
    keys a resume may change (RESUMABLE_CHANGES) and, with --reshard, RESHARD_CHANGES too."""
    from kdgraph.runtime.runs import RESHARD_CHANGES, RESUMABLE_CHANGES, _flatten, spec_differences
    from kdgraph.spec import load_spec

    from _runtime_helpers import tiny_spec

    def unflatten(flat: dict) -> dict:
        out: dict = {}
        for key, value in flat.items():
            *path, last = key.split(".")
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
        return out

    record = load_spec(tiny_spec(tmp_path / "run", "stablekd")).to_dict()
    leaves = _flatten(record)
    assert len(leaves) > 60 and spec_differences(record, unflatten(leaves)) == []  # the whole spec, rebuilt whole
    assert RESUMABLE_CHANGES == ("runtime.device", "runtime.num_threads", "runtime.log_every", "runtime.log",
                                 "runtime.compile", "runtime.num_workers", "runtime.pin_memory",
                                 "runtime.persistent_workers", "runtime.prefetch_factor")  # how a run executes, not what

    def changed(value):
        if isinstance(value, bool) or value is None:
            return 1 if value is None else not value
        if isinstance(value, (int, float)):
            return value + 1
        return [1] if isinstance(value, (list, dict)) and not value else f"{value}x"

    for key, value in leaves.items():
        other = unflatten({**leaves, key: changed(value)})
        found = spec_differences(record, other)
        resumable = key.startswith(RESUMABLE_CHANGES)
        assert (found == []) if resumable else (len(found) == 1 and found[0].startswith(f"{key}: ")), (key, found)
        if not resumable:
            assert (spec_differences(record, other, RESHARD_CHANGES) == []) == key.startswith(RESHARD_CHANGES), key
