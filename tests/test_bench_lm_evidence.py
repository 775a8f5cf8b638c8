"""bench/lm_evidence.py, the issue-36 causal-LM grid, without training: every arm's spec is
valid and has a validation split, chosen on validation bits per byte (lower is better) with
seed 0 and reported with seeds 1-3; ce trains without a teacher, the divergences are the ones
named, the hidden-state arms decompose at every student layer, the followers train at fkl's
choice, and every arm reads the same windows (equal tokens). The report writer is checked on
rows written here."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytest
import scipy.stats as stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import lm_evidence  # noqa: E402  (bench/ is not a package)


def _sweep(tmp_path):
    return lm_evidence.build(argparse.Namespace(work=str(tmp_path / "w"), results=str(tmp_path / "r.jsonl")))


def test_grid_definition(tmp_path):
    from kdgraph.spec import load_spec

    sweep = _sweep(tmp_path)
    sweep.check()  # every arm loads, with data.val_fraction > 0, on a causal_lm spec measuring bpb
    assert sweep.seeds == (0,) and sweep.report_seeds == (1, 2, 3) and sweep.baseline == "ce" and sweep.jobs == 1
    assert sweep.metric == "bpb" and sweep.higher_is_better is False
    assert sweep.waves == [["ce", "fkl"], ["rkl", "skl", "jsd", "fkl+mse", "stablekd"]]
    arms = {a.name: a for a in sweep.arms}
    assert all(arms[n].follow == "fkl" for n in ("rkl", "skl", "jsd", "fkl+mse", "stablekd"))
    assert sweep.count() == 2 * 3 + 7 * 3  # 2 swept arms x 3 lrs on seed 0, 7 arms x seeds 1-3
    specs = {}
    for name, arm in arms.items():
        target = arms[arm.follow] if arm.follow else arm
        cell = sweep.cell(arm, ((lm_evidence.LR, target.grid[0][1][1]),), 1)
        specs[name] = load_spec(lm_evidence.SPEC, [*cell.overrides, "seed=1"])
    assert specs["ce"].teacher is None and specs["ce"].schedule.method == "supervised"
    assert {n: (s.schedule.method, s.loss.token, s.decompose.blocks) for n, s in specs.items() if n != "ce"} == {
        "fkl": ("kd", "forward_kl", 1), "rkl": ("kd", "reverse_kl", 1), "skl": ("kd", "skew_kl", 1),
        "jsd": ("kd", "jsd", 1), "fkl+mse": ("kd+mse", "forward_kl", 3), "stablekd": ("stablekd", "forward_kl", 3)}
    assert specs["skl"].loss.skew_alpha == 0.1 and specs["jsd"].loss.jsd_beta == 0.5
    teacher = tmp_path / "w" / "teacher" / "student.safetensors"
    assert all(str(s.teacher.checkpoint) == str(teacher) for n, s in specs.items() if n != "ce")
    for s in specs.values():  # equal tokens: the same windows, epochs and batch in every arm
        assert (s.data.root, s.data.seq_len, s.data.batch_size, s.data.fraction, s.schedule.epochs) == (
            specs["ce"].data.root, 128, 8, 0.03, 2)
        assert s.data.val_fraction == 0.05 and s.task == "causal_lm" and s.runtime.num_threads == 1
    t = load_spec(lm_evidence.TEACHER_SPEC)
    assert t.data.val_fraction == 0.05 and t.data.root == specs["ce"].data.root and t.teacher is None
    assert t.data.seq_len == 128  # the same token file and splits: it never trains on validation or held-out text
    assert str(t.output_dir) != str(teacher.parent)  # the script trains it into WORK/teacher (an override)


def test_report_writer_on_rows(tmp_path):
    """The report of made-up rows: the teacher's line, ce and fkl chosen at the lowest validation
    bpb, the test table's means and stds from the rows, and what is still pending."""
    sweep = _sweep(tmp_path)
    val = {"0.002": 2.6, "0.005": 2.4, "0.01": 2.5}
    rows = {"teacher": {"key": "teacher", "arm": "teacher", "test_bpb": 2.0, "val_bpb": 2.1}}
    for wave in sweep.waves[:1]:
        while cells := sweep.pending(wave, rows):
            for c in cells:
                lr = dict(c.point)[lm_evidence.LR]
                rows[c.key] = {"key": c.key, "arm": c.arm, "seed": c.seed,
                               "val_bpb": val[lr] - (0.1 if c.arm == "fkl" else 0.0),
                               "test_bpb": 2.5 + 0.01 * c.seed - (0.1 if c.arm == "fkl" else 0.0)}
    text = lm_evidence.report_text(sweep, rows)
    assert "Teacher (4 layers, width 192): held-out 2.0000 bits per byte (validation 2.1000)" in text
    assert "- ce: optim.lr=0.002 → 2.6000, [optim.lr=0.005 → 2.4000], optim.lr=0.01 → 2.5000" in text
    mean, std = statistics.fmean([2.41, 2.42, 2.43]), statistics.stdev([2.41, 2.42, 2.43])
    assert f"| fkl | optim.lr=0.005 | 3 | {mean:.4f} ± {std:.4f} |" in text
    assert "| -0.1000 |" in text  # fkl - ce
    assert "12 cell(s) finished; not finished: rkl (3 of 3 report cells pending)" in text
    assert "stablekd (3 of 3 report cells pending)" in text
    assert "- fkl: 1: 2.4100, 2: 2.4200, 3: 2.4300" in text and "- rkl: none yet" in text
    assert "- ce: 1: 2.5100, 2: 2.5200, 3: 2.5300\n" in text  # the baseline: no test against itself
    assert "- fkl: 1: 2.4100, 2: 2.4200, 3: 2.4300\n" in text  # differences without spread: no paired test
    a, b = {1: 4.17, 2: 3.87, 3: 3.97, 4: 4.5}, {1: 4.23, 2: 3.94, 3: 4.03}
    ref = stats.ttest_rel([4.17, 3.87, 3.97], [4.23, 3.94, 4.03])
    got = lm_evidence.paired(a, b)
    assert got["n"] == 3 and got["t"] == pytest.approx(ref.statistic) and got["p"] == pytest.approx(ref.pvalue)
    assert got["diff"] == pytest.approx(-0.0633333) and lm_evidence.paired({1: 1.0}, {1: 2.0}) is None
    for c in sweep.pending(["ce", "fkl"], {}):  # before any row: nothing chosen
        assert c.seed == 0
    assert "not finished: ce (not chosen yet), fkl (not chosen yet), rkl (not chosen yet)" in \
        lm_evidence.report_text(sweep, {})
    nxt = sweep.pending(sweep.waves[1], rows)  # seed by seed: every arm's seed 1 first
    assert [(c.arm, c.seed) for c in nxt[:6]] == [("rkl", 1), ("skl", 1), ("jsd", 1), ("fkl+mse", 1),
                                                  ("stablekd", 1), ("rkl", 2)]
    assert all(dict(c.point) == {lm_evidence.LR: "0.005"} for c in nxt) and len(nxt) == 15


@pytest.mark.parametrize("flag", ["--dry-run"])
def test_dry_run_trains_nothing(tmp_path, flag, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lm_evidence.py", flag, "--work", str(tmp_path / "w"),
                                      "--results", str(tmp_path / "r.jsonl")])
    lm_evidence.main()
    assert "7 arms, 27 cells as given" in capsys.readouterr().out
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.jsonl").exists()
