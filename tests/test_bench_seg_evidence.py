"""bench/seg_evidence.py: every arm's spec is valid and trains at equal steps; the report's means,
standard deviations and Welch p-values against scipy's."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seg_evidence  # noqa: E402

from kdgraph.spec import load_spec  # noqa: E402


def test_every_arm_is_a_valid_spec_at_equal_steps(tmp_path):
    specs = {arm: load_spec(seg_evidence.SPEC, [*o, f"output={tmp_path / arm}"]) for arm, o in seg_evidence.ARMS.items()}
    assert specs["no-kd"].teacher is None and specs["no-kd"].schedule.method == "supervised"
    assert {s.loss.dense for a, s in specs.items() if a != "no-kd"} == {"pixel_kl", "cwd"}
    assert specs["cwd+pkd"].loss.feature == "pkd" and specs["cwd+pkd"].schedule.method == "kd+mse"
    steps = {(s.schedule.epochs, s.data.batch_size, s.data.fraction, s.optim.lr, s.optim.lr_schedule)
             for s in specs.values()}
    assert len(steps) == 1  # the same epochs, batches, data and schedule in every arm
    teacher = load_spec(seg_evidence.TEACHER_SPEC, [f"output={tmp_path / 't'}"])
    assert teacher.task == "dense" and teacher.student.model == specs["cwd"].teacher.model


def test_the_report_matches_scipy():
    base, cwd = [11.0, 12.5, 10.9], [18.1, 17.2, 19.4]
    rows = {"teacher": {"key": "teacher", "arm": "teacher", "miou": 54.3, "pixel_acc": 82.5}}
    for arm, values in (("no-kd", base), ("cwd", cwd)):
        for seed, v in enumerate(values, start=1):
            rows[f"{arm}/s{seed}"] = {"key": f"{arm}/s{seed}", "arm": arm, "seed": seed, "miou": v, "pixel_acc": 60.0}
    text = seg_evidence.report(rows)
    line = next(x for x in text.splitlines() if x.startswith("| cwd |"))
    p = stats.ttest_ind(cwd, base, equal_var=False).pvalue
    assert f"{statistics.fmean(cwd):.2f} ± {statistics.stdev(cwd):.2f}" in line
    assert f"{statistics.fmean(cwd) - statistics.fmean(base):+.2f}" in line
    assert float(line.rstrip(" |").rsplit("|", 1)[1]) == pytest.approx(p, rel=2e-3)
    assert "| pixel-kl | 0 | not run |" in text and "| teacher" in text and "54.30" in text
