"""kdgraph.tasks.classify: the classification task is ``TASKS``' "classification" entry and keeps
every default of ``Task`` (checked attribute by attribute against the base class). (A digits spec
without a task is classification: tests/test_tasks_create.py and tests/test_tasks.py.)"""

from __future__ import annotations

from kdgraph.registry import TASKS
from kdgraph.tasks.base import Task
from kdgraph.tasks.classify import Classification


def test_classification_is_registered_with_the_defaults_of_task():
    assert TASKS.get("classification") is Classification and Classification.name == "classification"
    assert issubclass(Classification, Task)
    assert {k for k in vars(Classification) if not k.startswith("__")} == {"name"}  # overrides nothing else
    assert Classification.metrics == ("top1", "top5") and Classification.best_metric == "top1"
