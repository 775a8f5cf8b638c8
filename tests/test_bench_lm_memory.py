"""bench/lm_memory.py --measure: the shapes it builds round-trip through transformers' configs to
the memory model's, its prediction is kdgraph.lm.memory's per_rank for those shapes (and, for the
tiny pair, the activation arithmetic written out here), and on the CPU the peak is reported as
not measured (None), never faked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import lm_memory  # noqa: E402  (bench/ is not a package)

from kdgraph.lm.memory import Pair, per_rank  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("size", list(lm_memory.SIZES))
def test_shapes_round_trip_through_transformers_configs(family, size):
    for shape in lm_memory.SIZES[size]:
        config = transformers.AutoConfig.for_model(family, **lm_memory.config_kwargs(shape, 1024))
        assert lm_memory.decoder_of(config) == shape
        assert config.max_position_embeddings == 1024


def test_default_pair_is_qwen25_half_and_one_and_a_half_billion():
    student, teacher = lm_memory.SIZES["qwen2.5-0.5b+1.5b"]
    assert (student.hidden, student.layers, teacher.hidden, teacher.layers) == (896, 24, 1536, 28)
    assert student.vocab == teacher.vocab  # the spec pairs them with no vocabulary trimming


def test_measure_on_the_cpu_predicts_and_does_not_measure(tmp_path, capsys):
    out = tmp_path / "memory.jsonl"
    lm_memory.main(["--measure", "--size", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32",
                    "--steps", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["checkpointing"] for r in rows] == [False, True]
    student, teacher = lm_memory.SIZES["tiny"]
    tokens = 2 * 32
    for row in rows:
        budget = per_rank(Pair(student, teacher, teacher_dtype="bfloat16"), 1, tokens, row["checkpointing"])
        assert row["tokens"] == tokens and row["predicted_bytes"] == budget.total
        assert row["predicted"]["activations"] == budget.activations
        assert row["measured_bytes"] is None and row["ratio"] is None and row["device"] == "cpu"
        assert math.isfinite(row["loss"])
    # written out: per layer 64 tokens x (6 x 64 + 2 x (2 kv heads x 16) + 4 x 128) elements, bf16;
    # the float32 logits of both models (vocab 512 each)
    per_layer = tokens * (6 * 64 + 2 * 32 + 4 * 128)
    logits = 4 * tokens * (512 + 512)
    assert rows[0]["predicted"]["activations"] == 2 * 2 * per_layer + logits
    assert rows[1]["predicted"]["activations"] == 2 * (2 * tokens * 64 + per_layer) + logits
    # float32 student weights, float32 gradients, AdamW's two moments; the bf16 teacher
    assert rows[0]["predicted"]["optimizer"] == 2 * rows[0]["predicted"]["gradients"] == 8 * student.parameters()
    assert rows[0]["predicted"]["teacher_weights"] == 2 * teacher.parameters()
    assert capsys.readouterr().out.count("peak not measured on the CPU") == 2
