"""The evidence study's reporting code runs on a tiny fake results file (bench/report.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "bench" / "report.py"


def _import_report():
    """bench/report.py itself, loaded from its path (no other module named report can stand in):
    a report that does not import fails the test, it is not skipped (its dependencies are
    kdgraph's own)."""
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _rows():
    rows = []
    for seed, (m, b, acc) in enumerate([("kd", 5, 80.0), ("kd", 5, 82.0), ("kd", 10, 90.0),
                                        ("stablekd-4/2", 5, 91.0), ("stablekd-4/2", 10, 93.0),
                                        ("supervised", 10, 85.0)]):
        rows.append({"cell": f"c{seed}", "pair": "narrow", "fraction": 0.2, "method": m, "budget": b,
                     "seed": seed, "lr": 0.1, "top1": acc, "teacher_top1": 99.0, "curve": [acc], "wall_s": 2.0})
    rows.append({"cell": "t", "pair": "narrow", "fraction": 1.0, "method": "kd", "budget": 10, "seed": 0,
                 "lr": 0.1, "top1": 95.0, "curve": [50.0, 95.0], "wall_s": 3.0, "track": True,
                 "stability": [0.3, 0.2, 0.1, 0.05]})
    return rows


def test_report_tables_and_plots(tmp_path):
    report = _import_report()
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    text = report.write_report(results, tmp_path / "missing.jsonl", tmp_path, "fake")
    agg = report.aggregate(report.load(results))
    assert agg[("narrow", 0.2, "kd", 5)] == (81.0, pytest.approx(1.4142135), 2)
    assert "| kd | 81.00 ± 1.41 (2) | 90.00 ± 0.00 (1) |" in text
    # KD's best is 90 at 10 epochs; StableKD reaches it at 5: a 2x speed-up; supervised never
    assert "| narrow | 20 % | 90.00 (10 ep) |" in text and "5 ep (2.0×)" in text and "not reached" in text
    assert (tmp_path / "accuracy-vs-epochs-fake.png").stat().st_size > 1000
    assert (tmp_path / "stability-fake.png").stat().st_size > 1000
    assert "median ||Δθ_head|| 0.1500 over 4 steps" in text
