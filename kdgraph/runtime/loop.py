"""The training loop: a Trainer built once from the compiled plan, then epochs of steps,
evaluation and checkpoints, then the exported student and the summary.

    train(spec) = claim the run folder -> Trainer(build_run(spec, TRAIN)) -> [restore] -> fit: for each epoch,
                  train_epoch (train_step, log_step, checkpoint) and end_epoch (evaluate,
                  record, save) -> finish (export, summary, curves)

Positions are (epoch, step-in-epoch); the data order, augmentation and learning rate
are pure functions of the position and the seed, and the checkpoint carries model,
optimizer, scheduler and RNG states, so a resumed run continues bit for bit.
The spec goes in at the compiler (``runtime.builder``) and stops there: the Trainer reads
the compiled plan, its ``RunRecord`` and the resolved ``RuntimeConfig``. Its parts have their owners: the task (``kdgraph.tasks``: what a
batch is, scores, reports), the ``Stepper`` (one optimisation step), the ``Evaluator``
(BatchNorm re-estimation, scores), the ``CheckpointManager`` (what a checkpoint holds, each
owner packing its own state) and ``report`` (notes, warnings, the summary).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdgraph.compiler import RunRecord  # module level: the compiler first, in the train path's reading order
from kdgraph.errors import KDGraphError
from kdgraph.registry import AUGMENTATIONS
from kdgraph.runtime import report, runs
from kdgraph.runtime.checkpoint import RNG, CheckpointManager, Value
from kdgraph.runtime.builder import TRAIN, build_run, plan_records
from kdgraph.runtime.config import resolve_config
from kdgraph.runtime.curves import plot_curves
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.evaluate import Evaluator
from kdgraph.runtime.export import export_student, preprocessing_of
from kdgraph.runtime.metrics import Metrics, WaitTimed
from kdgraph.runtime.progress import Reporter
from kdgraph.runtime.replay import TeacherCache
from kdgraph.runtime.runs import RunFolder, readable
from kdgraph.runtime.sharding import ShardedCheckpoints, apply_student_options, full_state
from kdgraph.runtime.stability import StabilityTracker, nonfinite_advice
from kdgraph.runtime.steps import Stepper
from kdgraph.runtime.techniques import (
    RecompileWatch,
    apply_cudnn_benchmark,
    init_distributed,
    resolve_device,
    shard_teacher,
    to_channels_last,
)
from kdgraph.schedules import stage_at
from kdgraph.tasks.create import create_task, spec_task

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled
    from kdgraph.ir import Plan, TrainingStage
    from kdgraph.runtime.config import RuntimeConfig
    from kdgraph.runtime.techniques import DistInfo
    from kdgraph.spec import Spec


class TrainingInterrupted(KDGraphError):
    """SIGINT/SIGTERM: the checkpoint was saved; `kdgraph train --resume` continues."""


class NonFiniteLoss(KDGraphError):
    """The loss became inf or NaN: training stops before saving, so the last checkpoint is good."""


class EpochMeter:
    """An epoch's running totals: the loss terms summed on the device (no host sync), the
    steps taken, and the images and data wait of the current logging window."""

    def __init__(self, batches: WaitTimed, start: int):
        self.batches, self.start = batches, start
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.images = 0, 0
        self.t0 = self.t_window = time.perf_counter()
        self.waited_window = 0.0

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        self.steps += 1
        self.images += images
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach()

    def window(self) -> tuple[float, float]:
        """(images per second, share of the time spent waiting for data) since the last call."""
        now = time.perf_counter()
        span = max(now - self.t_window, 1e-9)
        rates = self.images / span, (self.batches.waited - self.waited_window) / span
        self.t_window, self.images, self.waited_window = now, 0, self.batches.waited
        return rates


class Trainer:
    """A run of the compiled plan: built once from it (device, plan, data, task,
    distiller, stepper, evaluator, checkpoints), then ``fit`` trains it to the end."""

    def __init__(self, compiled: Compiled):
        self.t_start = time.perf_counter()  # the run's wall time counts the build (build_run's too, where from_spec)
        self.info = init_distributed()
        self.compiled, run = compiled, compiled.run
        device = resolve_device(run.runtime.device, self.info)
        self.plan = self.compiled.plan
        self.stage_epochs = [st.epochs for st in self.plan.stages]
        self.config = resolve_config(run, device, self.compiled.student.model)
        self.evaluates = self.info.is_main or self.config.shard_student  # a sharded student's forward needs all ranks
        # the task: what a batch is, its data (train sharded over ranks, normalised in the step's
        # layout; the evaluation splits whole, for the main rank), its scores and reports
        self.task = create_task(run, self.compiled)
        self.data = self.task.build_data(run, self.compiled.data, device, self.info, self.config.channels_last)
        self.task.check_data(self.data, run.data.dataset)
        self.distiller = Distiller(self.compiled).to(device)  # the teacher and segments move with it
        # the stages that replay the teacher's logits read them here, batch by batch
        self.cache = (TeacherCache(run.teacher.cache, self.info.rank, self.info.world_size, run.data.batch_size,
                                   device, run=run, data=self.data.train) if self.plan.cache_stages else None)
        place_models(self.distiller, self.config, self.plan, self.info)
        self.stepper = Stepper(run.optim, self.distiller, self.config, self.info, self.stage_epochs,
                               len(self.data.train), find_unused=self.plan.feature_losses)
        self.optimizer, self.scheduler = self.stepper.optimizer, self.stepper.scheduler
        self.evaluator = Evaluator(self.distiller, self.task, self.data, self.config)
        self.recompiles = RecompileWatch()  # attached while fit trains: limit hits, reported in the summary
        self.folder, self.name = RunFolder(run.output_dir), run.name
        self.preprocessing = preprocessing_of(run, self.data)  # what export's config.json records
        self.untrained_teacher = bool(run.teacher and run.teacher.checkpoint is None and not run.teacher.pretrained)
        self.position = {"epoch": 0, "step": 0, "global_step": 0}  # where fit starts (a resume's)
        self.saving_at = (0, 0)  # (epoch, step) of the checkpoint being saved
        self.global_step = 0
        self.history = {"wall_s": 0.0, "images": 0, "train_s": 0.0}
        self.wall_before = 0.0  # wall time of earlier processes of this run (resumes add up)
        self.teacher_acc = self.student_acc = self.test_acc = None  # the teacher's, the last evaluation's, the test's
        self.tracker: StabilityTracker | None = None
        self.data_warned = False  # report.warn_if_starved: once per run
        self.reshard, self.reshard_note = False, None  # set by train: a resume at another world size (--reshard)
        states, resume = checkpoint_states(self, run.to_dict()), lambda: runs.resume_command(self.folder.root)
        self.checkpoints = (ShardedCheckpoints(self.folder, states, resume, self.info)  # DCP: each rank its shards
                            if dcp_format(self) else CheckpointManager(self.folder, states, resume))
        # set by fit: where records go, what the user sees, whether SIGINT/SIGTERM asked to stop
        self.metrics: Metrics | None = None
        self.reporter: Reporter | None = None
        self.stop: dict = {"signal": None}
        self.progress: torch.Tensor | None = None  # of the current step, set by train_epoch

    @classmethod
    def from_spec(cls, spec: Spec) -> Trainer:
        """The Trainer of ``spec`` as the run builder compiles it for training (its wall time
        counted; a device that is not there is said before anything is built)."""
        t_start = time.perf_counter()
        resolve_device(plan_records(spec, TRAIN).runtime.device, init_distributed())
        trainer = cls(build_run(spec, TRAIN))
        trainer.t_start = t_start
        return trainer

    @property
    def main(self) -> bool:
        return self.info.is_main

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    # ------------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False, quiet: bool = True) -> dict:
        """Train from the start, or from the last checkpoint, to the end; returns the summary."""
        if self.main:
            self.folder.plan.write_text(json.dumps(self.compiled.to_dict(), indent=2))
        fallback = self.restore() if resume else None
        self.metrics = Metrics(self.folder, self.main, self.global_step if resume else None, self.config.tensorboard)
        self.reporter = Reporter(quiet, self.plan.epochs, len(self.data.train), silent=not self.main)
        report.start_notes(self, fallback)
        self.fit_projections()
        if self.config.track_stability:
            self.tracker = StabilityTracker(self.distiller.chain.segments)
        try:
            with stop_signals() as self.stop, self.reporter, self.recompiles:
                for epoch in range(self.position["epoch"], self.plan.epochs):
                    self.train_epoch(epoch)
        finally:
            self.checkpoints.writer.join()  # a stop (signal, non-finite loss) leaves the last checkpoint whole
        report.warn_if_recompiled(self)
        return self.finish()

    def fit_projections(self) -> None:
        """The plan's projection fit (``decompose.adapters: projected``), before stage 0 and once
        per run: a resumed run has its fit from the checkpoint (frozen buffers of the distiller)."""
        fit = self.plan.projection_fit
        if fit is None or self.distiller.projections_fitted:
            return
        used = self.distiller.fit_projections(self.task.fit_batches(self.data.train), fit.batches)
        self.reporter.note(f"projections fitted: PCA of the teacher at block ends {list(fit.blocks)}, {used} batches")

    def train_epoch(self, epoch: int) -> None:
        stage = self.plan.stages[stage_at(self.stage_epochs, epoch)]
        self.distiller.set_stage(stage)
        self.distiller.train()
        start = self.position["step"] if epoch == self.position["epoch"] else 0
        self.reporter.start_epoch(epoch, stage, start)
        meter = EpochMeter(WaitTimed(self.batches(epoch, start)), start)
        replay = self.cache is not None and stage.program.reads_cache
        for step, (xb, yb, idx) in enumerate(meter.batches, start=start):
            xb, yb, side = self.prepare(xb, yb, idx, epoch, step)
            self.progress = self.progress_at(epoch, step)
            cached = self.cache.batch(epoch, step, len(yb)) if replay else None
            terms, loss = self.train_step(xb, yb) if cached is None and not side else \
                self.train_step(xb, yb, cached, side)
            self.global_step += 1
            if self.tracker is not None:
                self.tracker.update(self.global_step)
            meter.add(terms, len(yb) * self.info.world_size)
            if self.global_step % self.config.log_every == 0:
                self.log_step(meter, stage, epoch, step + 1, terms, loss)
            self.reporter.advance()
            self.checkpoint_if_due(epoch, step + 1, terms, loss)
        self.end_epoch(meter, stage, epoch)

    def batches(self, epoch: int, start: int = 0):
        """The training batches of ``epoch`` from step ``start``: (x, y, sample indices or None)."""
        return self.task.batches(self.data.train, epoch, start)

    def prepare(self, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor | None, epoch: int, step: int
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The step's (input, target, side inputs), as the task makes them of the batch; consistent
        teaching (``data.mixup``) mixes a batch once, before the step, as a function of (seed,
        epoch, this rank's batch position): a resumed run mixes exactly as the uninterrupted one."""
        def mix(x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            position = step * self.info.world_size + self.info.rank
            return self.config.mix(x, y, epoch, position, self.compiled.num_classes or self.data.num_classes)
        return self.task.prepare(xb, yb, idx, epoch, step, mix)

    def progress_at(self, epoch: int, step: int) -> torch.Tensor | None:
        """Epochs done by the end of ``step`` (e + (i + 1) / n), for the losses that read it
        (DKD's warm-up); a device tensor, so a compiled step does not recompile per value."""
        if not self.distiller.needs_progress:
            return None
        return torch.tensor(epoch + (step + 1) / len(self.data.train), device=self.config.device)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, cached: Any = None,
                   side: tuple[torch.Tensor, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimisation step of the current stage (``Stepper.step``)."""
        return self.stepper.step(xb, yb, cached, side, self.progress)

    def log_step(self, meter: EpochMeter, stage: TrainingStage, epoch: int, step: int,
                 terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        check_finite(loss, terms, epoch, step, self.folder.last_checkpoint, self.global_step - 1)
        images_per_s, wait_share = meter.window()
        record = {"kind": "step", "stage": stage.index, "epoch": epoch, "step": step,
                  "global_step": self.global_step, "lr": self.stepper.lr(),
                  **{k: round(v.item(), 6) for k, v in terms.items()},
                  "loss": round(loss.item(), 6),
                  "images_per_s": round(images_per_s, 1),
                  "data_wait_share": round(wait_share, 3)}
        self.metrics.write(record)
        self.reporter.log(record)
        self.flush_stability()

    def flush_stability(self) -> None:
        for record in self.tracker.flush() if self.tracker is not None else ():
            self.metrics.write(record)

    def checkpoint_if_due(self, epoch: int, step: int, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Save every ``checkpoint_every`` steps, and on a stop signal (then stop)."""
        every, signal_name = self.config.checkpoint_every, self.stop["signal"]
        if signal_name or (every and self.global_step % every == 0):
            check_finite(loss, terms, epoch, step, self.folder.last_checkpoint, self.global_step - 1)
            self.save(epoch, step)
        if signal_name:
            self.checkpoints.written()
            raise TrainingInterrupted(
                f"{signal_name}: stopped at epoch {epoch + 1}, step {step}; checkpoint saved to "
                f"{self.folder.last_checkpoint}; continue with `{runs.resume_command(self.folder.root)}` "
                "(the spec and its --set overrides are stored in the run)")

    def end_epoch(self, meter: EpochMeter, stage: TrainingStage, epoch: int) -> None:
        """Account the epoch, evaluate where due, record it, and checkpoint at its end."""
        self.flush_stability()
        if meter.steps:
            check_finite(sum(meter.sums.values()), {k: v / meter.steps for k, v in meter.sums.items()}, epoch,
                         meter.start + meter.steps, self.folder.last_checkpoint, self.global_step - 1)
        epoch_s = time.perf_counter() - meter.t0
        self.history["train_s"] += epoch_s
        self.history["data_s"] = self.history.get("data_s", 0.0) + meter.batches.waited
        images = meter.steps * self.config.batch_size * self.info.world_size
        self.history["images"] += images
        if self.evaluates and ((epoch + 1) % self.config.eval_every == 0 or epoch + 1 == self.plan.epochs):
            self.evaluate_epoch(epoch)
        record = {"kind": "epoch", "stage": stage.index, "epoch": epoch, "global_step": self.global_step,
                  **{f"train_{k}": round(v.item() / max(meter.steps, 1), 6) for k, v in meter.sums.items()},
                  **report.scores("student", self.student_acc, self.task.metrics),
                  "epoch_s": round(epoch_s, 3),
                  "images_per_s": round(images / max(epoch_s, 1e-9), 1),
                  "data_wait_share": round(meter.batches.waited / max(epoch_s, 1e-9), 3)}
        self.metrics.write(record)
        report.warn_if_starved(self, record)
        self.reporter.end_epoch(record)
        self.save(epoch + 1, 0)

    def evaluate_epoch(self, epoch: int) -> None:
        """Evaluate the student; a new best (the task's ``best_metric``, its way) is exported as
        best.safetensors."""
        self.student_acc = acc = self.evaluator.evaluate(self.global_step)
        metric = self.task.best_metric
        if self.task.better(acc, self.history.get(f"best_{metric}")):  # ties keep the earlier epoch
            self.history.update({f"best_{metric}": acc[metric], "best_epoch": epoch + 1})
            export_run(self, self.folder.best)

    # --------------------------------------------------------------------- checkpoints

    def save(self, epoch: int, step: int) -> None:
        self.history["wall_s"] = self.wall_s()
        if self.main or self.config.shard_student:  # a sharded student: every rank writes its shards
            self.saving_at = (epoch, step)
            self.checkpoints.save()

    def restore(self) -> str | None:
        """Load the last good checkpoint (last.pt, else prev.pt); a warning where it fell back."""
        state, warning = self.checkpoints.restore(self.main)
        self.teacher_acc = self.teacher_acc or legacy_teacher_scores(state)
        return "\n".join(filter(None, (warning, self.reshard_note))) or None

    # ------------------------------------------------------------------------ finishing

    def finish(self) -> dict:
        """Evaluate and export the student as the final stage left it (also when a resume
        finds no epoch left: a stop between the last checkpoint and the export), the task's
        reports, the summary and the curves."""
        self.checkpoints.written()
        self.distiller.set_stage(self.plan.stages[-1])
        self.history["wall_s"] = self.wall_s()
        if self.student_acc is None and self.evaluates:
            self.student_acc = self.evaluator.evaluate(self.global_step)
        self.test_acc = self.evaluator.evaluate_test(self.global_step) if self.evaluates else None
        if not self.main:  # a sharded student's other ranks evaluated too; rank 0 alone reports the scores
            self.student_acc = self.test_acc = None
        reports = self.task.reports(self) if self.main else self.task.reports_elsewhere(self)
        summary = report.summary(self) | reports
        export_run(self, self.folder.student)
        if self.main:
            self.folder.summary.write_text(json.dumps(summary, indent=2))
            self.metrics.close()
            plot_curves(self.metrics.read(), self.plan, self.folder.curves, title=self.name,
                        teacher_top1=self.teacher_acc and self.teacher_acc.get("top1"))
        if self.info.enabled:
            torch.distributed.barrier()
        return summary


def export_run(trainer: Trainer, path: Path) -> None:
    """The student's file at ``path``, written by the main rank (a sharded student's state
    gathered first, on the main rank's CPU, by every rank)."""
    state = full_state(trainer.distiller.student) if trainer.config.shard_student else None
    if trainer.main:
        readable(export_student(trainer.distiller.eval(), trainer.compiled, path, state))


def legacy_teacher_scores(state: dict) -> dict | None:
    """The teacher's scores of a checkpoint written before ``teacher_scores``: top-1 and top-5,
    or a denoiser's MSE, apart (None where it has neither)."""
    if state.get("teacher_top1") is not None:
        return {"top1": state["teacher_top1"], "top5": state.get("teacher_top5")}
    if state.get("teacher_mse") is not None:
        return {"mse": state["teacher_mse"]}
    return None


def place_models(distiller: Distiller, config: RuntimeConfig, plan: Plan, info: DistInfo) -> None:
    """cuDNN autotuning as configured, the step's memory format, a sharded teacher, the student's
    sharding and activation checkpoints."""
    apply_cudnn_benchmark(config.device, config.deterministic)  # what the benchmark measures is what users get
    if config.channels_last:
        to_channels_last(distiller)  # segments and the teacher too (Distiller._apply)
    if plan.teacher_shard and distiller.teacher is not None:
        shard_teacher(distiller.teacher, info, config.device)  # after its last move and cast
    apply_student_options(distiller, plan, config, info)  # FSDP2, activation checkpoints


def dcp_format(run: Trainer) -> bool:
    """Checkpoints in DCP's format (``ShardedCheckpoints``): a sharded student's, and a run's
    whose checkpoints already are (a sharded run resumed whole in one process, --reshard)."""
    folder = run.folder
    return run.config.shard_student or any(f.is_dir() for f in (folder.sharded_checkpoint,
                                                                 folder.previous_sharded_checkpoint))


def laid_out(plan: dict, reshard: bool) -> dict:
    """A plan's record as a resume compares it: with --reshard, whether the teacher is sharded
    is how the run is laid over its ranks, not what it trains (its dtype is kept)."""
    if not reshard:
        return plan
    kept = {k: v for k, v in plan.items() if k != "teacher_shard"}
    return {**kept, "teacher_dtype": plan.get("teacher_dtype", "float32")}


def check_data_record(run: Trainer, stored: dict | None) -> None:
    """The checkpoint's data record against this run's; with --reshard, one of another world
    size is accepted where each optimizer step reads the same windows (``runs.resharded_data``)."""
    if run.reshard and stored and "world_size" in stored:
        now = run.data.state_dict(stored["epoch"], stored["step"])
        then = (stored["batch_size"], stored["world_size"])
        if then != (now["batch_size"], now["world_size"]):
            caveat = per_rank_caveat(run, stored, now)
            stored = runs.resharded_data(stored, now)
            unit = "windows" if stored.get("loader") == "text" else "samples"
            run.reshard_note = (f"note: --reshard: the checkpoint of {then[1]} rank(s) continues on "
                                f"{now['world_size']}, data.batch_size {then[0]} -> {now['batch_size']}: each "
                                f"optimizer step reads the same {then[0] * then[1]} {unit} as before, in the same "
                                f"order{caveat}")
    run.data.check_resume(stored, str(run.folder.last_checkpoint))


def per_rank_caveat(run: Trainer, then: dict, now: dict) -> str:
    """What a step draws or computes per rank, and so differently at another number of ranks:
    the student's BatchNorm statistics (over each rank's batch), consistent teaching's mixing
    pairs (within it), the in-memory loader's flips (drawn after a crop offset per position of the
    epoch's order padded to a multiple of the ranks: other flips where the samples split unevenly)."""
    parts = []
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in run.distiller.student.modules()):
        parts.append(f"the student's BatchNorm layers normalise over each rank's {now['batch_size']} samples "
                     f"({then['batch_size']} before)")
    if run.config.mixup is not None:
        parts.append("data.mixup mixes pairs within each rank's batch")
    n, ranks = then.get("num_samples", 0), (then["world_size"], now["world_size"])
    memory = then.get("loader") == now.get("loader") == "memory"  # records before loaders were named: none
    drawn = memory and (lambda a: a.crop and a.flip)(AUGMENTATIONS.get(run.data.train.augment))
    if drawn and any(n % r for r in ranks):  # the flips follow the crops' draw, one per padded position
        parts.append(f"data.augment's flips are drawn anew ({n} samples split unevenly over "
                     f"{' or '.join(map(str, ranks))} ranks)")
    if not parts:
        return ""
    return f"; but {' and '.join(parts)}: the run goes on close to, not step for step as, the uninterrupted one"


def checkpoint_states(run: Trainer, spec_record: dict) -> dict[str, Any]:
    """The checkpoint layout, written once: what a checkpoint of the run ``run`` holds, by key,
    in the order a resume restores it: the records it checks first (the spec: a copied-in
    checkpoint of another run is refused; the plan), then each owner's state, then the run's
    own (position, history, the teacher's scores)."""
    def check_spec(stored: dict) -> None:
        also = runs.RESHARD_CHANGES if run.reshard else ()
        diff = [d for d in runs.spec_differences(stored, spec_record, also)
                if not d.startswith(("name:", "output:"))]  # a moved or renamed run trains the same
        if diff:
            raise KDGraphError(f"{run.folder.last_checkpoint} was written by a run with another spec (differs: "
                               f"{'; '.join(diff)}); it is not this run's checkpoint: resume with the spec it "
                               "was trained with, or start over with --force")

    def check_plan(stored: dict) -> None:
        if laid_out(stored, run.reshard) != laid_out(run.plan.to_dict(), run.reshard):
            raise KDGraphError(f"{run.folder.last_checkpoint} was written for another plan ({stored['method']}, "
                               f"{stored['epochs']} epochs); resume with the spec it was trained with, "
                               "or choose another output")

    def put_position(position: dict) -> None:
        run.position, run.global_step = position, position["global_step"]

    def put_history(history: dict) -> None:
        run.history, run.wall_before = history, history["wall_s"]

    scaler = run.stepper.scaler
    return {"spec": Value(lambda: spec_record, check_spec), "plan": Value(run.plan.to_dict, check_plan),
            "model": run.distiller, "optimizer": run.optimizer, "scheduler": run.scheduler,
            "scaler": Value(scaler.state_dict, lambda s: scaler.load_state_dict(s) if s else None),
            "data": Value(lambda: run.data.state_dict(*run.saving_at), lambda s: check_data_record(run, s)),
            "rng": RNG(),
            "position": Value(lambda: {"epoch": run.saving_at[0], "step": run.saving_at[1],
                                       "global_step": run.global_step}, put_position),
            "history": Value(lambda: dict(run.history), put_history),
            "teacher_scores": Value(lambda: run.teacher_acc, lambda s: setattr(run, "teacher_acc", dict(s)))}


def check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int, step: int, last: Path,
                 updates_before: int) -> None:
    """One host sync; called where the loop syncs anyway (logging, checkpoints, epoch ends).
    ``last``: the run's last checkpoint, kept; ``updates_before``: optimizer steps before this one."""
    value = float(loss.detach())
    if math.isfinite(value):
        return
    bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
    raise NonFiniteLoss(f"the loss became {value} at epoch {epoch}, step {step} ({bad}); stopped, {kept}. "
                        + nonfinite_advice(updates_before))


@contextmanager
def stop_signals():
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops."""
    requested = {"signal": None}

    def handler(signum, _frame):
        requested["signal"] = signal.Signals(signum).name

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(spec: Spec, resume: bool = False, quiet: bool = True, force: bool = False,
          source: dict | None = None, reshard: bool = False) -> dict:
    """Run ``spec`` to the end (or from its last checkpoint); returns the summary.

    The output folder is checked, locked and claimed before models and data are built:
    an earlier run there needs ``resume`` (with the same spec) or ``force`` (start over).
    ``source`` (the spec file and its overrides) is stored in the run folder. ``reshard``
    (with ``resume``): the checkpoint may be of another world size (runs.RESHARD_CHANGES).
    """
    if reshard and not resume:
        raise runs.OutputError("--reshard continues a run at another number of ranks: use it with --resume")
    info = init_distributed()
    run = plan_records(spec, TRAIN)  # the output folder is claimed before anything is built
    lock = runs.RunLock(run.output_dir)
    if info.is_main:
        runs.prepare_output(run.output_dir)
        lock.acquire()
    try:
        if info.is_main:
            finished = _finished(run, resume, reshard)
            if finished is not None:
                return finished
            runs.claim(run.output_dir, run.to_dict(), resume, force, source, reshard)
        if info.enabled:
            torch.distributed.barrier()
        with runs.unclaimed_on_refusal(run.output_dir, info.is_main and not resume):
            trainer = Trainer.from_spec(spec)
        trainer.reshard = reshard
        return trainer.fit(resume, quiet)
    finally:
        lock.release()


def _finished(run: RunRecord, resume: bool, reshard: bool = False) -> dict | None:
    """Resuming a run that already ended changes nothing: its summary, marked as such."""
    path = RunFolder(run.output_dir).summary
    if not (resume and path.exists()):
        return None
    stored = runs.stored_run(run.output_dir)
    also = runs.RESHARD_CHANGES if reshard else ()
    if stored is not None and (diff := runs.spec_differences(stored["spec"], run.to_dict(), also)):
        raise runs.OutputError(f"{run.output_dir} was trained with another spec (differs: {'; '.join(diff)})")
    summary = json.loads(path.read_text())
    summary.setdefault("task", spec_task(run).name)  # summaries before tasks: the spec's (per-pixel reads as classification)
    summary["already_finished"] = True
    return summary
