"""kdgraph.tasks.classify: the classification task is ``TASKS``' "classification" entry and keeps
every default of ``Task`` (checked attribute by attribute against the base class), and a digits
spec without a task is one."""

from __future__ import annotations

from _runtime_helpers import tiny_spec
from kdgraph.registry import TASKS
from kdgraph.spec import load_spec
from kdgraph.tasks.base import Task
from kdgraph.tasks.classify import Classification
from kdgraph.tasks.create import spec_task


def test_classification_is_registered_with_the_defaults_of_task():
    assert TASKS.get("classification") is Classification and Classification.name == "classification"
    assert issubclass(Classification, Task)
    assert {k for k in vars(Classification) if not k.startswith("__")} == {"name"}  # overrides nothing else
    assert Classification.metrics == ("top1", "top5") and Classification.best_metric == "top1"


def test_an_image_spec_without_a_task_is_classification(tmp_path):
    assert spec_task(load_spec(tiny_spec(tmp_path, method="supervised"))) is Classification
