"""bench/h100_stats.py against scipy on the committed H100 rows: the Welch p and the 95 % CI of a
difference, the main rows it selects (3 seeds, the sweep and stability rows left out), and a
stability ratio recomputed from the raw per-step records."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import h100_stats  # noqa: E402  (bench/ is not a package)

stats = pytest.importorskip("scipy.stats")


def test_contrasts_match_scipy():
    rows = h100_stats.load()
    g = h100_stats.main_rows(rows)
    assert all(len(v) == 3 for v in g.values()) and len(g) == 12  # 3 methods x 2 fractions x 2 budgets
    assert sorted(g[("kd", 1.0, 1)]) == [91.36, 91.37, 91.47]  # the lr sweep's seed-0 rows are not main rows
    a, b = g[("kd", 0.2, 2)], g[("kd", 0.2, 1)]
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    half = stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    d = statistics.fmean(a) - statistics.fmean(b)
    line = next(ln for ln in h100_stats.contrasts(rows) if "KD x2 (30 ep) − KD x1" in ln)
    assert f"| {d:+.2f} | {d - half:+.2f} … {d + half:+.2f} | {p:.3g} |" in line


def test_stability_ratio_from_the_raw_steps():
    rows = h100_stats.load()
    runs = {r["method"]: r["stability"] for r in rows if r.get("track")}
    kd = statistics.median(s["dtheta_block1"] for s in runs["kd"])
    s50 = statistics.median(s["dtheta_block1"] for s in runs["stablekd-5/0"])
    whole = next(ln for ln in h100_stats.stability_ratios(rows) if ln.startswith("| whole run"))
    assert whole.split(" | ")[1] == f"{kd / s50:.2f}×"
