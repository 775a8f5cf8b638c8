"""Tasks: what is special about a kind of run, one registered entry each (``TASKS``).

A task owns what a batch is (inputs, side inputs, targets), its head loss entry
(``Task.head_loss``), its metrics and which way "best" points, its evaluation and reports,
and its export layout; the runtime and the CLI ask the task and never test its name.

    classification   images -> class logits (``classify.Classification``)
    dense            images -> per-pixel class logits, segmentation (``dense.Dense``)
    denoise          DDPM/DDIM denoisers, their sampler and Fréchet judge (``denoise/``)

A new task is a ``Task`` subclass (``base``) passed to ``register_task``; ``spec.task`` names
it; ``create.create_task`` builds a run's. This package's root imports no torch: the models of
the denoise task (``denoise.diffusers_source``) are built below the runtime.
"""

from __future__ import annotations

from typing import Any

from kdgraph.registry import TASK_HEAD_LOSSES, TASKS

__all__ = ["TASKS", "register_task"]


def register_task(cls: Any, *, overwrite: bool = False) -> Any:
    """Register ``cls`` under ``cls.name`` (and its own head loss, where it has one)."""
    TASKS.register(cls.name, cls, overwrite=overwrite)
    if cls.head_loss is not None:
        TASK_HEAD_LOSSES.register(cls.name, cls.head_loss, overwrite=True)
    return cls
