"""kdgraph.runtime.builder (and the compiler's ``resolve_run``): the one run builder, each
command's needs as options of the compiler, the spec never rewritten.

Independent truths: the spec as loaded (its ``to_dict`` taken before any command ran, and
its sections' values); a cache folder or checkpoint file that does not exist, which a command
that reads it must refuse and one that does not must never touch; the student's initial
weights drawn from the seed (equal for equal seeds whatever the global RNG did before)."""

from __future__ import annotations

import pytest
import torch

from _runtime_helpers import tiny_spec
from kdgraph.compiler import resolve_run
from kdgraph.errors import KDGraphError
from kdgraph.runtime.builder import CACHE, EVAL, EXPORT, TRAIN, build_run, plan_records
from kdgraph.spec import load_spec


def _spec(tmp_path, **teacher):
    raw = tiny_spec(tmp_path / "run", "kd", epochs=1)
    raw["teacher"].update(teacher)
    return load_spec(raw)


def test_the_record_is_the_specs_sections_and_the_teacher_source_as_the_command_uses_it(tmp_path):
    spec = _spec(tmp_path, checkpoint=str(tmp_path / "t.safetensors"), cache=str(tmp_path / "cache"))
    before = spec.to_dict()
    run = resolve_run(spec)
    assert (run.name, run.seed, run.output_dir, run.task) == (spec.name, spec.seed, spec.output_dir, spec.task)
    assert (run.data, run.optim, run.runtime, run.loss, run.student) == \
        (spec.data, spec.optim, spec.runtime, spec.loss, spec.student)
    assert run.teacher == spec.teacher and run.to_dict() == before
    live = resolve_run(spec, read_cache=False)
    assert live.teacher.cache is None and live.teacher.checkpoint == tmp_path / "t.safetensors"
    shapes = resolve_run(spec, teacher_weights=False)
    assert (shapes.teacher.cache, shapes.teacher.checkpoint, shapes.teacher.pretrained) == (None, None, False)
    assert shapes.teacher.model == spec.teacher.model and shapes.teacher.kwargs == spec.teacher.kwargs
    # what run.json and the resume checks compare is the spec as loaded, whatever the command
    assert live.to_dict() == shapes.to_dict() == before
    assert spec.to_dict() == before and spec.teacher.cache == tmp_path / "cache"  # the spec itself unchanged
    run.to_dict()["name"] = "changed"
    assert run.to_dict()["name"] == spec.name  # a copy each time


def test_each_command_reads_the_cache_and_the_teachers_weights_or_not(tmp_path):
    """A cache folder and a teacher checkpoint that do not exist: training refuses the spec (it
    would read both); eval plans with the teacher live (no cache stage) and lists the missing
    checkpoint; export needs neither; the cache builder runs the teacher live and needs its weights."""
    spec = _spec(tmp_path, checkpoint=str(tmp_path / "gone.safetensors"), cache=str(tmp_path / "cache"))
    with pytest.raises(KDGraphError, match="cache"):
        build_run(spec, TRAIN)
    evaluated = build_run(spec, EVAL)
    assert evaluated.plan.cache_stages == () and evaluated.run.teacher.cache is None
    assert any(m.startswith("teacher.checkpoint") for m in evaluated.missing_weights)
    exported = build_run(spec, EXPORT)
    assert exported.plan.cache_stages == () and exported.missing_weights == ()
    assert exported.run.teacher.checkpoint is None and exported.teacher is not None
    with pytest.raises(KDGraphError, match="gone.safetensors"):
        build_run(spec, CACHE)
    assert plan_records(spec, CACHE).teacher.cache is None and plan_records(spec, TRAIN).teacher.cache is not None


def test_training_and_the_cache_builder_seed_the_models_initial_weights(tmp_path):
    spec = _spec(tmp_path)
    first = build_run(spec, TRAIN).student.model.state_dict()
    torch.manual_seed(12345)
    torch.rand(100)  # whatever ran before, the build seeds itself
    again = build_run(spec, TRAIN).student.model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    teacher_train = build_run(spec, TRAIN).teacher.model.state_dict()
    teacher_cache = build_run(spec, CACHE).teacher.model.state_dict()  # an untrained teacher: the run's draw
    assert all(torch.equal(teacher_train[k], teacher_cache[k]) for k in teacher_train)
    other = build_run(load_spec({**spec.to_dict(), "seed": 1}), TRAIN).student.model.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)
