"""The task of a run: its class by name (``TASKS``, the built-in tasks registered) and its
object, built from the spec and the compiled plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdgraph.registry import TASKS
from kdgraph.tasks import causal_lm, classify, dense  # noqa: F401  (registers causal_lm, classification, dense)
from kdgraph.tasks.base import Task
from kdgraph.tasks.denoise import task  # noqa: F401  (registers denoise)

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled, RunRecord
    from kdgraph.spec import Spec

__all__ = ["create_task", "spec_task", "task_class"]


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name``."""
    return TASKS.get(name)


def spec_task(spec: Spec | RunRecord) -> type[Task]:
    """The task class of ``spec`` before it is compiled: its ``task``, its denoise block's, text's
    causal_lm, or classification (dense differs from it in evaluation only)."""
    if spec.task or spec.denoise is not None:
        return task_class(spec.task or "denoise")
    return task_class("causal_lm" if spec.data.dataset == "text" else "classification")


def create_task(spec: Spec | RunRecord, compiled: Compiled) -> Task:
    """The task object of a compiled run (``Compiled.task``)."""
    return task_class(compiled.task)(spec, compiled)
