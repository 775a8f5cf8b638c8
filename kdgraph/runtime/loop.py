"""The training loop: a Trainer built once from the spec, then epochs of steps, evaluation
and checkpoints, then the exported student and the summary.

    train(spec) = claim the run folder -> Trainer(spec) -> [restore] -> fit: for each epoch,
                  train_epoch (train_step, log_step, checkpoint) and end_epoch (evaluate,
                  record, save) -> finish (export, summary, curves)

Positions are (epoch, step-in-epoch); the data order, augmentation and learning rate
are pure functions of the position and the seed, and the checkpoint carries model,
optimizer, scheduler and RNG states, so a resumed run continues bit for bit.
The spec is read while the Trainer is built; the loop reads the compiled plan and the
resolved ``RuntimeConfig``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import operator
import random
import signal
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from kdgraph.compiler import compile_spec
from kdgraph.compiler.trace import check_class_inputs
from kdgraph.data import build_data
from kdgraph.diffusion import DenoiseTask, ddim_sample, denoise_mse, pixel_range, save_grid
from kdgraph.errors import KDGraphError
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.runtime import runs
from kdgraph.runtime.config import resolve_config
from kdgraph.runtime.curves import plot_curves
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.evaluate import accuracy
from kdgraph.runtime.export import export_student, preprocessing_of
from kdgraph.runtime.frechet import Judge
from kdgraph.runtime.metrics import Metrics, WaitTimed
from kdgraph.runtime.progress import Reporter
from kdgraph.runtime.replay import TeacherCache, split_cached
from kdgraph.runtime.runs import RunFolder, readable
from kdgraph.runtime.stability import StabilityTracker, nonfinite_advice
from kdgraph.runtime.techniques import (
    RecompileWatch,
    apply_cudnn_benchmark,
    autocast,
    build_optimizer,
    decay_groups,
    grad_scaler,
    init_distributed,
    maybe_compile,
    no_weight_decay_names,
    reset_compile_caches,
    resolve_device,
    shard_teacher,
    to_channels_last,
    use_deterministic_algorithms,
    wrap_ddp,
)
from kdgraph.schedules import build_lr_scheduler, stage_at
from kdgraph.stream import StreamLoader, available_cpus

if TYPE_CHECKING:
    from kdgraph.ir import TrainingStage
    from kdgraph.spec import Spec


class TrainingInterrupted(KDGraphError):
    """SIGINT/SIGTERM: the checkpoint was saved; `kdgraph train --resume` continues."""


class NonFiniteLoss(KDGraphError):
    """The loss became inf or NaN: training stops before saving, so the last checkpoint is good."""


STARVED_SHARE = 0.25  # an epoch that waited longer for data than this says so, once per run


def optimizer_params(spec: Spec, distiller: Distiller) -> list:
    """Every trainable parameter; with timm's weight-decay rule unless the spec opts out."""
    if spec.optim.decay_norms_and_biases:
        return [p for p in distiller.parameters() if p.requires_grad]
    return decay_groups(distiller.named_parameters(), spec.optim.weight_decay,
                        no_weight_decay_names(distiller.student))


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
    """A run of the compiled plan: built once from the spec (device, plan, data, distiller,
    optimizer, schedule, runtime techniques), then ``fit`` trains it to the end."""

    def __init__(self, spec: Spec):
        self.t_start = time.perf_counter()  # the run's wall time counts the build
        self.info = init_distributed()
        device = resolve_device(spec.runtime.device, self.info)
        if spec.runtime.num_threads:
            torch.set_num_threads(spec.runtime.num_threads)
        use_deterministic_algorithms(spec.runtime.deterministic)  # before any kernel runs
        torch.manual_seed(spec.seed)  # model and adapter initialisation
        random.seed(spec.seed)
        self.compiled = self.compile(spec)
        self.plan = self.compiled.plan
        self.stage_epochs = [st.epochs for st in self.plan.stages]
        self.config = resolve_config(spec, device, self.compiled.student.model)
        # the train split sharded over ranks; the test split whole, for the main rank's evaluation;
        # batches come normalised in the step's layout (no separate channels_last copy)
        self.data = build_data(spec, self.compiled.data, device, self.info, self.config.channels_last)
        # a denoiser (spec denoise): per-sample timestep and noise, keyed by the sample's index
        self.task = DenoiseTask.of(spec.denoise, spec.seed) if spec.denoise is not None else None
        self.denoise = spec.denoise
        if self.task is not None and isinstance(self.data.train, StreamLoader):
            raise KDGraphError("denoise: a denoiser is trained from data held in memory (data.loader: memory)")
        if self.denoise is not None and self.denoise.judge is not None:
            Judge.finished_run(self.denoise.judge)  # before training, not after it
            runs.check_judge_data(self.denoise.judge, spec.to_dict()["data"])
        check_class_inputs(self.compiled, self.data.num_classes, spec.denoise)
        if self.task is None and self.compiled.num_classes is not None \
                and self.data.num_classes > self.compiled.num_classes:
            raise KDGraphError(f"{spec.data.dataset} has {self.data.num_classes} classes but the student predicts "
                               f"{self.compiled.num_classes}: set student.kwargs.num_classes: {self.data.num_classes}")
        self.distiller = Distiller(self.compiled).to(device)  # the teacher and segments move with it
        # the stages that replay the teacher's logits read them here, batch by batch
        self.cache = (TeacherCache(spec.teacher.cache, self.info.rank, self.info.world_size, spec.data.batch_size,
                                   device) if self.plan.cache_stages else None)
        apply_cudnn_benchmark(device, self.config.deterministic)  # what the benchmark measures is what users get
        if self.config.channels_last:
            to_channels_last(self.distiller)  # segments and the teacher too (Distiller._apply)
        if self.plan.teacher_shard and self.distiller.teacher is not None:
            shard_teacher(self.distiller.teacher, self.info, device)  # after its last move and cast
        self.optimizer = build_optimizer(spec.optim, optimizer_params(spec, self.distiller), device)
        self.scheduler = build_lr_scheduler(self.optimizer, spec.optim.lr_schedule, spec.optim.lr,
                                            self.stage_epochs, len(self.data.train),
                                            spec.optim.min_lr_ratio)
        wrapped = wrap_ddp(self.distiller, self.info, device, find_unused=self.plan.feature_losses)
        self.ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        if self.config.compile:
            # graphs of an earlier Trainer in this process (a test, a benchmark runner) count
            # against Dynamo's recompile limit for this one's step; see reset_compile_caches
            reset_compile_caches()
        self.step_module = maybe_compile(wrapped, self.config.compile)  # the distiller, DDP-wrapped and/or compiled
        self.writer = ckpt.BackgroundWriter()  # checkpoints hashed and written while training goes on
        self.recompiles = RecompileWatch()  # attached while fit trains: limit hits, reported in the summary
        self.scaler = grad_scaler(self.config.precision, device)
        self.folder = RunFolder(spec.output_dir)
        self.name = spec.name
        self.spec_record = spec.to_dict()  # in every checkpoint: a resume refuses one of another run
        self.preprocessing = preprocessing_of(spec, self.data)  # what export's config.json records
        self.untrained_teacher = bool(spec.teacher and spec.teacher.checkpoint is None and not spec.teacher.pretrained)
        self.position = {"epoch": 0, "step": 0, "global_step": 0}
        self.global_step = 0
        self.history = {"wall_s": 0.0, "images": 0, "train_s": 0.0}
        self.wall_before = 0.0  # wall time of earlier processes of this run (resumes add up)
        self.teacher_acc: dict | None = None
        self.student_acc: dict | None = None  # the latest evaluation
        self.tracker: StabilityTracker | None = None
        self.data_warned = False
        self.bn_recalibrated_at: int | None = None  # the global step of the last BatchNorm re-estimate
        # set by fit: where records go, what the user sees, whether SIGINT/SIGTERM asked to stop
        self.metrics: Metrics | None = None
        self.reporter: Reporter | None = None
        self.stop: dict = {"signal": None}
        self.progress: torch.Tensor | None = None  # of the current step, set by train_epoch

    @staticmethod
    def compile(spec: Spec):
        """The compiled spec, models with their weights. A teacher that a cache may replay is
        deferred (built on the meta device, nothing loaded) and built for real only where some
        stage still runs it; the RNG is re-seeded for that second build, so the student starts
        from the same weights either way."""
        defer = ("teacher",) if spec.teacher is not None and spec.teacher.cache is not None else ()
        compiled = compile_spec(spec, fetch=("teacher", "student"), defer=defer)
        if defer and compiled.plan.live_teacher:
            torch.manual_seed(spec.seed)
            random.seed(spec.seed)
            compiled = compile_spec(spec, fetch=("teacher", "student"))
        return compiled

    @property
    def main(self) -> bool:
        return self.info.is_main

    @property
    def device(self) -> torch.device:
        return self.config.device

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
        self.start_notes(fallback)
        self.fit_projections()
        if self.config.track_stability:
            self.tracker = StabilityTracker(self.distiller.chain.segments)
        try:
            with stop_signals() as self.stop, self.reporter, self.recompiles:
                for epoch in range(self.position["epoch"], self.plan.epochs):
                    self.train_epoch(epoch)
        finally:
            self.writer.join()  # a stop (signal, non-finite loss) leaves the last checkpoint whole
        self.warn_if_recompiled()
        return self.finish()

    def warn_if_recompiled(self) -> None:
        """At the end of a compiled run whose step hit Dynamo's recompile limit: that function
        ran eager from then on, so the run was slower than a compiled one should be."""
        watch = self.recompiles
        if self.main and watch.hits:
            self.reporter.note(f"warning: torch.compile hit its recompile limit {watch.hits} time(s) "
                               f"({', '.join(watch.functions)}); those functions ran eager from then on. "
                               "summary.json counts them under compile")

    def start_notes(self, fallback: str | None) -> None:
        """The compiler's notes, a checkpoint fallback, and the teacher's accuracy (once per run)."""
        reporter, acc = self.reporter, None
        for note in self.compiled.notes if self.main else ():
            reporter.note(f"note: {note}")
        if fallback:
            reporter.note(fallback)
        if self.main and self.untrained_teacher:
            reporter.note("warning: the teacher has no checkpoint, so it distils random weights; "
                          "train one with a supervised spec and set teacher.checkpoint (or teacher.pretrained: true)")
        if self.main and self.cache is not None:
            stages = ", ".join(map(str, self.plan.cache_stages))
            reporter.note(f"note: stage(s) {stages} replay the teacher's logits from {self.cache.root} "
                          f"({self.cache.mode})" + ("" if self.distiller.teacher else "; the teacher is not built"))
        teacher = self.distiller.teacher
        if self.main and teacher is not None and (teacher.sharded or self.plan.teacher_dtype != "float32"):
            where = f"sharded over {self.info.world_size} ranks (FSDP2)" if teacher.sharded else "whole on each rank"
            reporter.note(f"note: the teacher runs in {self.plan.teacher_dtype}, {where}: "
                          f"{teacher.parameter_bytes() / 2**20:.1f} MiB of its parameters on this rank")
        # a sharded teacher runs on every rank at once (each gathers the others' shards): every
        # rank evaluates it on the whole test split, the main rank reports
        if teacher is not None and self.teacher_acc is None and (self.main or teacher.sharded):
            self.teacher_acc = acc = self.score(teacher)
        if self.main and teacher is not None and acc is not None:
            reporter.note(f"teacher denoising MSE {acc['mse']:.5f}" if "mse" in acc else
                          f"teacher top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%"
                          + (f", mIoU {acc['miou']:.2f}%" if "miou" in acc else ""))

    def fit_projections(self) -> None:
        """The plan's projection fit (``decompose.adapters: projected``), before stage 0 and once
        per run: a resumed run has its fit from the checkpoint (frozen buffers of the distiller)."""
        fit = self.plan.projection_fit
        if fit is None or self.distiller.projections_fitted:
            return
        batches = self.data.train.epoch(0)
        if self.task is not None:  # a denoiser's teacher sees epoch 0's noisy images and their side inputs
            batches = (self.prepare(xb, yb, idx, 0, 0) for xb, yb, idx in self.batches(0))
        used = self.distiller.fit_projections(batches, fit.batches)
        self.reporter.note(f"projections fitted: PCA of the teacher at block ends {list(fit.blocks)}, {used} batches")

    def stage_of(self, epoch: int) -> TrainingStage:
        return self.plan.stages[stage_at(self.stage_epochs, epoch)]

    def train_epoch(self, epoch: int) -> None:
        stage = self.stage_of(epoch)
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
        """The training batches of ``epoch`` from step ``start``, each with its samples' dataset
        indices where a denoiser's draws need them (else None)."""
        if self.task is not None:
            return self.data.train.epoch_indexed(epoch, start)
        return ((xb, yb, None) for xb, yb in self.data.train.epoch(epoch, start))

    def prepare(self, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor | None, epoch: int, step: int
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The step's (input, target, side inputs): a denoiser's noisy images, their true noise
        (velocity, with denoise.prediction: v) and (t,) or (t, y), drawn per sample from (seed,
        epoch, index) so that a resumed run draws exactly as the uninterrupted one; otherwise the
        batch (mixed: ``mix``), no side."""
        if self.task is not None:
            return self.task.draw(xb, yb, epoch, idx)
        return (*self.mix(xb, yb, epoch, step), ())

    def mix(self, xb: torch.Tensor, yb: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Consistent teaching (``data.mixup``): the batch mixed once, before the step, so that
        the teacher and the student read the same tensor; the labels become mixed soft targets.
        The draw is a function of (seed, epoch, this rank's batch position): a resumed run
        mixes exactly as the uninterrupted one."""
        position = step * self.info.world_size + self.info.rank
        return self.config.mix(xb, yb, epoch, position, self.compiled.num_classes or self.data.num_classes)

    def progress_at(self, epoch: int, step: int) -> torch.Tensor | None:
        """Epochs done by the end of ``step`` (e + (i + 1) / n), for the losses that read it
        (DKD's warm-up); a device tensor, so a compiled step does not recompile per value."""
        if not self.distiller.needs_progress:
            return None
        return torch.tensor(epoch + (step + 1) / len(self.data.train), device=self.device)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, cached: Any = None,
                   side: tuple[torch.Tensor, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimisation step of the current stage; returns device tensors (no host sync).
        ``cached``: the batch's teacher logits from the teacher cache, where the stage replays it;
        ``side``: a denoiser's side inputs (timestep, class), split with the batch.

        With ``micro_batches`` k > 1 the batch is split into k parts whose losses, weighted
        by their share of the batch, are backpropagated one after the other (DDP
        synchronises on the last only), then one optimizer step: the whole batch's gradient
        with one part's activation memory. fp16 scales the loss (a disabled scaler passes
        everything through); ``clip_grad_norm`` clips the unscaled gradient.
        """
        cfg = self.config
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.micro_batches == 1:  # the whole batch: no split, no accumulator, no share
            terms, loss = self.forward_backward(xb, yb, cached=cached, side=side)
        else:
            terms, loss = self.accumulate(xb, yb, cached, side)
        if cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms, loss

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, share: float = 1.0, cached: Any = None,
                         side: tuple[torch.Tensor, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss terms of (x, y) and their sum; the sum's gradient, times ``share`` (a part's
        share of the batch), is added to the parameters' gradients. ``cached``: the teacher's
        logits of x from the teacher cache, where the stage replays it."""
        cfg = self.config
        with autocast(cfg.precision, cfg.device):
            extra = {"side": side} if side else {}  # a denoiser's timestep and class
            terms = (self.step_module(x, y, progress=self.progress, **extra) if cached is None
                     else self.step_module(x, y, cached, progress=self.progress, **extra))
            loss = functools.reduce(operator.add, terms.values())  # no 0 + first term: one op less
        self.scaler.scale(loss if share == 1.0 else loss * share).backward()
        return terms, loss

    def accumulate(self, xb: torch.Tensor, yb: torch.Tensor, cached: Any = None,
                   side: tuple[torch.Tensor, ...] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``micro_batches`` parts of the batch (and of its cached teacher logits), backpropagated
        one after the other (DDP synchronises on the last only); returns the batch's terms and
        loss, each the parts' values weighted by their share of the batch."""
        k = self.config.micro_batches
        cached_parts = split_cached(cached, k) if cached is not None else [None] * k
        side_parts = list(zip(*(t.tensor_split(k) for t in side))) if side else [()] * k
        parts = [(x, y, c, sd) for x, y, c, sd in zip(xb.tensor_split(k), yb.tensor_split(k), cached_parts, side_parts)
                 if len(y)]
        terms: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=xb.device)
        for j, (xm, ym, cm, sm) in enumerate(parts):
            share = len(ym) / len(yb)
            last = j == len(parts) - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                part, part_loss = self.forward_backward(xm, ym, share, cm, tuple(sm))
            for name, value in part.items():
                terms[name] = terms.get(name, 0) + value.detach() * share
            loss = loss + part_loss.detach() * share
        return terms, loss

    def log_step(self, meter: EpochMeter, stage: TrainingStage, epoch: int, step: int,
                 terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        self.check_finite(loss, terms, epoch, step)
        images_per_s, wait_share = meter.window()
        record = {"kind": "step", "stage": stage.index, "epoch": epoch, "step": step,
                  "global_step": self.global_step, "lr": self.scheduler.get_last_lr()[0],
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
            self.check_finite(loss, terms, epoch, step)
            self.save(epoch, step)
        if signal_name:
            self.checkpoint_written()
            raise TrainingInterrupted(
                f"{signal_name}: stopped at epoch {epoch + 1}, step {step}; checkpoint saved to "
                f"{self.folder.last_checkpoint}; continue with `{runs.resume_command(self.folder.root)}` "
                "(the spec and its --set overrides are stored in the run)")

    def check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        """One host sync; called where the loop syncs anyway (logging, checkpoints, epoch ends)."""
        value = float(loss.detach())
        if math.isfinite(value):
            return
        bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        last = self.folder.last_checkpoint
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
        raise NonFiniteLoss(f"the loss became {value} at epoch {epoch}, step {step} ({bad}); stopped, {kept}. "
                            + nonfinite_advice(self.global_step - 1))

    def end_epoch(self, meter: EpochMeter, stage: TrainingStage, epoch: int) -> None:
        """Account the epoch, evaluate where due, record it, and checkpoint at its end."""
        self.flush_stability()
        if meter.steps:
            self.check_finite(sum(meter.sums.values()), {k: v / meter.steps for k, v in meter.sums.items()}, epoch,
                              meter.start + meter.steps)
        epoch_s = time.perf_counter() - meter.t0
        self.history["train_s"] += epoch_s
        self.history["data_s"] = self.history.get("data_s", 0.0) + meter.batches.waited
        images = meter.steps * self.config.batch_size * self.info.world_size
        self.history["images"] += images
        if self.main and ((epoch + 1) % self.config.eval_every == 0 or epoch + 1 == self.plan.epochs):
            self.evaluate_epoch(epoch)
        acc = self.student_acc
        record = {"kind": "epoch", "stage": stage.index, "epoch": epoch, "global_step": self.global_step,
                  **{f"train_{k}": round(v.item() / max(meter.steps, 1), 6) for k, v in meter.sums.items()},
                  **_scores("student", acc),
                  "epoch_s": round(epoch_s, 3),
                  "images_per_s": round(images / max(epoch_s, 1e-9), 1),
                  "data_wait_share": round(meter.batches.waited / max(epoch_s, 1e-9), 3)}
        self.metrics.write(record)
        self.warn_if_starved(record)
        self.reporter.end_epoch(record)
        self.save(epoch + 1, 0)

    def evaluate_epoch(self, epoch: int) -> None:
        """Evaluate the student; a new best top-1 (a denoiser: the lowest MSE) is exported as
        best.safetensors."""
        self.student_acc = acc = self.evaluate()
        key, sign = ("best_mse", -1.0) if "mse" in acc else ("best_top1", 1.0)
        if key not in self.history or sign * acc[key[5:]] > sign * self.history[key]:  # ties keep the earlier epoch
            self.history.update({key: acc[key[5:]], "best_epoch": epoch + 1})
            readable(export_student(self.distiller.eval(), self.compiled, self.folder.best))

    def warn_if_starved(self, record: dict) -> None:
        """Once per run: an epoch of a streamed run that mostly waited for its data."""
        train = self.data.train
        if (not self.main or self.data_warned or not isinstance(train, StreamLoader)
                or record["data_wait_share"] <= STARVED_SHARE):
            return
        self.data_warned = True
        self.reporter.note(f"warning: epoch {record['epoch'] + 1} waited for data {record['data_wait_share']:.0%} "
                           f"of the time: decoding is the bottleneck; raise runtime.num_workers (now "
                           f"{train.num_workers}, {available_cpus()} CPUs available to this process)")

    # ---------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def recalibrate_bn(self) -> None:
        """Re-estimate the BatchNorm statistics of the student's inference path on the first
        ``bn_recalibrate_batches`` batches of the training data (a whole pass without a bound).
        In decomposed stages each block's statistics were gathered on inputs derived from the
        teacher's features; the composed student feeds it its own, slightly different ones.
        The pass runs in train mode without gradients, with a cumulative average, on epoch 0's
        order (the same batches at every evaluation, in any process), and leaves the RNG
        untouched so that resumed runs stay exact. A pass at the step of the last one finds
        the statistics it would compute, and is skipped."""
        if self.bn_recalibrated_at == self.global_step:
            return
        self.bn_recalibrated_at = self.global_step
        norms = [m for m in self.distiller.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        was = self.distiller.training
        self.distiller.train()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for xb, yb, idx in itertools.islice(self.batches(0), self.config.bn_recalibrate_batches):
                xb, _, side = self.prepare(xb, yb, idx, 0, 0) if self.task is not None else (xb, yb, ())
                if self.config.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(self.config.precision, self.device):
                    self.distiller.inference(xb, side)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.distiller.train(was)

    def evaluate(self) -> dict[str, float]:
        """{'top1', 'top5'} of the composed student on the test split (BatchNorm re-estimated
        first where ``bn_recalibrate`` says so)."""
        setting = self.config.bn_recalibrate
        if setting is True or (setting == "auto" and len(self.distiller.groups) > 1):
            self.recalibrate_bn()
        was = self.distiller.training
        self.distiller.eval()
        try:
            return self.score(lambda x, *side: self.distiller.inference(x, side))
        finally:
            self.distiller.train(was)

    def score(self, forward) -> dict[str, float]:
        """``forward`` on the test split: top-1 and top-5 (and mIoU for a per-pixel task); a
        denoiser's MSE to the true noise (the velocity, with denoise.prediction: v) at each test
        image's fixed (t, ε)."""
        cfg = self.config
        if self.task is None:
            return accuracy(forward, self.data.test, self.device, cfg.precision, cfg.channels_last)

        def run(x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
            with autocast(cfg.precision, self.device):
                return forward(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x, *side)
        return denoise_mse(run, self.data.test, self.task)

    # --------------------------------------------------------------------- checkpoints

    def save(self, epoch: int, step: int) -> None:
        self.history["wall_s"] = self.wall_s()
        if not self.main:
            return
        self.checkpoint_written()  # the save before this one: its error, if any, stops the run here
        self.save_checkpoint(epoch, step)

    def checkpoint_written(self) -> None:
        """Wait for the checkpoint being written in the background; a failed write stops the run."""
        try:
            self.writer.wait()
        except ckpt.CheckpointWriteError as exc:
            raise KDGraphError(f"{exc}; free space and continue from it with "
                               f"`{runs.resume_command(self.folder.root)}`") from None

    def save_checkpoint(self, epoch: int, step: int) -> None:
        acc = self.teacher_acc
        self.writer.submit({
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "position": {"epoch": epoch, "step": step, "global_step": self.global_step},
            "data": self.data.state_dict(epoch, step),
            "plan": self.plan.to_dict(),
            "spec": self.spec_record,  # what restore compares: a copied-in checkpoint of another run is refused
            "teacher_top1": acc and acc.get("top1"),
            "teacher_top5": acc and acc.get("top5"),
            "teacher_mse": acc and acc.get("mse"),
            "history": dict(self.history),
        }, self.folder.last_checkpoint, keep_previous=True)

    def restore(self) -> str | None:
        """Load the last good checkpoint (last.pt, else prev.pt); returns a warning when it
        had to fall back."""
        last = self.folder.last_checkpoint
        state, warning = ckpt.load_latest(last)
        if warning and self.main and last.exists():
            last.replace(self.folder.corrupt_checkpoint)
            warning += f" (the damaged file is kept as {self.folder.corrupt_checkpoint})"
        # The spec first (it names what differs); checkpoints of kdgraph before this carry no
        # spec: the plan check below is all there is for them.
        diff = [d for d in runs.spec_differences(state.get("spec") or {}, self.spec_record)
                if not d.startswith(("name:", "output:"))]  # a moved or renamed run trains the same
        if diff:
            raise KDGraphError(f"{last} was written by a run with another spec (differs: {'; '.join(diff)}); it is "
                               "not this run's checkpoint: resume with the spec it was trained with, or start over "
                               "with --force")
        if state["plan"] != self.plan.to_dict():
            raise KDGraphError(f"{last} was written for another plan ({state['plan']['method']}, "
                               f"{state['plan']['epochs']} epochs); resume with the spec it was trained with, "
                               "or choose another output")
        self.distiller.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.data.check_resume(state.get("data"), str(last))
        ckpt.set_rng_state(state["rng"])
        self.position, self.history = state["position"], state["history"]
        self.global_step, self.wall_before = self.position["global_step"], self.history["wall_s"]
        if state["teacher_top1"] is not None:  # checkpoints before top-5 have no teacher_top5
            self.teacher_acc = {"top1": state["teacher_top1"], "top5": state.get("teacher_top5")}
        elif state.get("teacher_mse") is not None:
            self.teacher_acc = {"mse": state["teacher_mse"]}
        return warning

    # ------------------------------------------------------------------------ finishing

    def finish(self) -> dict:
        """Evaluate and export the student as the final stage left it (also when a resume
        finds no epoch left: a stop between the last checkpoint and the export), write the
        summary and the curves."""
        self.checkpoint_written()
        self.distiller.set_stage(self.plan.stages[-1])
        self.history["wall_s"] = self.wall_s()
        if self.student_acc is None and self.main:
            self.student_acc = self.evaluate()
        samples = self.write_samples() if self.main else self.sample_sharded_teacher()
        summary = self.summary() | samples
        if self.main:
            readable(export_student(self.distiller.eval(), self.compiled, self.folder.student))
            self.folder.summary.write_text(json.dumps(summary, indent=2))
            self.metrics.close()
            plot_curves(self.metrics.read(), self.plan, self.folder.curves, title=self.name,
                        teacher_top1=self.teacher_acc and self.teacher_acc.get("top1"))
        if self.info.enabled:
            torch.distributed.barrier()
        return summary

    @torch.no_grad()
    def sample(self, forward, n: int) -> torch.Tensor:
        """``n`` DDIM samples of ``forward`` (fixed seed and step count: the same model draws the
        same images), in the data's normalisation; ``forward`` predicts what ``denoise.prediction``
        says (the teacher as the student)."""
        return ddim_sample(forward, self.task.schedule, tuple(self.compiled.input_size), n, self.denoise.sample_steps,
                           self.task.seed, self.data.num_classes if self.task.class_conditional else None,
                           self.device, pixel_range(self.data.mean, self.data.std), self.task.prediction)

    def write_samples(self) -> dict:
        """A denoiser's DDIM sample grid (samples.png) and, with a judge (``denoise.judge``), the
        Fréchet distance of the student's and the teacher's samples to the test split in the
        judge's feature space, and its accuracy on their classes: {student_fd, ...}."""
        d = self.denoise
        n = 0 if d is None else max(d.sample_images, d.judge_samples if d.judge is not None else 0)
        if not n:
            return {}
        was = self.distiller.training
        self.distiller.eval()
        try:
            images = self.sample(lambda x, *side: self.distiller.inference(x, side), n)
        finally:
            self.distiller.train(was)
        if d.sample_images:
            readable(save_grid(images[:d.sample_images], self.data.mean, self.data.std, self.folder.samples))
        if d.judge is None:
            return {}
        return self.judged(images[:d.judge_samples])

    def sample_sharded_teacher(self) -> dict:
        """A rank other than the main one: where the main rank's judge samples the teacher and
        the teacher is sharded, this rank runs the same samples (every rank gathers the others'
        shards at each module) and drops them; {}."""
        d, teacher = self.denoise, self.distiller.teacher
        if d is not None and d.judge is not None and teacher is not None and teacher.sharded:
            self.sample(teacher, d.judge_samples)
        return {}

    def judged(self, images: torch.Tensor) -> dict:
        """The judge's verdict on the student's samples ``images`` and on the teacher's."""
        judge = Judge.from_run(self.denoise.judge, self.device)
        m = torch.tensor(self.data.mean, device=self.device).view(1, -1, 1, 1)
        s = torch.tensor(self.data.std, device=self.device).view(1, -1, 1, 1)
        to_pixels = lambda x: (x.to(self.device) * s + m).clamp(0, 1)  # noqa: E731
        real = torch.cat([xb for xb, _ in self.data.test.epoch(0)])[:len(images)]
        classes = torch.arange(len(images)) % self.data.num_classes if self.task.class_conditional else None
        out = {f"student_{k}": v for k, v in judge.judge(to_pixels(images), to_pixels(real), classes).items()}
        if self.distiller.teacher is not None:
            teacher = self.sample(self.distiller.teacher, len(images))
            out |= {f"teacher_{k}": v for k, v in judge.judge(to_pixels(teacher), to_pixels(real), classes).items()}
        return {"judge": judge.name, **out}

    def summary(self) -> dict:
        s, t, h = self.student_acc, self.teacher_acc, self.history
        return {
            "name": self.name, "method": self.plan.method, "k": self.plan.k, "n": self.plan.n,
            "epochs": self.plan.epochs,
            **_scores("student", s),
            "best_top1": h.get("best_top1"),
            **({"best_mse": h["best_mse"]} if "best_mse" in h else {}),
            "best_epoch": h.get("best_epoch"),
            **_scores("teacher", t),
            "wall_time_s": round(h["wall_s"], 2),
            "mean_images_per_s": round(h["images"] / max(h["train_s"], 1e-9), 1),
            "data_wait_share": round(h.get("data_s", 0.0) / max(h["train_s"], 1e-9), 3),
            "data": self.data.record(),
            # recompile_limit_hits: functions of the step Dynamo gave up on (they ran eager), this process
            "compile": {"enabled": self.config.compile, "recompile_limit_hits": self.recompiles.hits,
                        "functions_gone_eager": self.recompiles.functions,
                        "cudnn_benchmark": self.config.cudnn_benchmark,
                        "deterministic": self.config.deterministic},
            "output": str(self.folder.root),
            "preprocessing": self.preprocessing,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _scores(role: str, acc: dict | None) -> dict:
    """``{role}_top1``/``_top5`` (None before an evaluation) and, where measured, ``_miou`` (a
    per-pixel task: top-1 is the pixel accuracy) and ``_mse`` (a denoiser: no top-1)."""
    acc = acc or {}
    out = {f"{role}_top1": acc.get("top1"), f"{role}_top5": acc.get("top5")}
    return out | {f"{role}_{k}": acc[k] for k in ("miou", "mse") if k in acc}


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
          source: dict | None = None) -> dict:
    """Run ``spec`` to the end (or from its last checkpoint); returns the summary.

    The output folder is checked, locked and claimed before models and data are built:
    an earlier run there needs ``resume`` (with the same spec) or ``force`` (start over).
    ``source`` (the spec file and its overrides) is stored in the run folder.
    """
    info = init_distributed()
    lock = runs.RunLock(spec.output_dir)
    if info.is_main:
        runs.prepare_output(spec.output_dir)
        lock.acquire()
    try:
        if info.is_main:
            finished = _finished(spec, resume)
            if finished is not None:
                return finished
            runs.claim(spec.output_dir, spec.to_dict(), resume, force, source)
        if info.enabled:
            torch.distributed.barrier()
        with runs.unclaimed_on_refusal(spec.output_dir, info.is_main and not resume):
            trainer = Trainer(spec)
        return trainer.fit(resume, quiet)
    finally:
        lock.release()


def _finished(spec: Spec, resume: bool) -> dict | None:
    """Resuming a run that already ended changes nothing: its summary, marked as such."""
    path = RunFolder(spec.output_dir).summary
    if not (resume and path.exists()):
        return None
    stored = runs.stored_run(spec.output_dir)
    if stored is not None and (diff := runs.spec_differences(stored["spec"], spec.to_dict())):
        raise runs.OutputError(f"{spec.output_dir} was trained with another spec (differs: {'; '.join(diff)})")
    summary = json.loads(path.read_text())
    summary["already_finished"] = True
    return summary
