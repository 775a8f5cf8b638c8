"""The teacher cache of a causal-LM pair (issue 37 item 3): per token position of each packed
window, the teacher's top-k probabilities (fp16) and ids (uint16, uint32 past 65,536 ids), or
its full logits; replayed by the token loss.

Independent truths: the training windows cut here from the text's bytes in numpy's order for
(seed, epoch); the teacher's own forward on them (the whole transformers model, not kdgraph's
segments); FKD's spread-the-rest and the KL written out in float64 numpy; the file's size on
disk; an uninterrupted live run for the full cache's replay.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _runtime_helpers import train_here
from kdgraph.compiler import compile_spec
from kdgraph.errors import KDGraphError, SpecError
from kdgraph.runtime.cache import build_cache
from kdgraph.spec import load_spec
from kdgraph.teacher_cache import read_header, shard_path

SEQ = 16
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 12
TINY = float(np.finfo(np.float32).tiny)


def _kwargs(width: int, layers: int, vocab: int = 256) -> dict:
    return {"vocab_size": vocab, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _raw(tmp, out: str, cache: str | None, vocab: int = 256, **sections) -> dict:
    root = tmp / "text"
    if not root.exists():
        root.mkdir()
        (root / "dickens.txt").write_text(TEXT, encoding="utf-8")
    raw = {"name": "tiny-lm", "seed": 0, "output": str(tmp / out),
           "teacher": {"model": "transformers:llama", "kwargs": _kwargs(32, 2, vocab),
                       "cache": str(tmp / cache) if cache else None},
           "student": {"model": "transformers:llama", "kwargs": _kwargs(32, 1, vocab)},
           "data": {"dataset": "text", "root": str(root), "seq_len": SEQ, "batch_size": 8},
           "decompose": {"blocks": 1}, "schedule": {"method": "kd", "epochs": 2},
           "loss": {"ce_weight": 0.5},
           "optim": {"name": "adamw", "lr": 0.01, "lr_schedule": "constant"},
           "runtime": {"device": "cpu", "log_every": 1, "num_threads": 1}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _spec(tmp, out: str, cache: str | None, **kw):
    return load_spec(_raw(tmp, out, cache, **kw))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A top-64 and a full cache of the tiny pair's 2 epochs, and what building them reported."""
    tmp = tmp_path_factory.mktemp("lmcache")
    topk = build_cache(_spec(tmp, "b", "topk"), 2, top_k=64, quiet=True)
    full = build_cache(_spec(tmp, "b", "full"), 2, full=True, quiet=True)
    return tmp, topk, full


def _windows(epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s training windows in training order, cut from the bytes by hand."""
    data = np.frombuffer(TEXT.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    train = data[:len(data) - int(len(data) * 0.05)]
    n = (len(train) - 1) // SEQ
    order = np.random.default_rng([0, epoch]).permutation(n)
    used = n // 8 * 8  # full batches of 8
    return np.stack([train[i * SEQ:i * SEQ + SEQ + 1] for i in order[:used]])


def _teacher_logits(tmp, windows: np.ndarray) -> torch.Tensor:
    """The teacher as its spec builds it (seeded as a run is), its own forward on the windows' inputs."""
    torch.manual_seed(0)
    model = compile_spec(_spec(tmp, "t", None), fetch=("teacher",)).teacher.model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(windows[:, :-1])).double()


def _spread(probs: np.ndarray, ids: np.ndarray, vocab: int) -> np.ndarray:
    """FKD's marginal smoothing per row, written out: cached probabilities at their ids, the rest
    (at least 0) shared by the other ids; floored at float32's tiny."""
    out = np.empty((len(probs), vocab))
    for n, (p, i) in enumerate(zip(probs.astype(np.float64), ids)):
        out[n] = max(1.0 - p.sum(), 0.0) / (vocab - len(i))
        out[n, i] = p
    return np.maximum(out, TINY)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- what the cache holds ---------------------------------------------------------------------------

def test_each_token_of_each_window_holds_the_teachers_top_k(built):
    tmp, summary, _ = built
    rows = np.load(shard_path(tmp / "topk", 1, 0))
    windows = _windows(1)
    assert rows.shape == (len(windows), SEQ) and rows.dtype["i"].base == np.dtype("<u2")
    p = torch.softmax(_teacher_logits(tmp, windows), -1)
    want_p, want_i = p.topk(64, -1)
    assert np.array_equal(rows["i"].astype(np.int64), want_i.numpy())
    assert np.allclose(rows["p"].astype(np.float64), want_p.numpy(), rtol=1e-3, atol=1e-6)
    assert summary.per == "token" and summary.rows_per_epoch == len(windows)


def test_at_k_64_a_token_takes_at_most_6k_plus_16_bytes_on_disk(built, tmp_path):
    """uint16 ids for 256 ids; uint32 ids past 65,536 (a 70,000-id pair): the shard file's bytes
    over its tokens, its .npy header included."""
    tmp, summary, _ = built
    shard = shard_path(tmp / "topk", 0, 0)
    tokens = summary.rows_per_epoch * SEQ
    assert shard.stat().st_size / tokens <= 6 * 64 + 16
    assert summary.bytes_per_image == 4 * 64  # 64 fp16 probabilities + 64 uint16 ids
    wide = build_cache(_spec(tmp_path, "w", "wide", vocab=70_000, data={"fraction": 0.25}), 1, top_k=64, quiet=True)
    rows = np.load(shard_path(tmp_path / "wide", 0, 0), mmap_mode="r")
    assert rows.dtype["i"].base == np.dtype("<u4") and int(rows["i"].max()) < 70_000
    assert wide.bytes_per_image == 6 * 64
    assert shard_path(tmp_path / "wide", 0, 0).stat().st_size / (wide.rows_per_epoch * SEQ) <= 6 * 64 + 16


def test_the_reported_kl_is_the_mean_kl_of_the_reconstruction_to_the_full_distribution(built):
    tmp, summary, _ = built
    kls = []
    for epoch in (0, 1):
        rows = np.load(shard_path(tmp / "topk", epoch, 0)).reshape(-1)
        p = _softmax(_teacher_logits(tmp, _windows(epoch)).numpy()).reshape(-1, 256)
        r = _spread(rows["p"], rows["i"].astype(np.int64), 256)
        kls.append((p * (np.log(p) - np.log(r))).sum(-1))
    assert summary.topk_kl == pytest.approx(float(np.concatenate(kls).mean()), rel=1e-3)
    assert "top-64 replay's mean KL to the full distribution" in str(summary)


# -- replay -----------------------------------------------------------------------------------------

def _steps(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_full_replay_trains_bit_for_bit_as_the_live_teacher(built):
    tmp, _, full = built
    assert full.mode == "full" and full.bytes_per_image == 4 * 256
    train_here(_spec(tmp, "replayed", "full"))
    train_here(_spec(tmp, "live", None))
    a, b = load_file(str(tmp / "replayed" / "student.safetensors")), load_file(str(tmp / "live" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("time", "images_per_s", "data_wait_share")
    assert [{k: v for k, v in r.items() if k not in strip} for r in _steps(tmp / "replayed")] == \
        [{k: v for k, v in r.items() if k not in strip} for r in _steps(tmp / "live")]


def test_topk_replay_is_the_token_loss_on_the_spread_top_k(built):
    """The first step's forward KL: the untrained student's logits on the first batch against
    the spread top-64 of the cache's rows 0..7, written out."""
    tmp, _, _ = built
    spec = _spec(tmp, "topk-run", "topk")
    torch.manual_seed(0)
    student = compile_spec(_spec(tmp, "s", None), fetch=("student",)).student.model.eval()
    first = _windows(0)[:8]
    with torch.no_grad():
        q = torch.log_softmax(student(torch.from_numpy(first[:, :-1])).double(), -1).numpy().reshape(-1, 256)
    rows = np.load(shard_path(tmp / "topk", 0, 0))[:8].reshape(-1)
    p = _spread(rows["p"], rows["i"].astype(np.int64), 256)
    want = float((p * (np.log(p) - q)).sum(-1).mean())
    train_here(spec)
    assert _steps(tmp / "topk-run")[0]["fkl"] == pytest.approx(want, abs=2e-6)


# -- the key: each field changed is refused, naming it ----------------------------------------------

class _OtherTokenizer:
    eos_token_id = 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def get_vocab(self):
        return {f"<0x{i:02X}>": i for i in range(256)}


def _changes(tmp) -> dict[str, tuple[dict, str]]:
    """key leaf -> (spec sections changed, what the refusal names)."""
    kw = _kwargs(32, 2)
    return {
        "teacher.kwargs": ({"teacher": {"kwargs": {**kw, "hidden_size": 64, "intermediate_size": 128}}}, "teacher"),
        "teacher.dtype": ({"teacher": {"dtype": "bfloat16"}}, r"teacher\.dtype"),
        "data.seq_len": ({"data": {"seq_len": 8}}, r"data\.seq_len \(16 then, 8 now\)"),
        "data.fraction": ({"data": {"fraction": 0.5}}, r"data\.fraction \(1\.0 then, 0\.5 now\)"),
        "data.batch_size": ({"data": {"batch_size": 4}}, r"data\.batch_size \(8 then, 4 now\)"),
        "data.root": ({"data": {"root": str(tmp / "text2")}}, r"data\.root"),
        "seed": ({"seed": 1}, r"seed \(0 then, 1 now\)"),
        "runtime.precision": ({"runtime": {"precision": "bf16"}}, r"runtime\.precision"),
        "runtime.micro_batches": ({"runtime": {"micro_batches": 2}}, r"runtime\.micro_batches \(1 then, 2 now\)"),
        "mode.temperature": ({"loss": {"temperature": 2.0}}, r"mode\.temperature \(1\.0 then, 2\.0 now\)"),
        "mode.vocab": ({"student": {"kwargs": {**_kwargs(32, 1), "vocab_size": 300}}}, r"mode\.vocab \(256 then, 300 now\)"),
    }


@pytest.mark.parametrize("leaf", sorted(_changes(__import__("pathlib").Path("/unused"))))
def test_each_field_of_the_key_changed_is_refused(built, leaf):
    tmp, _, _ = built
    if not (tmp / "text2").exists():  # the same text elsewhere
        (tmp / "text2").mkdir()
        (tmp / "text2" / "dickens.txt").write_text(TEXT, encoding="utf-8")
    sections, named = _changes(tmp)[leaf]
    raw = _raw(tmp, "k", "topk")
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    with pytest.raises(SpecError, match=f"built for another run.*{named}"):
        compile_spec(load_spec(raw), fetch=())


def test_the_text_and_the_tokenizer_are_in_the_key(built, monkeypatch):
    tmp, _, _ = built
    spec = _spec(tmp, "k", "topk")
    monkeypatch.setattr("kdgraph.lm.text.tokenizer_of", lambda data: _OtherTokenizer())
    with pytest.raises(SpecError, match=r"data_files\.tokenizer"):
        compile_spec(spec, fetch=())
    monkeypatch.undo()
    compile_spec(spec, fetch=())  # as built
    (tmp / "text3").mkdir()
    (tmp / "text3" / "dickens.txt").write_text(TEXT + "More.", encoding="utf-8")
    raw = _raw(tmp, "k", "topk")
    with pytest.raises(SpecError, match=r"data_files\.sources"):
        compile_spec(load_spec({**raw, "data": {**raw["data"], "root": str(tmp / "text3")}}), fetch=())


def test_the_mode_and_k_and_the_epochs_are_checked(built):
    tmp, _, _ = built
    with pytest.raises(KDGraphError, match=r"mode\.k \(64 then, 8 now\)"):
        build_cache(_spec(tmp, "b", "topk"), 2, top_k=8, quiet=True)
    with pytest.raises(KDGraphError, match=r'mode\.mode \("topk" then, "full" now\)'):
        build_cache(_spec(tmp, "b", "topk"), 2, full=True, quiet=True)
    with pytest.raises(SpecError, match="holds the first 2 epoch"):
        compile_spec(_spec(tmp, "k", "topk", schedule={"epochs": 3}), fetch=())


def test_the_ranks_are_checked_at_replay(built):
    from kdgraph.runtime.replay import TeacherCache

    tmp, _, _ = built
    assert read_header(tmp / "topk")["key"]["ranks"]["value"] == 1
    with pytest.raises(KDGraphError, match="built on 1 rank"):
        TeacherCache(tmp / "topk", 0, 2, 8, torch.device("cpu"))


def _leaves(value, prefix: str) -> set[str]:
    if isinstance(value, dict) and prefix != "teacher.kwargs":
        return {p for k, v in value.items() for p in _leaves(v, f"{prefix}.{k}")} or {prefix}
    return {prefix}


def test_every_leaf_a_token_cache_adds_to_the_key_is_one_a_test_changes(built):
    """Past the image key's leaves (tests/test_teacher_cache.py changes each of those), a token
    cache's key holds the text's sources, its tokenizer and the width: each changed above."""
    from kdgraph.spec.schema import DataSpec

    tmp, _, _ = built
    key = read_header(tmp / "topk")["key"]
    leaves = set().union(*(_leaves(f["value"], name) for name, f in key.items()))
    image = ({f"data.{f}" for f in DataSpec.model_fields if f not in ("augment", "test_batch_size")}
             | {f"teacher.{f}" for f in key["teacher"]["value"]} | {f"runtime.{f}" for f in key["runtime"]["value"]}
             | {f"normalisation.{f}" for f in key["normalisation"]["value"]}
             | {"augmentation", "seed", "ranks", "mode.mode", "mode.k", "mode.temperature"})
    assert leaves - image == {"data_files.sources", "data_files.tokenizer", "mode.vocab"}
    assert "mode.vocab" in _changes(tmp)  # the other two: test_the_text_and_the_tokenizer_are_in_the_key


def test_text_rewritten_with_its_size_and_mtime_put_back_is_refused_at_replay(tmp_path):
    """The stat key cannot see it; the replay hashes the training split's tokens."""
    build_cache(_spec(tmp_path, "b", "c", data={"fraction": 0.25}, schedule={"epochs": 1}), 1, top_k=4, quiet=True)
    path = tmp_path / "text" / "dickens.txt"
    st = path.stat()
    path.write_text(TEXT.replace("best", "BEST"), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    from kdgraph.runtime.loop import Trainer

    with pytest.raises(KDGraphError, match="other training data"):
        Trainer.from_spec(_spec(tmp_path, "fresh", "c", data={"fraction": 0.25}, schedule={"epochs": 1}))


def test_a_teacher_narrower_than_the_student_is_refused_before_anything_is_written(tmp_path):
    spec = _spec(tmp_path, "b", "c", student={"model": "transformers:llama", "kwargs": _kwargs(32, 1, 300)})
    with pytest.raises(KDGraphError, match="the teacher's logits have 256 ids, the student's 300"):
        build_cache(spec, 1, top_k=4, quiet=True)
    assert not (tmp_path / "c").exists()
