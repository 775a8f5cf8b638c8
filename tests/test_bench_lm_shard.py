"""bench/lm_shard.py at its tiniest setting (2 gloo ranks, the tiny pair, 2 steps per mode).

Independent truth: the per-rank bytes it prints, measured from the tensors each rank holds,
against kdgraph.lm.memory's arithmetic computed here (``Decoder.parameters`` and ``per_rank``):
under DDP every rank holds the whole student (float32 weights 4n, gradients 4n, AdamW's two
moments 8n) and teacher (4m); sharded, each rank holds exactly half of each (every tensor's
first dimension is even, so FSDP2's dim-0 shards are equal). The two modes train the same
steps (the sharded student computes in float32), so their last losses agree.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _runtime_helpers import ROOT, cli_env
from kdgraph.lm.memory import Decoder, Pair, per_rank

# bench/lm_shard.py's "tiny" shapes, written out: student and teacher 2 layers, width 32, MLP 64, 2 heads
TINY = Decoder(vocab=256, hidden=32, intermediate=64, layers=2, heads=2, kv_heads=2)
TOKENS = 2 * 8  # 2 windows of 8 tokens per rank


def _rows(stdout: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| tiny |")]
    return rows


@pytest.mark.slow
def test_tiny_bench_prints_the_memory_models_bytes_halved_by_sharding(tmp_path):
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "rows.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "lm_shard.py"), "--configs", "tiny", "--steps", "2",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = TINY.parameters()
    assert n == 2 * (2 * 32 * 32 + 2 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 2 * 256 * 32 + 32  # by hand
    pair = Pair(TINY, TINY, compute_dtype="float32", teacher_dtype="float32")
    whole, half = per_rank(pair, 1, TOKENS), per_rank(pair, 2, TOKENS)
    want = {"ddp": (4 * n, whole.gradients, whole.optimizer, 4 * n),
            "sharded": (4 * n // 2, half.gradients, half.optimizer, 4 * n // 2)}
    assert want["ddp"] == (4 * n, 4 * n, 8 * n, 4 * n) and want["sharded"] == (2 * n, 2 * n, 4 * n, 2 * n)
    rows = _rows(res.stdout)
    assert [(r[1], r[2]) for r in rows[:4]] == [("ddp", "0"), ("ddp", "1"), ("sharded", "0"), ("sharded", "1")]
    for row in rows[:4]:
        w, g, o, teacher = (int(row[i]) for i in (3, 4, 5, 7))
        assert (w, g, o, teacher) == want[row[1]], row
        assert row[6] == " / ".join(map(str, want[row[1]][:3])) and int(row[8]) == want[row[1]][3]
        assert float(row[9]) > 0 and float(row[10]) > 0
    assert rows[4][1] == "sharded / ddp" and rows[4][10].endswith(" x")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["config"], r["mode"], r["ranks"]) for r in lines] == [("tiny", "ddp", 2), ("tiny", "sharded", 2)]
    for line in lines:
        assert [tuple(h[k] for k in ("weights", "gradients", "optimizer", "teacher")) for h in line["held"]] == \
            [want[line["mode"]]] * 2
    # float32 sharding trains what DDP trains: the ranks' mean loss of the last step agrees
    assert abs(lines[0]["loss"] - lines[1]["loss"]) < 1e-4 * abs(lines[0]["loss"])
