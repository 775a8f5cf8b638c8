"""bench/evidence_more.py without training: the 100 % sweep and the adapter-free pair's sweep load
and plan as the docstring says (fraction, steps, teacher, adapter modes), both on bench/evidence.py's
protocol (selection seed 0, report seeds 1-3, baseline kd), and the wait for the running grid
returns only once a process whose command line names bench/evidence.py has exited."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evidence_more  # noqa: E402  (bench/ is not a package)


def _sweeps(tmp_path):
    return evidence_more.build(argparse.Namespace(work=str(tmp_path / "w"), w8_work=str(tmp_path / "w8"),
                                                  results=str(tmp_path / "r.jsonl")))


def _spec(sweep, name, lr_index=1):
    from kdgraph.spec import load_spec

    arms = {a.name: a for a in sweep.arms}
    arm = arms[name]
    target = arms[arm.follow] if arm.follow else arm
    cell = sweep.cell(arm, ((evidence_more.LR, target.grid[0][1][lr_index]),), 1)
    return load_spec(sweep.spec, [*cell.overrides, "seed=1"])


def test_sweeps_definition(tmp_path):
    sweeps = _sweeps(tmp_path)
    assert list(sweeps) == ["full", "r50"]
    for s in sweeps.values():
        s.check()
        assert s.seeds == (0,) and s.report_seeds == (1, 2, 3) and s.baseline == "kd" and s.extend == 2
        assert s.waves[0] == ["kd", "stablekd-5/2"] and s.results == tmp_path / "r.jsonl"
    full, r50 = sweeps["full"], sweeps["r50"]
    assert full.work != r50.work  # one lock and one set of cells each
    w8_teacher = tmp_path / "w8" / "teacher" / "student.safetensors"
    for name in ("kd", "stablekd-5/2", "kd+mse"):
        s = _spec(full, name)
        assert s.data.fraction == 1.0 and s.schedule.epochs == 3 and s.data.val_fraction == 0.1
        assert s.data.augment == "crop+flip" and s.loss.temperature == 4.0
        assert Path(s.teacher.checkpoint) == w8_teacher and s.teacher.model == "timm:resnet34"
    assert _spec(full, "kd+mse").schedule.method == "kd+mse" and _spec(full, "kd+mse").optim.lr == 0.1
    r50_teacher = tmp_path / "w" / "r50" / "teacher" / "student.safetensors"
    for name in ("kd", "stablekd-5/2", "stablekd-5/2-inpath"):
        s = _spec(r50, name)
        assert s.teacher.model == "timm:resnet50" and Path(s.teacher.checkpoint) == r50_teacher
        assert s.data.fraction == 0.2 and s.schedule.epochs == 15 and s.data.augment == "crop+flip"
    assert _spec(r50, "stablekd-5/2").decompose.adapters == "auto"
    assert _spec(r50, "stablekd-5/2-inpath").decompose.adapters == "in_path"
    assert _spec(r50, "stablekd-5/2").optim.lr_schedule == "stage_cyclic" == _spec(r50, "stablekd-5/2-inpath").optim.lr_schedule
    assert full.count() == 2 * 3 + 3 * 3 and r50.count() == 3 * 3 + 3 * 3


def test_adapter_free_pair_plans_projected_and_in_path(tmp_path):
    from kdgraph.compiler import compile_spec

    r50 = _sweeps(tmp_path)["r50"]
    modes = {n: compile_spec(_spec(r50, n), allow_missing_weights=True).pairing for n in
             ("stablekd-5/2", "stablekd-5/2-inpath")}
    assert modes["stablekd-5/2"].adapters_mode == "projected" and not modes["stablekd-5/2"].adapters
    assert [(a.student_channels, a.teacher_channels) for a in modes["stablekd-5/2-inpath"].adapters] == [
        (8, 32), (16, 64), (32, 128), (64, 256)]
    from kdgraph.spec import load_spec
    t = load_spec(evidence_more.R50_TEACHER_SPEC)
    assert t.teacher is None and t.seed == 0 and t.data.val_fraction == 0.1 and t.schedule.epochs == 8


def test_waits_until_the_grid_has_exited():
    pattern = "bench/evidence\\.py --kdgraph-test-marker"
    assert evidence_more.grid_running(pattern) == []
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "bench/evidence.py",
                             "--kdgraph-test-marker"])
    try:
        deadline = time.time() + 10
        while proc.pid not in evidence_more.grid_running(pattern) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.pid in evidence_more.grid_running(pattern)
        killer = threading.Timer(1.0, proc.kill)
        killer.start()
        t0 = time.time()
        evidence_more.wait_for_grid(poll_s=0.1, pattern=pattern)
        assert time.time() - t0 >= 0.9 and proc.poll() is not None  # returned only after it exited
    finally:
        proc.kill()
        proc.wait()
    assert evidence_more.grid_running(pattern) == []
    import re
    assert re.search(evidence_more.GRID_PATTERN, "/work/main/.venv/bin/python bench/evidence.py")
    assert re.search(evidence_more.GRID_PATTERN, "python -m kdgraph.sweep /work/grid/evidence-w8/jobs/kd-s1.json")
    assert not re.search(evidence_more.GRID_PATTERN, "python bench/evidence_more.py")


def test_report_lists_both_sweeps_and_reads_their_rows(tmp_path):
    """The report names every arm of both sweeps; a selection row of one cell is read as that
    cell's validation score (and only in its own sweep)."""
    sweeps = _sweeps(tmp_path)
    text = evidence_more.report(sweeps, {})
    assert text.count("3 cell(s) pending") == 5 and "stablekd-5/2-inpath" in text and "kd+mse: at kd's choice" in text
    full = sweeps["full"]
    kd = full.by_name["kd"]
    cell = full.cell(kd, ((evidence_more.LR, "0.1"),), 0)
    rows = {cell.key: {"key": cell.key, "val_top1": 77.25, "test_top1": 76.0}}
    text = evidence_more.report(sweeps, rows)
    assert "optim.lr=0.1 → 77.25" not in text  # the arm is not chosen until its 3 points are in
    assert text.count("3 cell(s) pending") == 4 and "- kd: not chosen yet; 2 cell(s) pending" in text


def test_dry_run_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evidence_more.py", "--dry-run", "--work", str(tmp_path / "w"),
                                      "--w8-work", str(tmp_path / "w8"), "--results", str(tmp_path / "r.jsonl")])
    evidence_more.main()
    assert capsys.readouterr().out == ("6 arms in 2 sweeps, 33 cells as given (+ up to 4 per swept arm where a grid "
                                       "grows) + the ResNet-50 teacher; specs valid\n")
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.jsonl").exists()


def _committed_report_rows(title: str) -> list[list[str]]:
    """The test-split table of one section of bench/results/evidence-more-report.md."""
    report = (ROOT / "bench/results/evidence-more-report.md").read_text()
    section = report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    table = section.split("**Test split**", 1)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| arm") and not line.startswith("|---")]


ROOT = Path(__file__).resolve().parents[1]


def test_committed_report_is_the_one_regenerated_from_the_committed_rows():
    """bench/results/evidence-more-report.md == `python bench/evidence_more.py --markdown` on the
    committed JSONL, recomputed here (the selection, the Welch tests and the teacher's line). The
    sweeps are built with the script's default folders: the teacher's path is part of each cell's key."""
    from kdgraph.sweep import load_rows

    args = argparse.Namespace(work="/work/grid/evidence-more", w8_work="/work/grid/evidence-w8",
                              results=str(evidence_more.COMMITTED))
    rows = load_rows(evidence_more.COMMITTED)
    assert (ROOT / "bench/results/evidence-more-report.md").read_text() == evidence_more.report(evidence_more.build(args), rows)


def test_the_docs_quote_the_adapter_free_pair_as_its_committed_report_has_it():
    """BENCHMARKS.md's adapter-free table: each arm's mean ± std and 95 % CI as the committed
    report gives them; README.md and docs/recipes.md quote the projected student's and KD's."""
    finished = [r for r in _committed_report_rows("ResNet-50-shaped -> ResNet-18 /8") if r[2] == "3"]
    assert [r[0] for r in finished] == ["kd", "stablekd-5/2", "stablekd-5/2-inpath"]
    docs = {name: (ROOT / name).read_text().replace("−", "-") for name in ("BENCHMARKS.md", "README.md", "docs/recipes.md")}
    for arm, _chosen, _n, mean_std, ci, *_ in finished:
        assert mean_std in docs["BENCHMARKS.md"] and ci in docs["BENCHMARKS.md"], f"BENCHMARKS.md lacks {arm}'s {mean_std} / {ci}"
        assert mean_std in docs["docs/recipes.md"], f"docs/recipes.md lacks {arm}'s {mean_std}"
        if arm != "stablekd-5/2-inpath":
            assert mean_std in docs["README.md"].replace("\n", " "), f"README.md lacks {arm}'s {mean_std}"
    projected = finished[1]
    assert f"{projected[5]}, p = {float(projected[7]):.2g}" in docs["README.md"].replace("\n", " ")  # +0.68, p = 0.018
