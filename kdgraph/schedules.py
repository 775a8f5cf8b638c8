"""Learning-rate schedules over the whole plan (all training stages, one step counter).

A schedule is a pure function of the global optimizer step, so resuming needs nothing
but the step: the LambdaLR built here keeps only ``last_epoch`` in its state_dict.

Kinds (registered in ``kdgraph.registry.SCHEDULES``, the values of ``optim.lr_schedule``;
``lr`` of step k, 0-based; ``min = min_lr_ratio * peak_lr``; ``n`` = steps):

- ``stage_cyclic``: one triangular cycle per training stage, as CyclicLR
  "triangular2" with cycles the length of the stages (StableKD): the lr rises linearly
  from ``min`` to the stage's peak over the first half of the stage and falls back over
  the second half; the amplitude halves each stage, so the peak of stage s is
  ``min + (peak_lr - min) / 2**s`` (= ``peak_lr / 2**s`` when ``min_lr_ratio`` is 0).
- ``onecycle``: linear from ``min`` up to ``peak_lr`` over the first 30 % of all steps
  (``ONECYCLE_PCT_START``, torch OneCycleLR's default), then cosine down to ``min``.
- ``cosine``: ``min + (peak - min) * (1 + cos(pi * k / n)) / 2``; no warm-up, step 0
  runs at the peak (as torch CosineAnnealingLR).
- ``constant``: ``peak_lr`` throughout.

The triangular curves (``stage_cyclic``, ``onecycle``) start at ``min``; they are sampled
at the *centre* of each step (time ``k + 0.5``) so that no step of a stage runs at lr 0
when ``min_lr_ratio`` is 0 — otherwise the first step of every stage would be wasted, and
a stage of a single step would not train at all. Steps past the end stay at the final
value of the curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kdgraph.registry import SCHEDULES

__all__ = ["ONECYCLE_PCT_START", "LRSchedule", "build_lr_scheduler", "stage_at", "stage_starts"]

ONECYCLE_PCT_START = 0.3


def stage_starts(stage_epochs: Sequence[int]) -> tuple[int, ...]:
    """The first epoch (or step, given stage lengths in steps) of each training stage: the
    stages run one after the other."""
    return tuple(itertools.accumulate(stage_epochs[:-1], initial=0))


def stage_at(stage_epochs: Sequence[int], epoch: int) -> int:
    """Index of the training stage that ``epoch`` belongs to (a stage of no epochs holds none;
    past the end, the last stage). The one epoch -> stage mapping: the loop, the learning rate
    and the curves read it here."""
    stage = 0
    for s, (start, e) in enumerate(zip(stage_starts(stage_epochs), stage_epochs)):
        if e and start <= epoch:
            stage = s
    return stage


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every global step of a plan. ``stage_epochs`` lists the epochs
    of each training stage in order; ``steps_per_epoch`` is the optimizer steps per epoch."""

    kind: str
    peak_lr: float
    stage_epochs: tuple[int, ...]
    steps_per_epoch: int
    min_lr_ratio: float = 0.0
    stage_starts: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; valid: {', '.join(SCHEDULES.names())}")
        object.__setattr__(self, "stage_epochs", tuple(int(e) for e in self.stage_epochs))
        if not self.stage_epochs or any(e < 0 for e in self.stage_epochs) or sum(self.stage_epochs) == 0:
            raise ValueError(f"stage_epochs must be non-negative with a positive total, got {self.stage_epochs}")
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        starts = tuple(s * self.steps_per_epoch for s in stage_starts(self.stage_epochs))
        object.__setattr__(self, "stage_starts", starts)

    @property
    def total_steps(self) -> int:
        return sum(self.stage_epochs) * self.steps_per_epoch

    @property
    def min_lr(self) -> float:
        return self.min_lr_ratio * self.peak_lr

    def stage_of(self, step: int) -> int:
        """Index of the training stage that global ``step`` belongs to (the last stage past the end)."""
        return stage_at(self.stage_epochs, min(max(step, 0), self.total_steps - 1) // self.steps_per_epoch)

    def lr_at(self, step: int) -> float:
        return SCHEDULES.get(self.kind)(self, step)

    def __call__(self, step: int) -> float:
        return self.lr_at(step)


# The kinds, in the order they are listed to users; each gives the lr of a global step.


@SCHEDULES.register("stage_cyclic")
def _stage_cyclic(schedule: LRSchedule, step: int) -> float:
    lo, hi = schedule.min_lr, schedule.peak_lr
    s = schedule.stage_of(step)
    length = schedule.stage_epochs[s] * schedule.steps_per_epoch
    u = min(max(step - schedule.stage_starts[s], 0) + 0.5, length) / length
    triangle = 1.0 - abs(2.0 * u - 1.0)
    return lo + (hi - lo) / 2**s * triangle


@SCHEDULES.register("onecycle")
def _onecycle(schedule: LRSchedule, step: int) -> float:
    lo, hi, n = schedule.min_lr, schedule.peak_lr, schedule.total_steps
    t = min(max(step, 0) + 0.5, n) / n  # step centre, as a fraction of the run
    if t <= ONECYCLE_PCT_START:
        return lo + (hi - lo) * t / ONECYCLE_PCT_START
    u = (t - ONECYCLE_PCT_START) / (1.0 - ONECYCLE_PCT_START)
    return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * u))


@SCHEDULES.register("cosine")
def _cosine(schedule: LRSchedule, step: int) -> float:
    lo, hi, n = schedule.min_lr, schedule.peak_lr, schedule.total_steps
    k = min(max(step, 0), n)
    return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * k / n))


@SCHEDULES.register("constant")
def _constant(schedule: LRSchedule, step: int) -> float:
    return schedule.peak_lr


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    peak_lr: float,
    stage_epochs: Sequence[int],
    steps_per_epoch: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that sets the lr of step k to ``LRSchedule(...).lr_at(k)``.

    Call ``scheduler.step()`` once after every optimizer step. Each param group's lr is
    scaled by ``lr_at(k) / peak_lr``: a group created with ``lr=peak_lr`` follows the
    schedule exactly, a group with another lr keeps its ratio to it. The state_dict holds
    only the step counter; resume by building the same scheduler and loading it.
    """
    schedule = LRSchedule(kind, float(peak_lr), tuple(stage_epochs), int(steps_per_epoch), float(min_lr_ratio))
    if peak_lr <= 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    # A plain closure (not a callable object) so LambdaLR.state_dict stores nothing but the step.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_at(step) / schedule.peak_lr)
