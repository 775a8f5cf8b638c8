"""Building the models (``compiler.build``): the student's initialisation a function of the seed
alone, missing checkpoints recorded or refused, from_teacher's copy by name and shape, and the
micro-batch refusal for BatchNorm students; each against values written out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _runtime_helpers import tiny_spec
from kdgraph.compiler.build import MIN_BATCHNORM_PART, _check_micro_batches, build_models, init_from_teacher
from kdgraph.errors import ModelError, SpecError
from kdgraph.spec import load_spec


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_students_initialisation_does_not_depend_on_the_teacher():
    with_teacher, without = load_spec(tiny_spec()), load_spec(tiny_spec(method="supervised"))
    torch.manual_seed(3)
    teacher, student = build_models(with_teacher)
    torch.manual_seed(3)
    none, alone = build_models(without)
    assert teacher is not None and none is None
    a, b = _state(student), _state(alone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(4)
    _, other = build_models(without)
    assert not all(torch.equal(a[k], v) for k, v in other.state_dict().items())  # the seed does matter


def test_a_missing_checkpoint_is_recorded_when_allowed_and_refused_otherwise(tmp_path):
    spec = load_spec(tiny_spec(teacher_checkpoint=str(tmp_path / "gone.pt")))
    missing = []
    teacher, _ = build_models(spec, missing=missing)
    assert missing == [f"teacher.checkpoint {tmp_path / 'gone.pt'}"] and teacher is not None
    with pytest.raises(ModelError, match=r"^checkpoint not found: .*gone\.pt$"):
        build_models(spec)
    assert not (tmp_path / "gone.pt").exists()  # nothing written


def test_from_teacher_copies_the_tensors_whose_name_and_shape_match():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with torch.no_grad():
        teacher[1].running_mean.normal_()
    before = _state(student)
    params, ptr = list(student.parameters()), student[0].weight.data_ptr()
    note = init_from_teacher(teacher, student)
    t, s = teacher.state_dict(), student.state_dict()
    copied = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert all(torch.equal(s[k], t[k]) for k in copied)
    assert torch.equal(s["2.weight"], before["2.weight"]) and torch.equal(s["2.bias"], before["2.bias"])
    assert note == ("student.from_teacher: 7 of 9 tensors copied from the teacher (name and shape match): 0, 1; "
                    "initial weights kept: 2")
    # copied in place, not replaced: the optimizer built on the student's parameters still holds them
    assert all(p is q for p, q in zip(params, student.parameters(), strict=True))
    assert student[0].weight.data_ptr() == ptr


def test_from_teacher_note_when_nothing_matches():
    note = init_from_teacher(nn.Linear(3, 3), nn.Linear(2, 2))
    assert note == "student.from_teacher: 0 of 2 tensors copied from the teacher (name and shape match): none; " \
                   "initial weights kept: weight, bias"


def _run(micro, batch):
    return SimpleNamespace(runtime=SimpleNamespace(micro_batches=micro), data=SimpleNamespace(batch_size=batch))


def test_micro_batches_that_leave_batchnorm_parts_under_four_samples_are_refused():
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(SpecError, match=r"^runtime.micro_batches: 4 micro-batches of a batch of 12 leave parts of 3 "
                                        r"sample\(s\), and the student has BatchNorm, .* allowed: at most 3 \(parts "
                                        r"of at least 4 samples\), or raise data.batch_size$"):
        _check_micro_batches(_run(4, 12), bn)
    assert MIN_BATCHNORM_PART == 4
    _check_micro_batches(_run(3, 12), bn)  # parts of 4: allowed
    _check_micro_batches(_run(1, 2), bn)  # one micro-batch is the batch the user chose
    _check_micro_batches(_run(4, 4), nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(2)))  # no BatchNorm
