"""bench/quickstart.py's committed rows against the docs that quote them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_figures_in_the_docs_are_the_committed_rows():
    """docs/getting-started.md and BENCHMARKS.md quote bench/results/quickstart.jsonl (one thread)."""
    import json

    root = ROOT
    rows = {r["seed"]: r for r in map(json.loads, (root / "bench/results/quickstart.jsonl").read_text().splitlines())
            if r["torch_threads"] == 1}
    students = "/".join(f"{rows[s]['student_top1']:.2f}" for s in (0, 1, 2))
    teachers = "/".join(f"{rows[s]['teacher_top1']:.2f}" for s in (0, 1, 2))
    started = " ".join((root / "docs/getting-started.md").read_text().split())
    bench = " ".join((root / "BENCHMARKS.md").read_text().split())
    assert f"teacher {rows[0]['teacher_top1']:.2f} % and student {rows[0]['student_top1']:.2f} %" in started
    assert f"students {students} % against teachers {teachers} %" in started
    assert f"seeds 0/1/2 {students} %" in bench and f"student {rows[0]['student_top1']:.2f} %" in bench


def test_timed_records_wall_seconds_only_for_a_run_that_ran_whole_here(tmp_path, monkeypatch):
    """A run resumed from an earlier invocation has no wall time (it would be a part of the run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quickstart", ROOT / "bench" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    monkeypatch.setattr(mod, "train_resumable", lambda f, o: calls.append(o) or {"summary": {}})
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes(b"x")
    got, secs = mod.timed(Path("spec.yaml"), ["seed=0", f"output={fresh}"])
    assert got == {"summary": {}} and isinstance(secs, float) and secs >= 0.0
    assert mod.timed(Path("spec.yaml"), ["seed=0", f"output={resumed}"])[1] is None
    assert calls == [["seed=0", f"output={fresh}"], ["seed=0", f"output={resumed}"]]


def test_the_demo_timing_in_the_docs_is_the_committed_two_thread_row():
    """docs/getting-started.md's wall seconds of `make demo`'s trainings are row quickstart-s0-t2's."""
    import json

    rows = {r["key"]: r for r in map(json.loads, (ROOT / "bench/results/quickstart.jsonl").read_text().splitlines())}
    row = rows["quickstart-s0-t2"]
    started = " ".join((ROOT / "docs/getting-started.md").read_text().split())
    assert row["torch_threads"] == 2 and row["teacher_wall_s"] is not None and row["student_wall_s"] is not None
    assert f"teacher {row['teacher_wall_s']} s and student {row['student_wall_s']} s wall" in started
    assert f"teacher {row['teacher_top1']:.2f} % and student {row['student_top1']:.2f} %" in started
