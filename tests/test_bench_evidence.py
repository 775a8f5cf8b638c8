"""bench/evidence.py, the issue-38 grid, without training: every arm's spec is valid and has a
validation split, the waves put KD and StableKD-5/2 first and the controls next, the controls
train at the arms they name, and the selection/report seeds are 0 and 1-3."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evidence  # noqa: E402  (bench/ is not a package)


def test_grid_definition(tmp_path):
    from kdgraph.spec import load_spec

    sweep = evidence.build(argparse.Namespace(work=str(tmp_path / "w"), results=str(tmp_path / "r.jsonl")))
    sweep.check()  # every arm loads, with data.val_fraction > 0
    assert sweep.seeds == (0,) and sweep.report_seeds == (1, 2, 3) and sweep.baseline == "kd" and sweep.jobs == 1
    assert sweep.waves[0] == ["kd", "stablekd-5/2"] and sweep.waves[1] == ["kd+mse", "kd-cyclic"]
    arms = {a.name: a for a in sweep.arms}
    assert arms["kd+mse"].follow == "kd" and arms["kd-cyclic"].follow == "stablekd-5/2"
    assert sweep.count() == 6 * 3 + 8 * 3  # 6 swept arms x 3 lrs on seed 0, 8 arms x seeds 1-3
    teacher = f"teacher.checkpoint={tmp_path / 'w' / 'teacher' / 'student.safetensors'}"
    specs = {}
    for name, arm in arms.items():
        target = arms[arm.follow] if arm.follow else arm
        cell = sweep.cell(arm, ((evidence.LR, target.grid[0][1][1]),), 1)
        assert cell.overrides[0] == teacher
        specs[name] = load_spec(evidence.SPEC, [*cell.overrides, "seed=1"])
    assert {n: s.schedule.method for n, s in specs.items()} == {
        "kd": "kd", "stablekd-5/2": "stablekd", "kd+mse": "kd+mse", "kd-cyclic": "kd", "dist": "kd",
        "stablekd-5/2+dist": "stablekd", "dkd": "kd", "kd+ls": "kd"}
    assert specs["kd-cyclic"].optim.lr_schedule == specs["stablekd-5/2"].optim.lr_schedule == "stage_cyclic"
    assert specs["kd-cyclic"].loss.temperature == specs["kd"].loss.temperature == 4.0
    assert specs["stablekd-5/2+dist"].loss.logit == "dist" and specs["stablekd-5/2+dist"].schedule.recompositions == 2
    for s in specs.values():
        assert s.data.val_fraction == 0.1 and s.data.fraction == 0.2 and s.data.augment == "crop+flip"
        assert s.runtime.num_threads == 1 and s.schedule.epochs == 15
    t = load_spec(evidence.TEACHER_SPEC)
    assert t.data.val_fraction == 0.1 and t.seed == 0 and t.teacher is None  # never trains on seed 0's val split


def _committed_sweep():
    # the committed rows' cell keys name the grid's work folder (the teacher's checkpoint path)
    return evidence.build(argparse.Namespace(work="/work/grid/evidence-w8", results=str(evidence.COMMITTED)))


def test_committed_report_is_the_one_regenerated_from_the_committed_rows():
    """bench/results/evidence-w8-report.md == `python bench/evidence.py --markdown` on the committed JSONL
    (refresh both together: see bench/evidence.py's docstring)."""
    from kdgraph.sweep import load_rows

    committed = (evidence.HERE / "results" / "evidence-w8-report.md").read_text()
    assert committed == evidence.markdown(_committed_sweep(), load_rows(evidence.COMMITTED))


def test_controls_contrast_recomputed_by_hand():
    """The controls' Welch rows from the raw rows by hand: kd+mse - kd on seeds 1-3."""
    import json
    import math
    import statistics

    rows = [json.loads(ln) for ln in evidence.COMMITTED.read_text().splitlines() if ln.strip()]

    def test_values(arm):
        return [r["test_top1"] for r in rows if r.get("arm") == arm and r.get("seed") in (1, 2, 3)
                and r.get("test_top1") is not None]

    a, b = test_values("kd+mse"), test_values("kd")
    assert len(a) == len(b) == 3
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    text = evidence.markdown(_committed_sweep(), {r["key"]: r for r in rows})
    line = next(ln for ln in text.splitlines() if ln.startswith("| kd+mse − kd |"))
    assert f"{statistics.fmean(a) - statistics.fmean(b):+.2f}" in line and f"{t:.2f} (" in line



def test_dry_run_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evidence.py", "--dry-run", "--work", str(tmp_path / "w"),
                                      "--results", str(tmp_path / "r.jsonl")])
    evidence.main()
    assert capsys.readouterr().out == ("8 arms, 42 cells as given (+ up to 4 per swept arm where a grid grows) "
                                       "+ the teacher; specs valid\n")
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.jsonl").exists()


def test_teacher_row_already_there_trains_nothing(tmp_path, monkeypatch):
    """A resumed grid finds its teacher's row (key "teacher") and trains no teacher again."""
    import kdgraph.sweep

    results = tmp_path / "r.jsonl"
    results.write_text('{"key": "teacher", "arm": "teacher", "test_top1": 90.0}\n')
    monkeypatch.setattr(kdgraph.sweep, "train_resumable", lambda *a: pytest.fail("trained the teacher again"))
    evidence.teacher(argparse.Namespace(work=str(tmp_path / "w")), results)
    assert results.read_text() == '{"key": "teacher", "arm": "teacher", "test_top1": 90.0}\n'


def test_a_stopped_grid_exits_130_saying_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """SIGINT (or SIGTERM inside Sweep.run) while a cell trains: exit status 130 and one line;
    the teacher, already in the rows, is not trained again."""
    import kdgraph.sweep

    results = tmp_path / "r.jsonl"
    results.write_text('{"key": "teacher", "arm": "teacher", "test_top1": 90.0}\n')
    monkeypatch.setattr(kdgraph.sweep, "train_resumable", lambda *a: pytest.fail("trained the teacher again"))

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdgraph.sweep.Sweep, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["evidence.py", "--work", str(tmp_path / "w"), "--results", str(results)])
    with pytest.raises(SystemExit) as got:
        evidence.main()
    assert got.value.code == 130 and capsys.readouterr().out.endswith("stopped; the same command resumes the grid\n")


def test_the_docs_quote_every_finished_arm_as_the_committed_report_has_it():
    """README.md, BENCHMARKS.md and docs/recipes.md state each arm's test mean ± std (and README and
    BENCHMARKS its 95 % CI) exactly as bench/results/evidence-w8-report.md, regenerated from the
    committed rows, gives them: a refreshed grid whose docs were not updated fails here."""
    import re

    root = Path(__file__).resolve().parents[1]
    report = (root / "bench/results/evidence-w8-report.md").read_text()
    table = report.split("**Test split**", 1)[1].split("**Controls**", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| arm") and not line.startswith("|---")]
    finished = [r for r in rows if re.fullmatch(r"3", r[2])]
    assert len(finished) >= 7, rows  # every arm but the diverging control
    docs = {name: (root / name).read_text().replace("−", "-") for name in ("README.md", "BENCHMARKS.md", "docs/recipes.md")}
    for arm, _chosen, _n, mean_std, ci, *_ in finished:
        for name, text in docs.items():
            assert mean_std in text, f"{name} lacks {arm}'s {mean_std}"
            if name != "docs/recipes.md":
                assert ci in text, f"{name} lacks {arm}'s CI {ci}"


def test_benchmarks_quotes_the_full_fraction_as_its_committed_report_has_it():
    """BENCHMARKS.md's 100 % table: each finished arm's mean ± std and CI as
    bench/results/evidence-more-report.md (regenerated from the committed rows) gives them."""
    root = Path(__file__).resolve().parents[1]
    report = (root / "bench/results/evidence-more-report.md").read_text()
    section = report.split("## ResNet-34 -> ResNet-18 /8, 100 %", 1)[1].split("\n## ", 1)[0]
    table = section.split("**Test split**", 1)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| arm") and not line.startswith("|---")]
    finished = [r for r in rows if r[2] == "3"]
    assert [r[0] for r in finished] == ["kd", "stablekd-5/2", "kd+mse"]
    bench = (root / "BENCHMARKS.md").read_text()
    for arm, _chosen, _n, mean_std, ci, *_ in finished:
        assert mean_std in bench and ci in bench, f"BENCHMARKS.md lacks {arm}'s {mean_std} / {ci}"
