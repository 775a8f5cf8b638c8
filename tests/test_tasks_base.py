"""kdgraph.tasks.base: ``Task``'s defaults, an image classifier's, against values worked out by
hand: top-1/top-5 of fixed logits, which batches it yields, the mix it applies, the one-line
refusal of data with more classes than the student predicts, the summary lines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.tasks.base import Task


class _Loader:
    """Batches (x, y) of fixed tensors; an epoch from step ``start``; indexed: with sample indices."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, epoch, start=0):
        return iter(self.batches[start:])

    def epoch_indexed(self, epoch, start=0):
        return iter([(x, y, torch.arange(len(y)) + 10 * i) for i, (x, y) in enumerate(self.batches)][start:])


def _task(num_classes=6, cls=Task):
    return cls(SimpleNamespace(seed=3), SimpleNamespace(num_classes=num_classes))


def test_score_is_top1_and_top5_worked_out_by_hand():
    # logits are the input itself: 6 classes, ranks chosen so the label is 1st, 3rd, 6th, 2nd
    x = torch.tensor([[9.0, 1, 2, 3, 4, 5], [1.0, 9, 8, 7, 0, 2], [6.0, 5, 4, 3, 2, 1], [1.0, 2, 9, 8, 0, 0]])
    y = torch.tensor([0, 3, 5, 3])
    score = _task().score(lambda xb: xb, _Loader([(x[:2], y[:2]), (x[2:], y[2:])]), torch.device("cpu"))
    assert score["top1"] == pytest.approx(25.0)  # only sample 0
    assert score["top5"] == pytest.approx(75.0)  # all but sample 2 (its label ranks 6th)


def test_batches_carry_indices_only_where_the_task_is_indexed():
    batches = [(torch.zeros(2, 1), torch.tensor([0, 1])), (torch.ones(3, 1), torch.tensor([2, 3, 4]))]
    plain = list(_task().batches(_Loader(batches), epoch=0, start=1))
    assert len(plain) == 1 and plain[0][2] is None and torch.equal(plain[0][1], batches[1][1])

    class Indexed(Task):
        indexed = True

    got = list(_task(cls=Indexed).batches(_Loader(batches), epoch=0))
    assert [idx.tolist() for _, _, idx in got] == [[0, 1], [10, 11, 12]]


def test_prepare_applies_the_runs_mix_and_adds_no_side_input():
    seen = []

    def mix(x, y, epoch, step):
        seen.append((epoch, step))
        return x * 2, y + 1

    x, y = torch.ones(2, 3), torch.tensor([0, 1])
    xb, yb, side = _task().prepare(x, y, None, 4, 7, mix)
    assert torch.equal(xb, x * 2) and torch.equal(yb, y + 1) and side == () and seen == [(4, 7)]
    xi, si = _task().inputs(x, y, None)
    assert xi is x and si == ()


def test_data_with_more_classes_than_the_student_predicts_is_one_line():
    task = _task(num_classes=6)
    task.check_data(SimpleNamespace(num_classes=6), "digits")  # as many: fine
    with pytest.raises(KDGraphError, match="digits has 10 classes but the student predicts 6: set "
                                           "student.kwargs.num_classes: 10") as info:
        task.check_data(SimpleNamespace(num_classes=10), "digits")
    assert "\n" not in str(info.value)
    _task(num_classes=None).check_data(SimpleNamespace(num_classes=10), "text")  # no head: nothing to check


def test_describe_and_headline_lines():
    assert _task().describe({"top1": 91.234, "top5": 99.5}) == "top-1 91.23%, top-5 99.50%"
    summary = {"student_top1": 80.0, "student_top5": 95.0, "teacher_top1": 90.0}
    assert Task.headline(summary) == "student top-1 80.00%"
    assert Task.headline(summary, teacher=True) == "student top-1 80.00% (top-5 95.00%), teacher top-1 90.00%"
    assert Task.headline({"student_top1": None}) is None  # a rank other than the main one
    assert Task.headline({"student_top1": 80.0, "student_top5": 95.0}, teacher=True) == \
        "student top-1 80.00% (top-5 95.00%)"  # no teacher score
