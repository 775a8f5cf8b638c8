"""The statistics behind BENCHMARKS.md's H100 section (issue 38's audit), from its committed raw
rows (bench/results/stablekd-study-full.jsonl): Welch's t test (two-sided; kdgraph.sweep.welch)
and the 95 % CI of each difference the section states, and the ratio of KD's per-step parameter
distance to StableKD-5/0's per block and window (the stability runs: one seed each).

Main rows: KD and KD + MSE at OneCycle 0.1, StableKD-5/2 at peak 0.5 (fixed in advance; KD's
lr sweep on seed 0's test split kept 0.1), seeds 0-2, teacher 92.83 %. There is no validation
split in this study; the rows with an ``lr`` field (the KD sweep, the stability runs) are not
main rows.

    python bench/h100_stats.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from kdgraph.sweep import t_quantile, welch

ROWS = Path(__file__).resolve().parent / "results" / "stablekd-study-full.jsonl"
SK, KD, MSE = "stablekd-5/2", "kd", "kd+mse"
# (label, (method, fraction, budget multiple) a, the same b)
CONTRASTS = [
    *[(f"{f:.0%} data, x{x}: {a} − {b}", (a, f, x), (b, f, x))
      for f in (0.2, 1.0) for x in (1, 2) for a, b in ((SK, KD), (SK, MSE), (MSE, KD))],
    ("(b) 20 %: KD x2 (30 ep) − KD x1 (15 ep)", (KD, 0.2, 2), (KD, 0.2, 1)),
    ("(b) 20 %: StableKD-5/2 x1 (15 ep) − KD x2 (30 ep)", (SK, 0.2, 1), (KD, 0.2, 2)),
    ("(b) 20 %: StableKD-5/2 x2 − x1", (SK, 0.2, 2), (SK, 0.2, 1)),
    ("(c) x1: KD 100 % − KD 20 %", (KD, 1.0, 1), (KD, 0.2, 1)),
    ("(c) x1: StableKD-5/2 100 % − 20 %", (SK, 1.0, 1), (SK, 0.2, 1)),
    ("(c) x2: KD 100 % − StableKD-5/2 20 %", (KD, 1.0, 2), (SK, 0.2, 2)),
]


def main_rows(rows: list[dict]) -> dict[tuple, list[float]]:
    """Test top-1 by (method, fraction, budget multiple) of the main comparison's rows."""
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("method") not in (SK, KD, MSE) or "lr" in r:
            continue
        out[(r["method"], r["fraction"], r["mult"])].append(r["top1"])
    return out


def diff_ci(a: list[float], b: list[float]) -> tuple[float, float]:
    """The Welch 95 % interval of mean(a) - mean(b)."""
    w = welch(a, b)
    half = t_quantile(0.975, w["df"]) * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return w["diff"] - half, w["diff"] + half


def contrasts(rows: list[dict]) -> list[str]:
    g = main_rows(rows)
    out = ["| comparison | a (n) | b (n) | Δ | 95 % CI of Δ | p (Welch) |", "|---|---|---|---|---|---|"]
    for label, ka, kb in CONTRASTS:
        a, b = g[ka], g[kb]
        w, (lo, hi) = welch(a, b), diff_ci(a, b)
        out.append(f"| {label} | {statistics.fmean(a):.2f} ({len(a)}) | {statistics.fmean(b):.2f} ({len(b)}) | "
                   f"{w['diff']:+.2f} | {lo:+.2f} … {hi:+.2f} | {w['p']:.3g} |")
    return out


def stability_ratios(rows: list[dict]) -> list[str]:
    """KD's median per-step ||Δθ|| over StableKD-5/0's, per block and window (bench/stablekd_study.py's
    windows: the first 50 steps, epoch 1, the whole run)."""
    tracked = {r["method"]: r for r in rows if r.get("track")}
    meds = {}
    for method in (KD, "stablekd-5/0"):
        r = tracked[method]
        steps = r["stability"]
        per_epoch = len(steps) // r["epochs"]
        for name, window in (("first 50 steps", steps[:50]), ("epoch 1", steps[:per_epoch]), ("whole run", steps)):
            meds[(method, name)] = [statistics.median(s[f"dtheta_block{b}"] for s in window) for b in range(1, 6)]
    out = ["| window | " + " | ".join(f"block {b}" for b in range(1, 5)) + " | head | range |", "|---" * 7 + "|"]
    for name in ("first 50 steps", "epoch 1", "whole run"):
        ratios = [k / s for k, s in zip(meds[(KD, name)], meds[("stablekd-5/0", name)])]
        out.append(f"| {name} | " + " | ".join(f"{x:.2f}×" for x in ratios) +
                   f" | {min(ratios):.2f}–{max(ratios):.2f}× |")
    return out


def load(path: Path = ROWS) -> list[dict]:
    import ast

    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    for r in rows:  # the stability runs stored their per-step records as a Python literal string
        if isinstance(r.get("stability"), str):
            r["stability"] = ast.literal_eval(r["stability"])
    return rows


def main() -> None:
    rows = load(Path(sys.argv[1]) if len(sys.argv) > 1 else ROWS)
    print("**Differences** (test top-1 points; seeds 0-2)\n")
    print("\n".join(contrasts(rows)))
    print("\n**Stability**: KD's median per-step ||Δθ|| ÷ StableKD-5/0's (x2, 100 %, lr 0.1, seed 0, one run each)\n")
    print("\n".join(stability_ratios(rows)))


if __name__ == "__main__":
    main()
