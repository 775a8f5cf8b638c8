"""kdgraph.tasks.create: the task class a spec names or implies (its ``task``; a denoise block;
text data; else classification), looked up in ``TASKS``, and the task object of a compiled run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from _runtime_helpers import tiny_spec
from kdgraph.registry import TASKS, UnknownName
from kdgraph.spec import load_spec
from kdgraph.tasks.create import create_task, spec_task, task_class


def _spec(task=None, denoise=None, dataset="digits"):
    return SimpleNamespace(task=task, denoise=denoise, data=SimpleNamespace(dataset=dataset))


@pytest.mark.parametrize("spec, want", [
    (_spec(), "classification"),
    (_spec(dataset="text"), "causal_lm"),
    (_spec(denoise=object()), "denoise"),
    (_spec(task="dense", dataset="voc"), "dense"),
    (_spec(task="classification", dataset="text"), "classification"),  # a named task wins over the data
])
def test_spec_task_is_the_named_or_implied_task(spec, want):
    assert spec_task(spec) is TASKS.get(want) and spec_task(spec).name == want


def test_the_builtin_tasks_are_registered_under_their_names():
    for name in ("classification", "dense", "denoise", "causal_lm"):
        assert task_class(name).name == name
    with pytest.raises(UnknownName, match="unknown task 'no-such-task'; registered: .*classification"):
        task_class("no-such-task")


def test_create_task_builds_the_compiled_runs_task(tmp_path):
    """The class is the compiled run's ``task`` (not re-inferred from the spec)."""
    spec = load_spec(tiny_spec(tmp_path, method="supervised", seed=7))
    task = create_task(spec, SimpleNamespace(task="classification", num_classes=10))
    assert type(task) is task_class("classification") and task.seed == 7 and task.num_classes == 10
    with pytest.raises(UnknownName, match="unknown task 'no-such-task'"):
        create_task(spec, SimpleNamespace(task="no-such-task", num_classes=10))
