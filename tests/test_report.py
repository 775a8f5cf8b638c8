"""kdgraph.runtime.report: what a run tells its user besides steps and epochs (start notes,
warnings, summary.json), read from the run it is given.

The run here is a stand-in holding exactly the attributes report reads (a Trainer built for
these cases would hide which input makes which line); the truths are the figures written out
by hand: mean images per second = images / training seconds, the data-wait share = waited /
training seconds, the student's scores from the test split where one was evaluated, a warning
once per run and only past its threshold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kdgraph.runtime import report
from kdgraph.stream import StreamLoader, available_cpus


class Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, line: str) -> None:
        self.lines.append(line)


class Streamed(StreamLoader):
    def __init__(self, num_workers: int) -> None:  # only what the warning reads
        self.num_workers = num_workers


def _task(metrics=("top1", "top5"), best="top1", name="classification"):
    return SimpleNamespace(metrics=metrics, best_metric=best, name=name,
                           describe=lambda acc: f"top-1 {acc['top1']:.2%}")


def _run(**over):
    run = SimpleNamespace(
        name="r", main=True, reporter=Notes(), compiled=SimpleNamespace(notes=("a note",)), untrained_teacher=False,
        cache=None, distiller=SimpleNamespace(teacher=None), teacher_acc=None, data_warned=False,
        data=SimpleNamespace(train=None, eval_split="test", record=lambda: {"dataset": "digits"}, test="TEST"),
        task=_task(), recompiles=SimpleNamespace(hits=0, functions=[]), student_acc=None, test_acc=None,
        plan=SimpleNamespace(method="stablekd", k=4, n=2, epochs=3, cache_stages=(), teacher_dtype="float32"),
        history={"wall_s": 12.345, "images": 3000, "train_s": 6.0, "data_s": 1.5},
        config=SimpleNamespace(compile=False, cudnn_benchmark=False, deterministic=True, shard_student=False),
        folder=SimpleNamespace(root="runs/r"), preprocessing={"input_size": [1, 8, 8]}, info=SimpleNamespace(world_size=1))
    for key, value in over.items():
        setattr(run, key, value)
    return run


def test_scores_name_top1_top5_then_the_tasks_other_metrics():
    assert report.scores("student", None, ("top1", "top5")) == {"student_top1": None, "student_top5": None}
    assert report.scores("teacher", {"top1": 0.9, "top5": 1.0, "loss": 3.0}, ("top1", "top5")) == \
        {"teacher_top1": 0.9, "teacher_top5": 1.0}  # loss is no metric of the task: left out
    assert report.scores("student", {"miou": 0.4, "pixel_acc": 0.8}, ("miou", "pixel_acc")) == \
        {"student_top1": None, "student_top5": None, "student_miou": 0.4, "student_pixel_acc": 0.8}


def test_summary_figures_written_out():
    """3000 images in 6 s of training: 500.0 images/s; 1.5 s of it waiting: share 0.25; the
    student's scores are the test split's, the last evaluation's under student_val_*."""
    run = _run(student_acc={"top1": 0.7, "top5": 0.9}, test_acc={"top1": 0.6, "top5": 0.8},
               teacher_acc={"top1": 0.95, "top5": 1.0}, history={"wall_s": 12.345, "images": 3000, "train_s": 6.0,
                                                                 "data_s": 1.5, "best_top1": 0.7, "best_epoch": 2})
    s = report.summary(run)
    assert s["mean_images_per_s"] == 500.0 and s["data_wait_share"] == 0.25 and s["wall_time_s"] == 12.35
    assert (s["student_top1"], s["student_top5"], s["student_val_top1"], s["student_val_top5"]) == (0.6, 0.8, 0.7, 0.9)
    assert (s["teacher_top1"], s["best_top1"], s["best_epoch"]) == (0.95, 0.7, 2)
    assert (s["name"], s["task"], s["method"], s["k"], s["n"], s["epochs"]) == ("r", "classification", "stablekd", 4, 2, 3)
    assert s["compile"] == {"enabled": False, "recompile_limit_hits": 0, "functions_gone_eager": [],
                            "cudnn_benchmark": False, "deterministic": True}
    assert s["data"] == {"dataset": "digits"} and s["output"] == "runs/r"


def test_summary_without_a_test_evaluation_and_a_lower_is_better_best():
    """No test split evaluated: student_* is the last evaluation's, no student_val_*; a task whose
    best metric is not top-1 records its own best_ key beside best_top1 (None)."""
    run = _run(student_acc={"mse": 0.02}, task=_task(("mse",), best="mse", name="denoise"),
               history={"wall_s": 1.0, "images": 10, "train_s": 0.0, "best_mse": 0.02, "best_epoch": 1})
    s = report.summary(run)
    assert s["student_mse"] == 0.02 and "student_val_top1" not in s
    assert s["best_mse"] == 0.02 and s["best_top1"] is None
    assert s["mean_images_per_s"] == pytest.approx(10 / 1e-9, rel=1e-3)  # no training time: no division by zero


def test_starved_data_is_said_once_per_run_and_only_when_streamed_past_a_quarter():
    run = _run(data=SimpleNamespace(train=Streamed(2)))
    report.warn_if_starved(run, {"epoch": 0, "data_wait_share": report.STARVED_SHARE})  # at the threshold: quiet
    assert run.reporter.lines == []
    report.warn_if_starved(run, {"epoch": 1, "data_wait_share": 0.6})
    report.warn_if_starved(run, {"epoch": 2, "data_wait_share": 0.9})  # once per run
    assert run.reporter.lines == [f"warning: epoch 2 waited for data 60% of the time: decoding is the bottleneck; "
                                  f"raise runtime.num_workers (now 2, {available_cpus()} CPUs available to this process)"]
    held = _run(data=SimpleNamespace(train=object()))  # data in memory never starves the step
    report.warn_if_starved(held, {"epoch": 0, "data_wait_share": 0.9})
    other_rank = _run(main=False, data=SimpleNamespace(train=Streamed(2)))
    report.warn_if_starved(other_rank, {"epoch": 0, "data_wait_share": 0.9})
    assert held.reporter.lines == [] and other_rank.reporter.lines == []


def test_recompile_warning_names_the_functions():
    run = _run(recompiles=SimpleNamespace(hits=2, functions=["forward", "step"]))
    report.warn_if_recompiled(run)
    assert run.reporter.lines == ["warning: torch.compile hit its recompile limit 2 time(s) (forward, step); those "
                                  "functions ran eager from then on. summary.json counts them under compile"]
    quiet = _run()
    report.warn_if_recompiled(quiet)
    assert quiet.reporter.lines == []


def test_start_notes_the_compilers_notes_an_untrained_teacher_and_its_score_once():
    scored = []
    teacher = SimpleNamespace(sharded=False)
    evaluator = SimpleNamespace(score=lambda model, split: scored.append((model, split)) or {"top1": 0.5})
    run = _run(untrained_teacher=True, distiller=SimpleNamespace(teacher=teacher), evaluator=evaluator)
    report.start_notes(run, "fell back to prev.pt")
    assert run.reporter.lines[:2] == ["note: a note", "fell back to prev.pt"]
    assert run.reporter.lines[2].startswith("warning: the teacher has no checkpoint")
    assert run.reporter.lines[3:] == ["teacher top-1 50.00%"]
    assert scored == [(teacher, "TEST")] and run.teacher_acc == {"top1": 0.5}
    again = _run(distiller=SimpleNamespace(teacher=teacher), evaluator=evaluator, teacher_acc={"top1": 0.5})
    report.start_notes(again, None)  # a resumed run has its teacher's score from the checkpoint
    assert again.reporter.lines == ["note: a note"] and len(scored) == 1
