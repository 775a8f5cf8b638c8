"""Replaying a teacher cache (``kdgraph.runtime.replay``, issue 39): a shard is checked before
any of its rows is used (its .npy dtype and shape against the header's, its size, the SHA-256
of its rows against the build's) and the teacher's weights against the header's; each damage
is one line naming the shard and what differs, never a traceback or a NaN loss."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _runtime_helpers import tiny_spec, write_spec
from kdgraph.compiler import resolve_run
from kdgraph.errors import KDGraphError
from kdgraph.runtime import replay
from kdgraph.runtime.cache import build_cache
from kdgraph.runtime.replay import TeacherCache
from kdgraph.spec import load_spec
from kdgraph.teacher_cache import read_header, shard_path, write_header


def _spec_dict(root, out, cache, epochs=2):
    d = tiny_spec(root / out, method="kd", epochs=epochs)
    d["teacher"]["cache"] = str(cache)
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    build_cache(load_spec(_spec_dict(tmp, "b", tmp / "full")), 2, full=True, quiet=True)
    build_cache(load_spec(_spec_dict(tmp, "b", tmp / "topk")), 2, top_k=3, quiet=True)
    return tmp


def _copy(built, tmp_path, name="full"):
    shutil.copytree(built / name, tmp_path / "cache")
    return tmp_path / "cache"


def _overwrite(path, rows):  # plausible floats: epoch 2's rows over epoch 1's, in place
    other = np.load(path.with_name("e0001-r0.npy"))
    a = np.load(path, mmap_mode="r+")
    a[5:9] = other[5:9]
    a.flush()


def _killed_in_place(path, rows):  # what a writer killed mid-write in place leaves: the tail zero
    a = np.load(path, mmap_mode="r+")
    a[40:] = 0
    a.flush()


def _truncate(path, rows):
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def _append(path, rows):
    path.write_bytes(path.read_bytes() + b"\0" * 40)


CORRUPTIONS = {
    "overwritten": (_overwrite, r"its rows' SHA-256 is [0-9a-f]{64}, the build wrote [0-9a-f]{64}: the shard changed"),
    "killed in place": (_killed_in_place, r"its rows' SHA-256 is"),
    "float64 zeros": (lambda p, rows: np.save(p, np.zeros(rows.shape)), r"holds <f8 \((\d+), 10\), the cache header "
                                                                         r"says <f4 \(\1, 10\)"),
    "wrong shape": (lambda p, rows: np.save(p, rows[:-1]), r"holds <f4 \(\d+, 10\), the cache header says <f4"),
    "truncated": (_truncate, r"bytes of rows, [\d,]+ expected \(truncated\)"),
    "appended": (_append, r"expected \(bytes appended\)"),
    "pickled object": (lambda p, rows: p.write_bytes(pickle.dumps({"logits": rows})), r"not a \.npy array"),
    "torch.save": (lambda p, rows: torch.save({"logits": torch.from_numpy(np.array(rows))}, p), r"not a \.npy array"),
    "object array": (lambda p, rows: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                     r"holds \|O \(1,\)"),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_a_damaged_shard_is_refused_before_any_row_is_used(built, tmp_path, damage):
    root = _copy(built, tmp_path)
    path = shard_path(root, 0, 0)
    fn, message = CORRUPTIONS[damage]
    fn(path, np.load(path))
    cache = TeacherCache(root, 0, 1, 16, torch.device("cpu"))
    with pytest.raises(KDGraphError, match=message) as err:
        cache.batch(0, 0, 16)
    assert str(err.value).startswith(f"{path} (teacher cache shard): ") and "\n" not in str(err.value)
    cache.batch(1, 0, 16)  # the other epoch's shard is whole


def test_a_topk_shard_in_a_full_cache_names_both_dtypes(built, tmp_path):
    root = _copy(built, tmp_path)
    shutil.copy(shard_path(built / "topk", 0, 0), shard_path(root, 0, 0))
    with pytest.raises(KDGraphError, match=r"holds \[\('p', '<f2', \(3,\)\), \('i', '<u2', \(3,\)\)\] \(\d+,\), the "
                                           r"cache header says <f4 \(\d+, 10\)"):
        TeacherCache(root, 0, 1, 16, torch.device("cpu")).batch(0, 0, 16)


def test_a_shard_the_header_holds_no_checksum_for_is_refused(built, tmp_path):
    root = _copy(built, tmp_path)
    header = read_header(root)
    header.pop("format"), header.pop("kind")
    write_header(root, {**header, "shards": {}})
    with pytest.raises(KDGraphError, match="the cache header holds no checksum for it"):
        TeacherCache(root, 0, 1, 16, torch.device("cpu")).batch(0, 0, 16)


@pytest.mark.parametrize("whole", [True, False], ids=["read-whole", "hashed-then-mapped"])
def test_replayed_rows_are_the_shards_and_a_large_shard_is_checked_too(built, tmp_path, monkeypatch, whole):
    """Above READ_WHOLE_BYTES the shard is hashed streaming and memory-mapped: the same rows,
    the same refusal of overwritten bytes."""
    if not whole:
        monkeypatch.setattr(replay, "READ_WHOLE_BYTES", 0)
    for name in ("full", "topk"):
        cache = TeacherCache(built / name, 0, 1, 16, torch.device("cpu"))
        rows = np.load(shard_path(built / name, 1, 0))
        got = cache.batch(1, 2, 16)
        if name == "full":
            assert isinstance(cache._shards[1], np.memmap) != whole
            assert torch.equal(got, torch.from_numpy(rows[32:48]))
        else:
            assert torch.equal(got[0], torch.from_numpy(rows["p"][32:48]))
            assert torch.equal(got[1], torch.from_numpy(rows["i"][32:48].astype(np.int64)))
    root = _copy(built, tmp_path)
    _overwrite(shard_path(root, 0, 0), None)
    with pytest.raises(KDGraphError, match="SHA-256"):
        TeacherCache(root, 0, 1, 16, torch.device("cpu")).batch(0, 0, 16)


@pytest.mark.parametrize("damage", ["float64 zeros", "overwritten"])
def test_training_from_a_damaged_cache_is_one_line_exit_2_not_a_nan_advice(built, tmp_path, damage):
    from cli.main import app

    root = _copy(built, tmp_path)
    path = shard_path(root, 0, 0)
    CORRUPTIONS[damage][0](path, np.load(path))
    spec = write_spec(_spec_dict(tmp_path, "run", root), tmp_path / "s.yaml")
    result = CliRunner().invoke(app, ["train", str(spec)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "(teacher cache shard)" in result.output and "optim.lr" not in result.output
    assert "Traceback" not in result.output


def test_the_teachers_weights_are_checked_at_replay(built, monkeypatch):
    """Other weights under the same key (a pretrained download changed; here the rebuilt
    teacher perturbed): refused naming both SHA-256s. The same weights: accepted."""
    import kdgraph.models

    spec = load_spec(_spec_dict(built, "t", built / "full"))
    TeacherCache(built / "full", 0, 1, 16, torch.device("cpu"), run=resolve_run(spec))
    build_model = kdgraph.models.build_model

    def perturbed(*args, **kw):
        model = build_model(*args, **kw)
        with torch.no_grad():
            model.fc.bias.add_(1e-3)
        return model

    monkeypatch.setattr(kdgraph.models, "build_model", perturbed)
    with pytest.raises(KDGraphError, match=r"built from other teacher weights \(SHA-256 [0-9a-f]{64} then, "
                                           r"[0-9a-f]{64} now\)"):
        TeacherCache(built / "full", 0, 1, 16, torch.device("cpu"), run=resolve_run(spec))


def test_the_header_is_read_once_for_planning_training_and_replay(built, monkeypatch):
    """The compiler (the cache's mode, its key), the trainer and the replay see one header,
    parsed and checked once while the file is unchanged."""
    import kdgraph.teacher_cache as tc
    from kdgraph.runtime.loop import Trainer

    monkeypatch.setattr(tc, "_READ", {})
    parsed = []
    parse = tc._parse_header
    monkeypatch.setattr(tc, "_parse_header", lambda *a: parsed.append(a[1]) or parse(*a))
    trainer = Trainer.from_spec(load_spec(_spec_dict(built, "t", built / "topk")))
    assert trainer.cache is not None and parsed == [built / "topk" / "header.json"]
    header = built / "topk" / "header.json"
    header.write_text(header.read_text() + " ")  # changed on disk: read again
    read_header(built / "topk")
    assert len(parsed) == 2


def test_training_data_rewritten_behind_the_stat_is_refused_at_replay(tmp_path):
    """Two same-size images of two classes swapped byte for byte in place, their mtimes put
    back: the files' stat (the key) is unchanged, so planning accepts; the decoded training
    split's SHA-256 differs, so training refuses before its first step."""
    import os

    from PIL import Image

    from kdgraph.compiler import compile_spec

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("ant", "bee")):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(6):
                pixels = (rng.random((8, 8)) * 255 * (0.3 + 0.7 * c)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp_path / "images" / split / cls / f"{i}.bmp")
    d = tiny_spec(tmp_path / "b", method="kd", epochs=1, fraction=1.0, batch_size=4,
                  data={"dataset": "imagefolder", "root": str(tmp_path / "images"), "input_size": [1, 8, 8]})
    d["student"]["kwargs"]["num_classes"] = d["teacher"]["kwargs"]["num_classes"] = 2
    d["teacher"]["cache"] = str(tmp_path / "cache")
    build_cache(load_spec(d), 1, full=True, quiet=True)
    a, b = tmp_path / "images" / "train" / "ant" / "0.bmp", tmp_path / "images" / "train" / "bee" / "0.bmp"
    times = {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)}
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert len(data_a) == len(data_b) and data_a != data_b
    with open(a, "r+b") as f:  # in place: the same inode
        f.write(data_b)
    with open(b, "r+b") as f:
        f.write(data_a)
    for p, (at, mt) in times.items():
        os.utime(p, ns=(at, mt))
    compile_spec(load_spec(d), materialize=False)  # the stat key cannot see it
    from kdgraph.runtime.loop import Trainer

    with pytest.raises(KDGraphError, match=r"was built from other training data \(the decoded training split's "
                                           r"SHA-256 [0-9a-f]{64} then, [0-9a-f]{64} now\)"):
        Trainer.from_spec(load_spec(d))
    with pytest.raises(KDGraphError, match="holds a cache built from other training data"):
        build_cache(load_spec(d), 2, full=True, quiet=True)  # nor extended with shards of the new data


def test_a_cache_read_at_another_number_of_ranks_or_batch_size_is_refused(built):
    """Its rows are each rank's batches in order: a run of other ranks (a --reshard resume) or of
    another batch size would read other samples' logits; both are one-line refusals."""
    root = built / "full"
    TeacherCache(root, 0, 1, 16, torch.device("cpu"))  # as built
    with pytest.raises(KDGraphError, match=r"built on 1 rank\(s\); this run has 2: rebuild it") as err:
        TeacherCache(root, 0, 2, 8, torch.device("cpu"))
    assert "\n" not in str(err.value)
    with pytest.raises(KDGraphError, match="built with batch size 16, this run has 8"):
        TeacherCache(root, 0, 1, 8, torch.device("cpu"))
