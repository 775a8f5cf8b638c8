"""kdgraph.segmentation.metrics against a confusion matrix counted by hand and sklearn's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from kdgraph.segmentation.metrics import ConfusionMatrix


def test_a_small_case_counted_by_hand():
    # labels        predictions
    # 0 0 1         0 1 1
    # 2 255 1       2 0 2
    y = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
    p = torch.tensor([[[0, 1, 1], [2, 0, 2]]])
    cm = ConfusionMatrix(3)
    cm.update(p, y)
    # rows true, columns predicted; the ignored pixel (predicted 0) is not counted
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    s = cm.scores()
    # IoU_0 = 1 / (2 + 1 - 1) = 1/2; IoU_1 = 1 / (2 + 2 - 1) = 1/3; IoU_2 = 1 / (1 + 2 - 1) = 1/2
    assert s.per_class_iou == pytest.approx((1 / 2, 1 / 3, 1 / 2))
    assert s.miou == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert s.pixel_accuracy == pytest.approx(3 / 5) and s.pixels == 5
    assert s.as_dict(["bg", "a", "b"])["iou/a"] == pytest.approx(1 / 3)


def test_batches_accumulate_to_sklearns_matrix_and_logits_are_argmaxed():
    g = np.random.default_rng(0)
    c = 5
    cm = ConfusionMatrix(c)
    ys, ps = [], []
    for _ in range(4):
        y = g.integers(0, c, size=(3, 7, 6))
        y[g.random(y.shape) < 0.2] = 255
        logits = g.normal(size=(3, c, 7, 6))
        cm.update(torch.tensor(logits), torch.tensor(y))
        ys.append(y.ravel())
        ps.append(logits.argmax(axis=1).ravel())
    y, p = np.concatenate(ys), np.concatenate(ps)
    keep = y != 255
    expected = confusion_matrix(y[keep], p[keep], labels=list(range(c)))
    assert cm.matrix.numpy().tolist() == expected.tolist()
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    s = cm.scores()
    assert s.per_class_iou == pytest.approx(tuple(iou))
    assert s.miou == pytest.approx(iou.mean()) and s.pixel_accuracy == pytest.approx(tp.sum() / keep.sum())


def test_ignored_pixels_change_nothing_whatever_is_predicted_there():
    g = np.random.default_rng(1)
    y = torch.tensor(g.integers(0, 3, size=(2, 4, 4)))
    y[0, 0] = 255
    p = torch.tensor(g.integers(0, 3, size=(2, 4, 4)))
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(p, y)
    p2 = p.clone()
    p2[y == 255] = (p2[y == 255] + 1) % 3
    b.update(p2, y)
    assert torch.equal(a.matrix, b.matrix) and a.matrix.sum() == 28


def test_a_class_that_occurs_nowhere_has_no_iou_and_is_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    s = cm.scores()
    assert s.per_class_iou[:2] == (1.0, 1.0) and math.isnan(s.per_class_iou[2]) and s.miou == 1.0


def test_other_ignore_index_and_bad_labels_and_state():
    cm = ConfusionMatrix(2, ignore_index=-1)
    cm.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, -1, 1]]]))
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="label 255 is outside 0..1"):
        cm.update(torch.tensor([[[0]]]), torch.tensor([[[255]]]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 4, dtype=torch.long))
    other = ConfusionMatrix(2, ignore_index=-1)
    other.load_state_dict(cm.state_dict())
    assert torch.equal(other.matrix, cm.matrix)
    with pytest.raises(ValueError, match="for 3 classes"):
        ConfusionMatrix(3).load_state_dict(cm.state_dict())
