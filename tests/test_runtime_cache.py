"""Building a teacher cache (``kdgraph.runtime.cache``, issue 39): one build at a time per
folder (a lock a killed build gives up), a shard is whole or absent when its writer is killed
mid-write, the header is written last with every shard's checksum, and bad requests (another
build running, a folder of someone else's files, a file, --epochs out of bounds, a full disk, a
teacher whose output is not finite) are one line and leave what was there."""

from __future__ import annotations

import errno
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _runtime_helpers import cli_env, tiny_spec, train_here, write_spec
from kdgraph.errors import KDGraphError
from kdgraph.runtime import cache as cache_module
from kdgraph.runtime.cache import build_cache
from kdgraph.spec import load_spec
from kdgraph.teacher_cache import checksum_path, read_header, shard_path

_CHILD = textwrap.dedent('''
    import pathlib, sys, time
    from kdgraph.runtime import cache as C
    from kdgraph.spec import load_spec

    spec, marker = load_spec(sys.argv[1]), pathlib.Path(sys.argv[2])
    stop_at, epochs = int(sys.argv[3]), int(sys.argv[4])
    calls = [0]
    logits = C._ShardWriter.logits

    def stopping(self, xb):  # the writer, stopped inside a shard: a batch or two already written
        calls[0] += 1
        if calls[0] == stop_at:
            marker.write_text("mid-write")
            time.sleep(600)
        return logits(self, xb)

    C._ShardWriter.logits = stopping
    C.build_cache(spec, epochs, full=True, quiet=True)
''')


def _spec_dict(tmp_path, out="b", cache="cache", epochs=2, **kw):
    d = tiny_spec(tmp_path / out, method="kd", epochs=epochs, **kw)
    d["teacher"]["cache"] = str(tmp_path / cache)
    return d


def _stopped_build(tmp_path, d, stop_at: int) -> subprocess.Popen:
    """A `build_cache` in its own process, stopped at its ``stop_at``-th teacher batch."""
    path = write_spec(d, tmp_path / "child.yaml")
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(marker), str(stop_at), "2"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return proc


def test_a_build_killed_mid_write_is_resumed_exactly_and_a_second_build_is_refused_meanwhile(tmp_path):
    """Build A (seed 0) killed (SIGKILL) inside epoch 2's shard: while it runs, build B (seed 1)
    into the folder is refused naming A's pid; after the kill, no epoch-2 shard exists under its
    name, training refuses the incomplete cache, and the next build takes over A's lock (saying
    so), writes epoch 2 alone, and ends with the shards of an uninterrupted build."""
    reference = build_cache(load_spec(_spec_dict(tmp_path, "r", "reference")), 2, full=True, quiet=True)
    per_epoch = -(-reference.rows_per_epoch // 16)
    d = _spec_dict(tmp_path)
    proc = _stopped_build(tmp_path, d, per_epoch + 3)
    try:
        with pytest.raises(KDGraphError, match=rf"another `kdgraph cache` \(pid {proc.pid} on .*\) is building"):
            build_cache(load_spec(_spec_dict(tmp_path, seed=1)), 2, full=True, quiet=True)
        assert read_header(tmp_path / "cache")["key"]["seed"]["value"] == 0  # B wrote nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    root = tmp_path / "cache"
    assert shard_path(root, 0, 0).exists() and not shard_path(root, 1, 0).exists()
    assert (root / "e0001-r0.npy.tmp").exists()  # where the killed writer was
    assert not read_header(root)["complete"]
    with pytest.raises(KDGraphError, match="incomplete"):
        train_here(load_spec(_spec_dict(tmp_path, "t")))
    again = build_cache(load_spec(d), 2, full=True, quiet=True)
    assert again.built == [1]
    assert len(again.notes) == 1 and f"left by a build that is no longer running (pid {proc.pid}" in again.notes[0]
    assert f"note: took over the lock {root}/.lock-r0" in str(again)
    for e in range(2):
        assert np.array_equal(np.load(shard_path(root, e, 0)), np.load(shard_path(tmp_path / "reference", e, 0)))
    assert read_header(root)["shards"] == read_header(tmp_path / "reference")["shards"]
    assert not list(root.glob("*.tmp"))


def test_the_header_is_written_last_with_each_shards_checksum(tmp_path):
    """The final header is complete and holds, per shard, the SHA-256 of its rows' bytes
    (hashed here from the loaded array), also written beside the shard."""
    summary = build_cache(load_spec(_spec_dict(tmp_path)), 2, top_k=3, quiet=True)
    header = read_header(tmp_path / "cache")
    assert header["complete"] and summary.notes == ()
    for e in range(2):
        path = shard_path(tmp_path / "cache", e, 0)
        want = hashlib.sha256(np.load(path).tobytes()).hexdigest()
        assert header["shards"][path.name] == want == checksum_path(path).read_text().strip()
    assert (tmp_path / "cache" / ".lock-r0").read_text() == ""  # released


def test_a_header_written_while_shards_are_missing_is_never_complete(tmp_path, monkeypatch):
    """Interrupted (KeyboardInterrupt in the teacher) inside epoch 2: the temporary shard is
    removed, the header stays incomplete, no checksum names the missing shard."""
    calls = [0]
    logits = cache_module._ShardWriter.logits

    def interrupted(self, xb):
        calls[0] += 1
        if calls[0] == 35:
            raise KeyboardInterrupt
        return logits(self, xb)

    monkeypatch.setattr(cache_module._ShardWriter, "logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(load_spec(_spec_dict(tmp_path)), 2, full=True, quiet=True)
    header = read_header(tmp_path / "cache")
    assert not header["complete"] and "shards" not in header
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".lock-r0", "e0000-r0.npy", "e0000-r0.npy.sha256", "header.json"]


@pytest.mark.parametrize("where", ["rows", "checksum"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, where):
    """No space left while epoch 2's rows (or its checksum) are written: one line, the
    temporary files removed, epoch 1 kept; the rerun writes epoch 2 alone."""
    from pathlib import Path

    tmp = tmp_path / "cache" / "e0001-r0.npy.tmp"
    rows_of, write_text = cache_module._ShardWriter.rows_of, Path.write_text
    calls = [0]

    def full(self, logits, where_):
        calls[0] += 1
        if calls[0] == 35:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return rows_of(self, logits, where_)

    def full_checksum(self, text, *a, **kw):
        if self.name == "e0001-r0.npy.sha256.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, text, *a, **kw)

    if where == "rows":
        monkeypatch.setattr(cache_module._ShardWriter, "rows_of", full)
    else:
        monkeypatch.setattr(Path, "write_text", full_checksum)
    with pytest.raises(KDGraphError) as err:
        build_cache(load_spec(_spec_dict(tmp_path)), 2, full=True, quiet=True)
    named = tmp if where == "rows" else tmp_path / "cache" / "e0001-r0.npy.sha256.tmp"
    assert str(err.value) == (f"{tmp_path / 'cache'}: cannot write the teacher cache (No space left on device: "
                              f"{named}); free space or fix the folder and run the same command again: it resumes")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".lock-r0", "e0000-r0.npy", "e0000-r0.npy.sha256", "header.json"]  # the temporary files removed
    monkeypatch.undo()
    assert build_cache(load_spec(_spec_dict(tmp_path)), 2, full=True, quiet=True).built == [1]


@pytest.mark.parametrize("epochs", [0, 100_001, 100_000_000])
def test_epochs_out_of_bounds_is_one_line_exit_2(tmp_path, epochs):
    from cli.main import app

    path = write_spec(_spec_dict(tmp_path), tmp_path / "s.yaml")
    result = CliRunner().invoke(app, ["cache", str(path), "--epochs", str(epochs), "--quiet"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert f"--epochs must be in 1..100000 (a cache covers a run's epochs), got {epochs}" in result.output
    assert not (tmp_path / "cache").exists()


def test_a_folder_of_someone_elses_files_or_a_file_is_refused_untouched(tmp_path):
    from cli.main import app

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine too")
    for target, want in ((mine, "holds files that are not a teacher cache's (notes.txt)"),
                         (tmp_path / "afile", "a teacher cache is a folder, and this is a file")):
        d = _spec_dict(tmp_path, cache=target.name)
        result = CliRunner().invoke(app, ["cache", str(write_spec(d, tmp_path / "s.yaml")), "--epochs", "1",
                                          "--quiet"], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and want in result.output, result.output
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (tmp_path / "afile").read_text() == "mine too"


def test_a_teacher_whose_output_is_not_finite_is_refused_before_anything_is_replayed(tmp_path):
    """NaN in the teacher's classifier: the build refuses at the first batch, so training never
    replays NaN logits (whose loss would advise lowering the learning rate)."""
    from safetensors.torch import save_file

    from kdgraph.zoo import resnet_tiny_teacher

    state = resnet_tiny_teacher(num_classes=10, in_chans=1).state_dict()
    state["fc.weight"][3, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    d = _spec_dict(tmp_path)
    d["teacher"]["checkpoint"] = str(tmp_path / "nan.safetensors")
    with pytest.raises(KDGraphError, match=r"the teacher's output is not finite at epoch 1, batch 0"):
        build_cache(load_spec(d), 1, full=True, quiet=True)
    assert not shard_path(tmp_path / "cache", 0, 0).exists()


def test_a_build_from_other_teacher_weights_is_refused(tmp_path, monkeypatch):
    """The builder compares the weights it builds with the header's (a pretrained download
    that changed under the same name: simulated by perturbing the built teacher)."""
    build_cache(load_spec(_spec_dict(tmp_path)), 1, full=True, quiet=True)
    build_run = cache_module.build_run

    def perturbed(*args, **kw):
        c = build_run(*args, **kw)
        with torch.no_grad():
            c.teacher.model.fc.bias.add_(1e-3)
        return c

    monkeypatch.setattr(cache_module, "build_run", perturbed)
    with pytest.raises(KDGraphError, match="built from other teacher weights"):
        build_cache(load_spec(_spec_dict(tmp_path)), 2, full=True, quiet=True)
    assert read_header(tmp_path / "cache")["epochs"] == 1


def test_the_lock_of_a_live_build_is_not_taken_over(tmp_path):
    """A second open of the lock in another process fails while the first holds it; after the
    first exits cleanly the lock is free and the file empty (no stale note)."""
    root = tmp_path / "c"
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import pathlib, sys, time
        from kdgraph.runtime.cache import BuildLock
        with BuildLock(pathlib.Path({str(root)!r}), 0):
            print("held", flush=True)
            sys.stdin.readline()
    ''')], env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KDGraphError, match=rf"pid {holder.pid} on"):
            cache_module.BuildLock(root, 0).__enter__()
        with cache_module.BuildLock(root, 1) as other_rank:  # another rank's lock is its own
            assert other_rank.note is None
    finally:
        holder.communicate("\n", timeout=30)
    with cache_module.BuildLock(root, 0) as lock:
        assert lock.note is None
    assert json.dumps((root / ".lock-r0").read_text()) == '""'


@pytest.mark.slow
def test_two_ranks_write_their_own_shards_under_their_own_locks_and_train_from_them(tmp_path):
    """`torchrun --nproc-per-node 2 -m kdgraph cache`: each rank writes its shards and its
    checksums under its own lock; rank 0's header, written last, holds all four checksums
    (hashed here from the files); training under the same torchrun replays them."""
    from _runtime_helpers import ROOT

    path = write_spec(_spec_dict(tmp_path, "run"), tmp_path / "s.yaml")
    for command in (["cache", str(path), "--epochs", "2", "--full", "--quiet"], ["train", str(path), "--quiet"]):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "kdgraph", *command],
                             cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    root = tmp_path / "cache"
    header = read_header(root)
    assert header["complete"] and header["key"]["ranks"]["value"] == 2
    assert sorted(header["shards"]) == ["e0000-r0.npy", "e0000-r1.npy", "e0001-r0.npy", "e0001-r1.npy"]
    for name, sha in header["shards"].items():
        assert sha == hashlib.sha256(np.load(root / name).tobytes()).hexdigest()
    assert [(root / f".lock-r{r}").read_text() for r in range(2)] == ["", ""]
    assert (tmp_path / "run" / "student.safetensors").exists()
