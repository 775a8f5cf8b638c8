"""bench/throughput.py's committed CPU rows against the table docs/benchmarks.md quotes from them."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_table_is_the_committed_rows():
    """Each method's ratio to the loop (2 decimals) and the loop's and kd's aten ops, as in
    bench/results/throughput-cpu-b64.jsonl; no absolute CPU figure is quoted."""
    rows = {r["method"]: r for r in map(json.loads, (ROOT / "bench/results/throughput-cpu-b64.jsonl").read_text().splitlines())}
    assert set(rows) == {"loop", "kd", "decomposed", "merged"} and {r["batch"] for r in rows.values()} == {64}
    ratios = " | ".join(f"{rows[m]['ratio_to_loop']:.2f}×" for m in ("kd", "decomposed", "merged"))
    line = f"| resnet34→resnet18 @32 | {ratios} | {rows['loop']['aten_ops']} / {rows['kd']['aten_ops']} |"
    text = (ROOT / "docs/benchmarks.md").read_text()
    assert line in text
    assert f"{rows['loop']['images_per_s']}" not in text


def test_the_lm_ratios_in_the_docs_are_the_committed_rows():
    """docs/tasks/causal-lm.md's three kdgraph/loop ratios are the committed rows' (15 rounds each)."""
    rows = [json.loads(line) for line in (ROOT / "bench/results/lm-throughput-cpu-after-lmspeed.jsonl").read_text().splitlines()]
    kd = [r for r in rows if r["runner"] == "kdgraph"]
    assert len(kd) == 3 and all(r["rounds"] == 15 for r in rows)
    quoted = ", ".join(f"{r['ratio_to_loop']:.3f}×" for r in kd[:2]) + f" and {kd[2]['ratio_to_loop']:.3f}×"
    assert quoted in " ".join((ROOT / "docs/tasks/causal-lm.md").read_text().split())
