"""The training loop: build, run the plan's stages, evaluate, checkpoint, export.

    train(spec) = build (compile, data, distiller, optimizer, schedule)
                  -> [resume] -> for each epoch: steps, evaluation, checkpoint
                  -> export, summary, curves

Positions are (epoch, step-in-epoch); the data order, augmentation and learning rate
are pure functions of the position and the seed, and the checkpoint carries model,
optimizer, scheduler and RNG states, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kdgraph.compiler import Compiled, compile_spec
from kdgraph.errors import KDGraphError
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.runtime import runs
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.evaluate import accuracy
from kdgraph.runtime.export import export_student, preprocessing_of
from kdgraph.runtime.progress import Reporter
from kdgraph.runtime.stability import StabilityTracker
from kdgraph.runtime.techniques import (
    DistInfo,
    autocast,
    build_optimizer,
    decay_groups,
    grad_scaler,
    init_distributed,
    maybe_compile,
    no_weight_decay_names,
    resolve_device,
    to_channels_last,
    use_channels_last,
    wrap_ddp,
)
from kdgraph.schedules import build_lr_scheduler
from kdgraph.stream import Data, StreamLoader, available_cpus, build_data

if TYPE_CHECKING:
    from collections.abc import Iterable

    from kdgraph.data import DeviceLoader
    from kdgraph.spec import Spec


class TrainingInterrupted(KDGraphError):
    """SIGINT/SIGTERM: the checkpoint was saved; `kdgraph train --resume` continues."""


class NonFiniteLoss(KDGraphError):
    """The loss became inf or NaN: training stops before saving, so the last checkpoint is good."""


def _check_finite(run: Run, loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """One host sync; called where the loop syncs anyway (logging, checkpoints, epoch ends)."""
    value = float(loss.detach())
    if math.isfinite(value):
        return
    bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    last = run.out / "checkpoints" / "last.pt"
    kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
    raise NonFiniteLoss(f"the loss became {value} at epoch {epoch}, step {step} ({bad}); stopped, {kept}. "
                        "Lower optim.lr, set optim.clip_grad_norm, or use precision fp32")


@dataclass
class Run:
    """Everything the loop needs, built once."""

    spec: Spec
    compiled: Compiled
    info: DistInfo
    device: torch.device
    distiller: Distiller
    step_module: torch.nn.Module  # the distiller, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DeviceLoader | StreamLoader
    test_loader: DeviceLoader | StreamLoader
    channels_last: bool
    out: Path
    scaler: torch.amp.GradScaler
    data: Data
    ddp: torch.nn.parallel.DistributedDataParallel | None = None

    @property
    def stage_starts(self) -> list[int]:
        starts, at = [], 0
        for st in self.compiled.plan.stages:
            starts.append(at)
            at += st.epochs
        return starts

    def stage_of(self, epoch: int):
        stages = self.compiled.plan.stages
        return next(st for st, start in reversed(list(zip(stages, self.stage_starts))) if epoch >= start)


def build_run(spec: Spec) -> Run:
    info = init_distributed()
    device = resolve_device(spec.runtime.device, info)
    if spec.runtime.num_threads:
        torch.set_num_threads(spec.runtime.num_threads)
    torch.manual_seed(spec.seed)  # model and adapter initialisation
    random.seed(spec.seed)
    compiled = compile_spec(spec, fetch=("teacher", "student"))
    data = build_data(spec, compiled.data, device, info)  # evaluation: the main rank, the whole test split
    if compiled.num_classes is not None and data.num_classes > compiled.num_classes:
        raise KDGraphError(f"{spec.data.dataset} has {data.num_classes} classes but the student predicts "
                           f"{compiled.num_classes}: set student.kwargs.num_classes: {data.num_classes}")
    train_loader = data.train
    distiller = Distiller(compiled).to(device)  # the teacher and segments move with it
    cl = use_channels_last(spec.runtime.channels_last, compiled.student.model, device)
    if cl:
        to_channels_last(distiller)  # segments and the teacher too (Distiller._apply)
    optimizer = build_optimizer(spec.optim, optimizer_params(spec, distiller), device)
    scheduler = build_lr_scheduler(optimizer, spec.optim.lr_schedule, spec.optim.lr,
                                   [st.epochs for st in compiled.plan.stages], len(train_loader),
                                   spec.optim.min_lr_ratio)
    wrapped = wrap_ddp(distiller, info, device, find_unused=compiled.plan.feature_losses)
    ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
    step_module = maybe_compile(wrapped, spec.runtime.compile)
    return Run(spec, compiled, info, device, distiller, step_module, optimizer, scheduler,
               train_loader, data.test, cl, spec.output_dir, grad_scaler(spec.runtime.precision, device), data, ddp)


def optimizer_params(spec: Spec, distiller: Distiller) -> list:
    """Every trainable parameter; with timm's weight-decay rule unless the spec opts out."""
    if spec.optim.decay_norms_and_biases:
        return [p for p in distiller.parameters() if p.requires_grad]
    return decay_groups(distiller.named_parameters(), spec.optim.weight_decay,
                        no_weight_decay_names(distiller.student))


class WaitTimed:
    """A batch iterator that adds up, in ``waited``, the seconds spent waiting for its next
    batch (timm's train loop logs the same as data_time)."""

    def __init__(self, batches: Iterable):
        self.batches, self.waited = iter(batches), 0.0

    def __iter__(self) -> WaitTimed:
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - t0


STARVED_SHARE = 0.25  # an epoch that waited longer for data than this says so, once per run


def _starved(run: Run, record: dict) -> bool:
    return isinstance(run.train_loader, StreamLoader) and record["data_wait_share"] > STARVED_SHARE


def _data_starved_warning(run: Run, record: dict) -> str:
    return (f"warning: epoch {record['epoch'] + 1} waited for data {record['data_wait_share']:.0%} of the time: "
            f"decoding is the bottleneck; raise runtime.num_workers (now {run.train_loader.num_workers}, "
            f"{available_cpus()} CPUs available to this process)")


def train_step(run: Run, xb: torch.Tensor, yb: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step of the current stage; returns device tensors (no host sync).

    With ``runtime.micro_batches`` k > 1 the batch is split into k parts whose losses,
    weighted by their share of the batch, are backpropagated one after the other (DDP
    synchronises on the last only), then one optimizer step: the whole batch's gradient
    with one part's activation memory. fp16 scales the loss (a disabled scaler passes
    everything through); ``optim.clip_grad_norm`` clips the unscaled gradient.
    """
    if run.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    precision = run.spec.runtime.precision
    run.optimizer.zero_grad(set_to_none=True)
    parts = [(x, y) for x, y in zip(xb.tensor_split(run.spec.runtime.micro_batches),
                                    yb.tensor_split(run.spec.runtime.micro_batches)) if len(y)]
    terms: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=xb.device)
    for j, (xm, ym) in enumerate(parts):
        share = len(ym) / len(yb)
        last = j == len(parts) - 1
        sync = contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync()
        with sync:
            with autocast(precision, run.device):
                part = run.step_module(xm, ym)
                part_loss = sum(part.values())
            run.scaler.scale(part_loss * share if len(parts) > 1 else part_loss).backward()
        if len(parts) == 1:
            terms, loss = part, part_loss
        else:
            for name, value in part.items():
                terms[name] = terms.get(name, 0) + value.detach() * share
            loss = loss + part_loss.detach() * share
    clip = run.spec.optim.clip_grad_norm
    if clip is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return terms, loss


@torch.no_grad()
def recalibrate_bn(run: Run) -> None:
    """Re-estimate the BatchNorm statistics of the student's inference path on one pass of
    training data. In decomposed stages each block's statistics were gathered on inputs
    derived from the teacher's features; the composed student feeds it its own, slightly
    different ones. The pass runs in train mode without gradients, with a cumulative
    average, and leaves the RNG untouched so that resumed runs stay exact."""
    norms = [m for m in run.distiller.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was = run.distiller.training
    run.distiller.train()
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for xb, _ in run.train_loader.epoch(0):
            if run.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(run.spec.runtime.precision, run.device):
                run.distiller.inference(xb)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    run.distiller.train(was)


def evaluate_student(run: Run) -> dict[str, float]:
    """{'top1', 'top5'} of the composed student on the test split (BatchNorm re-estimated first
    where ``runtime.bn_recalibrate`` says so)."""
    setting = run.spec.runtime.bn_recalibrate
    if setting is True or (setting == "auto" and len(run.distiller.groups) > 1):
        recalibrate_bn(run)
    was = run.distiller.training
    run.distiller.eval()
    try:
        return accuracy(run.distiller.inference, run.test_loader, run.device, run.spec.runtime.precision,
                        run.channels_last)
    finally:
        run.distiller.train(was)


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


class Metrics:
    """metrics.jsonl, appended line by line (main rank only); with ``tensorboard``, every
    numeric field also as a TensorBoard scalar ``KIND/FIELD`` at the record's global step."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.board = None
        if not enabled:
            return
        lines = []
        if keep_until_step is not None and path.exists():  # resume: drop what the checkpoint lost
            lines = [ln for ln in path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["global_step"] <= keep_until_step]
        path.write_text("".join(ln + "\n" for ln in lines))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise KDGraphError("runtime.log: tensorboard needs the tensorboard package; install it with "
                                   "pip install 'kdgraph[tensorboard]' (or pip install tensorboard)") from None
            # purge_step: a resumed run drops the events the checkpoint did not keep, as metrics.jsonl does
            self.board = SummaryWriter(str(path.parent / "tensorboard"),
                                       purge_step=None if keep_until_step is None else keep_until_step + 1)

    def write(self, record: dict) -> None:
        if self.enabled:
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.board is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                        self.board.add_scalar(f"{record['kind']}/{key}", value, record["global_step"])
                if record["kind"] == "epoch":
                    self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def read(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def _save(run: Run, epoch: int, step: int, global_step: int, teacher_acc: dict | None, best: dict) -> None:
    if not run.info.is_main:
        return
    try:
        _save_checkpoint(run, epoch, step, global_step, teacher_acc, best)
    except ckpt.CheckpointWriteError as exc:
        raise KDGraphError(f"{exc}; free space and continue from it with `{runs.resume_command(run.out)}`") from None


def _save_checkpoint(run: Run, epoch: int, step: int, global_step: int, teacher_acc: dict | None,
                     best: dict) -> None:
    ckpt.save_atomic({
        "model": run.distiller.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": ckpt.rng_state(),
        "position": {"epoch": epoch, "step": step, "global_step": global_step},
        "data": run.data.state_dict(epoch, step),
        "plan": run.compiled.plan.to_dict(),
        "spec": run.spec.to_dict(),  # what _resume compares: a copied-in checkpoint of another run is refused
        "teacher_top1": teacher_acc and teacher_acc["top1"],
        "teacher_top5": teacher_acc and teacher_acc["top5"],
        "history": best,
    }, run.out / "checkpoints" / "last.pt", keep_previous=True)


def _resume(run: Run) -> tuple[dict, str | None]:
    """The state of the last good checkpoint (last.pt, else prev.pt) loaded into ``run``,
    and a warning when it had to fall back."""
    last = run.out / "checkpoints" / "last.pt"
    state, warning = ckpt.load_latest(last)
    if warning and run.info.is_main and last.exists():
        # Set aside for inspection; left in place, the next save would rotate it into prev.pt.
        last.replace(last.with_name("last.pt.corrupt"))
        warning += f" (the damaged file is kept as {last.with_name('last.pt.corrupt')})"
    # The spec first (it names what differs); checkpoints of kdgraph before this carry no
    # spec: the plan check below is all there is for them.
    diff = [d for d in runs.spec_differences(state.get("spec") or {}, run.spec.to_dict())
            if not d.startswith(("name:", "output:"))]  # a moved or renamed run trains the same
    if diff:
        raise KDGraphError(f"{run.out}/checkpoints/last.pt was written by a run with another spec "
                           f"(differs: {'; '.join(diff)}); it is not this run's checkpoint: resume with the "
                           "spec it was trained with, or start over with --force")
    if state["plan"] != run.compiled.plan.to_dict():
        raise KDGraphError(f"{run.out}/checkpoints/last.pt was written for another plan "
                           f"({state['plan']['method']}, {state['plan']['epochs']} epochs); "
                           "resume with the spec it was trained with, or choose another output")
    run.distiller.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.data.check_resume(state.get("data"), f"{run.out}/checkpoints/last.pt")
    ckpt.set_rng_state(state["rng"])
    return state, warning


def train(spec: Spec, resume: bool = False, quiet: bool = True, force: bool = False,
          source: dict | None = None) -> dict:
    """Run ``spec`` to the end (or from its last checkpoint); returns the summary.

    The output folder is checked, locked and claimed before models and data are built:
    an earlier run there needs ``resume`` (with the same spec) or ``force`` (start over).
    ``source`` (the spec file and its overrides) is recorded in OUT/run.json.
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
        return _train(spec, resume, quiet)
    finally:
        lock.release()


def _finished(spec: Spec, resume: bool) -> dict | None:
    """Resuming a run that already ended changes nothing: its summary, marked as such."""
    path = spec.output_dir / "summary.json"
    if not (resume and path.exists()):
        return None
    stored = runs.stored_run(spec.output_dir)
    if stored is not None and (diff := runs.spec_differences(stored["spec"], spec.to_dict())):
        raise runs.OutputError(f"{spec.output_dir} was trained with another spec (differs: {'; '.join(diff)})")
    summary = json.loads(path.read_text())
    summary["already_finished"] = True
    return summary


def _train(spec: Spec, resume: bool, quiet: bool) -> dict:
    t_start = time.perf_counter()
    run = build_run(spec)
    main = run.info.is_main
    if main:
        (run.out / "plan.json").write_text(json.dumps(run.compiled.to_dict(), indent=2))
    position = {"epoch": 0, "step": 0, "global_step": 0}
    teacher_acc, history = None, {"wall_s": 0.0, "images": 0, "train_s": 0.0}
    fallback = None
    if resume:
        state, fallback = _resume(run)
        position, history = state["position"], state["history"]
        if state["teacher_top1"] is not None:  # checkpoints before top-5 have no teacher_top5
            teacher_acc = {"top1": state["teacher_top1"], "top5": state.get("teacher_top5")}
    # wall time adds up across resumes: what earlier processes spent, plus this one so far
    wall_before = history["wall_s"]

    def save(epoch: int, step: int) -> None:
        history["wall_s"] = wall_before + time.perf_counter() - t_start
        _save(run, epoch, step, gstep, teacher_acc, history)
    metrics = Metrics(run.out / "metrics.jsonl", main, position["global_step"] if resume else None,
                      tensorboard=spec.runtime.log == "tensorboard")
    plan = run.compiled.plan
    total_epochs = plan.epochs
    reporter = Reporter(quiet, total_epochs, len(run.train_loader), plan, silent=not main)
    for note in run.compiled.notes if main else ():
        reporter.note(f"note: {note}")
    if fallback:
        reporter.note(fallback)
    if main and spec.teacher and spec.teacher.checkpoint is None and not spec.teacher.pretrained:
        reporter.note("warning: the teacher has no checkpoint, so it distils random weights; "
                      "train one with a supervised spec and set teacher.checkpoint (or teacher.pretrained: true)")
    if main and run.distiller.teacher is not None and teacher_acc is None:
        teacher_acc = accuracy(run.distiller.teacher, run.test_loader, run.device, spec.runtime.precision,
                               run.channels_last)
        reporter.note(f"teacher top-1 {teacher_acc['top1']:.2f}%, top-5 {teacher_acc['top5']:.2f}%"
                      + (f", mIoU {teacher_acc['miou']:.2f}%" if "miou" in teacher_acc else ""))
    if plan.fit is not None and not run.distiller.projections_fitted:  # a resumed run loads its fit
        used = run.distiller.fit_projections(run.train_loader.epoch(0), plan.fit.batches)
        reporter.note(f"projections fitted: PCA of the teacher at block ends {list(plan.fit.blocks)}, {used} batches")
    rt = spec.runtime
    gstep = position["global_step"]
    student_acc = None
    tracker = StabilityTracker(run.distiller.chain.segments) if rt.track_stability else None
    data_warned = False
    with stop_signals() as stop, reporter:
        for epoch in range(position["epoch"], total_epochs):
            stage = run.stage_of(epoch)
            run.distiller.set_stage(stage)
            run.distiller.train()
            start = position["step"] if epoch == position["epoch"] else 0
            sums: dict[str, torch.Tensor] = {}
            steps_done, t_epoch, t_log, log_images = 0, time.perf_counter(), time.perf_counter(), 0
            reporter.start_epoch(epoch, stage, start)
            batches, waited_log = WaitTimed(run.train_loader.epoch(epoch, start)), 0.0
            for step, (xb, yb) in enumerate(batches, start=start):
                terms, loss = train_step(run, xb, yb)
                gstep += 1
                if tracker is not None:
                    tracker.update(gstep)
                steps_done += 1
                log_images += len(yb) * run.info.world_size
                for name, value in terms.items():  # stays on the device: no host sync
                    sums[name] = sums.get(name, 0) + value.detach()
                if gstep % rt.log_every == 0:
                    _check_finite(run, loss, terms, epoch, step + 1)
                    now = time.perf_counter()
                    record = {"kind": "step", "stage": stage.index, "epoch": epoch, "step": step + 1,
                              "global_step": gstep, "lr": run.scheduler.get_last_lr()[0],
                              **{k: round(v.item(), 6) for k, v in terms.items()},
                              "loss": round(loss.item(), 6),
                              "images_per_s": round(log_images / max(now - t_log, 1e-9), 1),
                              "data_wait_share": round((batches.waited - waited_log) / max(now - t_log, 1e-9), 3)}
                    metrics.write(record)
                    reporter.log(record)
                    for rec in tracker.flush() if tracker is not None else ():
                        metrics.write(rec)
                    t_log, log_images, waited_log = now, 0, batches.waited
                reporter.advance()
                if stop["signal"] or (rt.checkpoint_every and gstep % rt.checkpoint_every == 0):
                    _check_finite(run, loss, terms, epoch, step + 1)
                    save(epoch, step + 1)
                if stop["signal"]:
                    raise TrainingInterrupted(
                        f"{stop['signal']}: stopped at epoch {epoch + 1}, step {step + 1}; checkpoint saved to "
                        f"{run.out / 'checkpoints' / 'last.pt'}; continue with `{runs.resume_command(run.out)}` "
                        "(the spec and its --set overrides are stored in the run)")
            for rec in tracker.flush() if tracker is not None else ():
                metrics.write(rec)
            if steps_done:
                _check_finite(run, sum(sums.values()), {k: v / steps_done for k, v in sums.items()}, epoch,
                              start + steps_done)
            epoch_s = time.perf_counter() - t_epoch
            history["train_s"] += epoch_s
            history["data_s"] = history.get("data_s", 0.0) + batches.waited
            history["images"] += steps_done * spec.data.batch_size * run.info.world_size
            if main and ((epoch + 1) % rt.eval_every == 0 or epoch + 1 == total_epochs):
                student_acc = evaluate_student(run)
                if student_acc["top1"] > history.get("best_top1", -1.0):  # ties keep the earlier epoch
                    history.update(best_top1=student_acc["top1"], best_epoch=epoch + 1)
                    runs.readable(export_student(run.distiller.eval(), run.compiled, run.out / "best.safetensors"))
            record = {"kind": "epoch", "stage": stage.index, "epoch": epoch, "global_step": gstep,
                      **{f"train_{k}": round(v.item() / max(steps_done, 1), 6) for k, v in sums.items()},
                      "student_top1": student_acc and student_acc["top1"],
                      "student_top5": student_acc and student_acc["top5"],
                      **({"student_miou": student_acc["miou"]} if student_acc and "miou" in student_acc else {}),
                      "epoch_s": round(epoch_s, 3),
                      "images_per_s": round(steps_done * spec.data.batch_size * run.info.world_size
                                            / max(epoch_s, 1e-9), 1),
                      "data_wait_share": round(batches.waited / max(epoch_s, 1e-9), 3)}
            metrics.write(record)
            if main and not data_warned and _starved(run, record):
                data_warned = True
                reporter.note(_data_starved_warning(run, record))
            reporter.end_epoch(record)
            save(epoch + 1, 0)
            position = {"epoch": epoch + 1, "step": 0, "global_step": gstep}
    # The student is evaluated and exported as the final stage left it, also when a resume
    # finds no epoch left (a stop between the last checkpoint and the export).
    run.distiller.set_stage(plan.stages[-1])
    history["wall_s"] = wall_before + time.perf_counter() - t_start
    if student_acc is None and main:
        student_acc = evaluate_student(run)
    summary = {
        "name": spec.name, "method": plan.method, "k": plan.k, "n": plan.n, "epochs": total_epochs,
        "student_top1": student_acc and student_acc["top1"], "student_top5": student_acc and student_acc["top5"],
        "best_top1": history.get("best_top1"),
        "best_epoch": history.get("best_epoch"),
        "teacher_top1": teacher_acc and teacher_acc["top1"], "teacher_top5": teacher_acc and teacher_acc["top5"],
        # a per-pixel task: top-1 is the pixel accuracy, and the mean IoU is reported too
        **({"student_miou": student_acc["miou"]} if student_acc and "miou" in student_acc else {}),
        **({"teacher_miou": teacher_acc["miou"]} if teacher_acc and "miou" in teacher_acc else {}),
        "wall_time_s": round(history["wall_s"], 2),
        "mean_images_per_s": round(history["images"] / max(history["train_s"], 1e-9), 1),
        "data_wait_share": round(history.get("data_s", 0.0) / max(history["train_s"], 1e-9), 3),
        "data": run.data.record(),
        "output": str(run.out),
        "preprocessing": preprocessing_of(spec, run.data),  # what export's config.json records
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if main:
        runs.readable(export_student(run.distiller.eval(), run.compiled, run.out / "student.safetensors"))
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        from kdgraph.runtime.curves import plot_curves

        metrics.close()
        plot_curves(metrics.read(), plan, run.out / "curves.png", title=spec.name,
                    teacher_top1=teacher_acc and teacher_acc["top1"])
    if run.info.enabled:
        torch.distributed.barrier()
    return summary
