"""What a run tells its user besides its steps and epochs: the notes at its start, its
warnings (a compiled step gone eager, data that starved an epoch) and its summary.
Each reads the run it is given (a ``kdgraph.runtime.loop.Trainer``) and writes nothing but
notes."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kdgraph.stream import StreamLoader, available_cpus

Trainer = Any  # the run: kdgraph.runtime.loop.Trainer, which imports this module

STARVED_SHARE = 0.25  # an epoch that waited longer for data than this says so, once per run


def start_notes(run: Trainer, fallback: str | None) -> None:
    """The compiler's notes, a checkpoint fallback, and the teacher's score (once per run)."""
    reporter, main, acc = run.reporter, run.main, None
    for note in run.compiled.notes if main else ():
        reporter.note(f"note: {note}")
    if fallback:
        reporter.note(fallback)
    if main and run.untrained_teacher:
        reporter.note("warning: the teacher has no checkpoint, so it distils random weights; "
                      "train one with a supervised spec and set teacher.checkpoint (or teacher.pretrained: true)")
    if main and run.cache is not None:
        stages = ", ".join(map(str, run.plan.cache_stages))
        reporter.note(f"note: stage(s) {stages} replay the teacher's logits from {run.cache.root} "
                      f"({run.cache.mode})" + ("" if run.distiller.teacher else "; the teacher is not built"))
    teacher = run.distiller.teacher
    if main and teacher is not None and (teacher.sharded or run.plan.teacher_dtype != "float32"):
        where = f"sharded over {run.info.world_size} ranks (FSDP2)" if teacher.sharded else "whole on each rank"
        reporter.note(f"note: the teacher runs in {run.plan.teacher_dtype}, {where}: "
                      f"{teacher.parameter_bytes() / 2**20:.1f} MiB of its parameters on this rank")
    if main and run.config.shard_student:
        from kdgraph.runtime.sharding import local_bytes

        reporter.note(f"note: the student is sharded over {run.info.world_size} ranks (FSDP2, computed in "
                      f"{run.config.shard_dtype}): {local_bytes(run.distiller.student) / 2**20:.1f} MiB of its "
                      "parameters on this rank")
    # a sharded teacher runs on every rank at once (each gathers the others' shards): every
    # rank evaluates it on the whole test split, the main rank reports
    if teacher is not None and run.teacher_acc is None and (main or teacher.sharded):
        run.teacher_acc = acc = run.evaluator.score(teacher, run.data.test)
    if main and teacher is not None and acc is not None:
        reporter.note(f"teacher {run.task.describe(acc)}")


def warn_if_recompiled(run: Trainer) -> None:
    """At the end of a compiled run whose step hit Dynamo's recompile limit: that function
    ran eager from then on, so the run was slower than a compiled one should be."""
    watch = run.recompiles
    if run.main and watch.hits:
        run.reporter.note(f"warning: torch.compile hit its recompile limit {watch.hits} time(s) "
                          f"({', '.join(watch.functions)}); those functions ran eager from then on. "
                          "summary.json counts them under compile")


def warn_if_starved(run: Trainer, record: dict) -> None:
    """Once per run: an epoch of a streamed run that mostly waited for its data."""
    train = run.data.train
    if (not run.main or run.data_warned or not isinstance(train, StreamLoader)
            or record["data_wait_share"] <= STARVED_SHARE):
        return
    run.data_warned = True
    run.reporter.note(f"warning: epoch {record['epoch'] + 1} waited for data {record['data_wait_share']:.0%} "
                      f"of the time: decoding is the bottleneck; raise runtime.num_workers (now "
                      f"{train.num_workers}, {available_cpus()} CPUs available to this process)")


def scores(role: str, acc: dict | None, metrics: tuple[str, ...]) -> dict:
    """``{role}_top1``/``_top5`` (None before an evaluation, or for a task without them) and,
    where measured, the task's other ``metrics``."""
    acc = acc or {}
    out = {f"{role}_top1": acc.get("top1"), f"{role}_top5": acc.get("top5")}
    return out | {f"{role}_{k}": acc[k] for k in metrics if k in acc and k not in out}


def summary(run: Trainer) -> dict:
    """summary.json: the run's scores, best epoch, throughput, data, compile settings."""
    s, t, h, plan, metrics = run.student_acc, run.teacher_acc, run.history, run.plan, run.task.metrics
    best = f"best_{run.task.best_metric}"
    return {
        "name": run.name, "task": run.task.name, "method": plan.method, "k": plan.k, "n": plan.n,
        "epochs": plan.epochs, "eval_split": run.data.eval_split,
        **(scores("student", s, metrics) if run.test_acc is None else  # student_*: the test split's
           scores("student", run.test_acc, metrics) | scores("student_val", s, metrics)),
        "best_top1": h.get("best_top1"),
        **({best: h[best]} if best in h and best != "best_top1" else {}),
        "best_epoch": h.get("best_epoch"),
        **scores("teacher", t, metrics),
        "wall_time_s": round(h["wall_s"], 2),
        "mean_images_per_s": round(h["images"] / max(h["train_s"], 1e-9), 1),
        "data_wait_share": round(h.get("data_s", 0.0) / max(h["train_s"], 1e-9), 3),
        "data": run.data.record(),
        # recompile_limit_hits: functions of the step Dynamo gave up on (they ran eager), this process
        "compile": {"enabled": run.config.compile, "recompile_limit_hits": run.recompiles.hits,
                    "functions_gone_eager": run.recompiles.functions,
                    "cudnn_benchmark": run.config.cudnn_benchmark,
                    "deterministic": run.config.deterministic},
        "output": str(run.folder.root),
        "preprocessing": run.preprocessing,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
