"""Progress reporting (kdgraph/runtime/progress.py) on a clock set by hand: the plain step lines
printed without a terminal and how often, the epoch line, and the ETA (the start-up the first
step pays left out), with their values worked out by hand in each test."""

from __future__ import annotations

import io

from rich.console import Console

from kdgraph.runtime import progress


def _reporter(monkeypatch, clock, **kw):
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    reporter = progress.Reporter(**{"quiet": True, "total_epochs": 3, "steps_per_epoch": 10, **kw})
    reporter.console = Console(file=io.StringIO(), highlight=False, soft_wrap=True)
    return reporter


def _lines(reporter) -> list[str]:
    return reporter.console.file.getvalue().splitlines()


STAGE = type("Stage", (), {"groups": [[1, 2], [3]], "index": 1})()


def test_without_a_terminal_progress_prints_step_lines_before_the_epoch_ends(monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    reporter = progress.Reporter(quiet=True, total_epochs=3, steps_per_epoch=500)
    reporter.console = Console(file=io.StringIO(), highlight=False, soft_wrap=True)
    record = {"epoch": 0, "step": 10, "loss": 1.25, "lr": 0.1, "images_per_s": 300.0}
    for step, t in ((10, 100.0), (20, 110.0), (30, 131.0), (40, 140.0)):
        clock["t"] = t
        reporter.log({**record, "step": step})
    lines = reporter.console.file.getvalue().splitlines()
    assert lines == ["epoch 1/3 step 10/500: loss 1.2500 lr 0.1 300 img/s | elapsed 0:00",
                     "epoch 1/3 step 30/500: loss 1.2500 lr 0.1 300 img/s | elapsed 0:31"]


def test_the_eta_leaves_out_the_start_up_the_first_step_pays(monkeypatch):
    """Epoch 1 of 3, 10 steps: the first step takes 60 s (workers, compilation), the other nine
    1 s each, evaluation 1 s. Steady state is (9 + 1) s per 9 steps, so the 20 steps left take
    20 * 10 / 9 = 22.2 s; counting the start-up would say 2 * 70 s = 2:20."""
    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    reporter = progress.Reporter(quiet=True, total_epochs=3, steps_per_epoch=10)
    reporter.console = Console(file=io.StringIO(), highlight=False, soft_wrap=True)
    stage = type("Stage", (), {"groups": [[0]], "index": 0})()
    reporter.start_epoch(0, stage, 0)
    for t in [60.0 + s for s in range(10)]:
        clock["t"] = t
        reporter.advance()
    clock["t"] = 70.0  # evaluation
    reporter.end_epoch({"epoch": 0, "stage": 0, "student_top1": 50.0, "student_top5": 90.0, "images_per_s": 10.0})
    assert reporter.console.file.getvalue().rstrip().endswith("elapsed 1:10, ETA 0:22")


def test_before_a_second_step_the_eta_is_the_time_per_epoch_so_far(monkeypatch):
    """Resumed at epoch 1 of 4 (epochs 1-3 left); epoch 1 ends at 50 s with no step timed twice:
    50 s per epoch, 2 epochs left: ETA 1:40. The line reads the record's losses and metrics."""
    clock = {"t": 0.0}
    reporter = _reporter(monkeypatch, clock, total_epochs=4)
    reporter.start_epoch(1, STAGE, 0)
    clock["t"] = 50.0
    reporter.end_epoch({"epoch": 1, "stage": 1, "train_ce": 0.5, "train_kl": 0.25, "student_top1": 61.234,
                        "student_top5": 95.0, "student_miou": 40.5, "images_per_s": 123.4, "data_wait_share": 0.25})
    assert _lines(reporter) == ["stage 1 epoch 2/4: ce 0.5000 kl 0.2500 | top-1 61.23% top-5 95.00% mIoU 40.50% | "
                                "123 img/s, 25% of it waiting for data | elapsed 0:50, ETA 1:40"]


def test_a_resumed_epoch_says_where_it_resumes_and_hours_show(monkeypatch):
    """A causal LM's epoch line has no top-1; a short wait for data is not mentioned; a run of
    hours shows h:mm:ss (epoch 1 of 3 takes 3725 s: elapsed 1:02:05, ETA 2 x 3725 s = 2:04:10)."""
    clock = {"t": 0.0}
    reporter = _reporter(monkeypatch, clock)
    reporter.start_epoch(0, STAGE, 4)
    clock["t"] = 3725.0
    reporter.end_epoch({"epoch": 0, "stage": 0, "train_ce": 2.0, "student_top1": None, "images_per_s": 9.6,
                        "data_wait_share": 0.01})
    assert _lines(reporter) == ["resuming epoch 0 at step 4",
                                "stage 0 epoch 1/3: ce 2.0000 | 10 img/s | elapsed 1:02:05, ETA 2:04:10"]


def test_a_silent_reporter_prints_nothing(monkeypatch):
    """DDP ranks above 0: no step line, no epoch line, no note."""
    clock = {"t": 0.0}
    reporter = _reporter(monkeypatch, clock, silent=True)
    reporter.start_epoch(0, STAGE, 3)
    reporter.log({"epoch": 0, "step": 3, "loss": 1.0, "lr": 0.1, "images_per_s": 1.0})
    reporter.note("a note")
    reporter.end_epoch({"epoch": 0, "stage": 0, "student_top1": 1.0, "student_top5": 2.0, "images_per_s": 1.0})
    assert _lines(reporter) == []
