"""One optimisation step of a training stage: the ``Stepper`` owns what a step changes besides
the model (optimizer, LR scheduler, fp16 gradient scaler) and the module the step runs (the
distiller, DDP-wrapped and/or compiled).

With ``micro_batches`` k > 1 the batch is split into k parts whose losses, weighted by their
share of the batch, are backpropagated one after the other (DDP synchronises on the last only),
then one optimizer step: the whole batch's gradient with one part's activation memory. fp16
scales the loss (a disabled scaler passes everything through); ``clip_grad_norm`` clips the
unscaled gradient.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import TYPE_CHECKING, Any

import torch

from kdgraph.runtime.replay import split_cached
from kdgraph.runtime.techniques import (
    autocast,
    build_optimizer,
    decay_groups,
    grad_scaler,
    maybe_compile,
    no_weight_decay_names,
    reset_compile_caches,
    wrap_ddp,
)
from kdgraph.schedules import build_lr_scheduler

if TYPE_CHECKING:
    from kdgraph.runtime.config import RuntimeConfig
    from kdgraph.runtime.distiller import Distiller
    from kdgraph.spec.schema import OptimSpec

Terms = tuple[dict[str, torch.Tensor], torch.Tensor]


def optimizer_params(optim: OptimSpec, distiller: Distiller) -> list:
    """Every trainable parameter; with timm's weight-decay rule unless ``optim`` opts out."""
    if optim.decay_norms_and_biases:
        return [p for p in distiller.parameters() if p.requires_grad]
    return decay_groups(distiller.named_parameters(), optim.weight_decay,
                        no_weight_decay_names(distiller.student))


class Stepper:
    """The step's optimizer, scheduler, scaler and module, built once for a run."""

    def __init__(self, optim: OptimSpec, distiller: Distiller, config: RuntimeConfig, info, stage_epochs: list[int],
                 steps_per_epoch: int, find_unused: bool):
        """``optim``: the run's optimizer record (``RunRecord.optim``)."""
        device = config.device
        self.config = config
        self.optimizer = build_optimizer(optim, optimizer_params(optim, distiller), device)
        self.scheduler = build_lr_scheduler(self.optimizer, optim.lr_schedule, optim.lr,
                                            stage_epochs, steps_per_epoch, optim.min_lr_ratio)
        # a sharded student (runtime.shard_student) is FSDP2's, which reduces its gradients itself
        wrapped = distiller if config.shard_student else wrap_ddp(distiller, info, device, find_unused=find_unused)
        self.ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        if config.compile:
            # graphs of an earlier Trainer in this process (a test, a benchmark runner) count
            # against Dynamo's recompile limit for this one's step; see reset_compile_caches
            reset_compile_caches()
        self.module = maybe_compile(wrapped, config.compile)  # the distiller, DDP-wrapped and/or compiled
        self.scaler = grad_scaler(config.precision, device)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, cached: Any = None, side: tuple[torch.Tensor, ...] = (),
             progress: torch.Tensor | None = None) -> Terms:
        """One optimisation step of the current stage; returns device tensors (no host sync).
        ``cached``: the batch's teacher logits from the teacher cache, where the stage replays it;
        ``side``: the task's side inputs (a denoiser's timestep, class), split with the batch;
        ``progress``: epochs done, for the losses that read it."""
        cfg = self.config
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.micro_batches == 1:  # the whole batch: no split, no accumulator, no share
            terms, loss = self.forward_backward(xb, yb, cached=cached, side=side, progress=progress)
        else:
            terms, loss = self.accumulate(xb, yb, cached, side, progress)
        if cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms, loss

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, share: float = 1.0, cached: Any = None,
                         side: tuple[torch.Tensor, ...] = (), progress: torch.Tensor | None = None) -> Terms:
        """The loss terms of (x, y) and their sum; the sum's gradient, times ``share`` (a part's
        share of the batch), is added to the parameters' gradients. ``cached``: the teacher's
        logits of x from the teacher cache, where the stage replays it."""
        cfg = self.config
        with autocast(cfg.precision, cfg.device):
            extra = {"side": side} if side else {}  # the task's side inputs (a denoiser's timestep and class)
            terms = (self.module(x, y, progress=progress, **extra) if cached is None
                     else self.module(x, y, cached, progress=progress, **extra))
            loss = functools.reduce(operator.add, terms.values())  # no 0 + first term: one op less
        self.scaler.scale(loss if share == 1.0 else loss * share).backward()
        return terms, loss

    def accumulate(self, xb: torch.Tensor, yb: torch.Tensor, cached: Any = None,
                   side: tuple[torch.Tensor, ...] = (), progress: torch.Tensor | None = None) -> Terms:
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
                part, part_loss = self.forward_backward(xm, ym, share, cm, tuple(sm), progress)
            for name, value in part.items():
                terms[name] = terms.get(name, 0) + value.detach() * share
            loss = loss + part_loss.detach() * share
        return terms, loss

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
