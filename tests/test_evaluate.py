"""kdgraph.runtime.evaluate: top-k counts against hand-counted rows and timm's accuracy, accuracy
and mIoU over batches against numpy's confusion matrix, and the Evaluator's BatchNorm re-estimate
against the batches' own mean and variance (the RNG untouched, skipped at the same step)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdgraph.runtime.evaluate import Evaluator, accuracy, mean_iou, topk_correct


def test_topk_against_hand_computed_values():
    logits = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],  # target 0: top-1 and top-5
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 2: ranks 5th -> top-5 only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 1: ranks 6th -> neither
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # target 1: top-1
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],  # target 6: ranks 7th -> neither
    ])
    target = torch.tensor([0, 2, 1, 1, 6])
    assert topk_correct(logits, target).tolist() == [2, 3]
    from timm.utils import accuracy

    assert [round(float(a), 4) for a in accuracy(logits, target, topk=(1, 5))] == [40.0, 60.0]
    # Fewer classes than 5: top-5 is top-C, every row counts (as in timm).
    small = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]])
    assert topk_correct(small, torch.tensor([2, 0])).tolist() == [1, 2]


def test_pixel_accuracy_and_mean_iou():
    class Loader:
        def epoch(self, e):
            yield torch.zeros(1), torch.tensor([[[0, 0], [1, 1]]])

    logits = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]]])  # predicts [[0,1],[0,0]]
    acc = accuracy(lambda x: logits, Loader(), torch.device("cpu"), per_pixel=True)
    assert acc["pixel_acc"] == acc["top1"] == 25.0  # only the top-left pixel is right
    # class 0: 2 true, 3 predicted, 1 both: IoU 1/4; class 1: none right: 0
    assert acc["miou"] == pytest.approx(100 * (1 / 4 + 0) / 2)
    assert mean_iou(torch.tensor([[2, 0], [0, 2]])) == 100.0


class _Batches:
    """A loader: ``epoch(e)`` yields the (x, y) batches given."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, e):
        yield from self.batches


def test_accuracy_over_batches_counts_every_row_once():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 7, generator=g), torch.randint(0, 7, (n,), generator=g)) for n in (5, 3, 8)]
    got = accuracy(lambda x: x, _Batches(batches), torch.device("cpu"))
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    ranks = (x > x[np.arange(len(y)), y][:, None]).sum(1)  # classes scored above the target
    assert got["top1"] == pytest.approx(100 * np.mean(ranks < 1)) and got["top5"] == pytest.approx(100 * np.mean(ranks < 5))
    assert set(got) == {"top1", "top5"}
    assert accuracy(lambda x: x, _Batches([]), torch.device("cpu")) == {"top1": 0.0, "top5": 0.0}


def test_per_pixel_miou_over_batches_is_numpys_confusion_matrix():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 4, 3, 5, generator=g), torch.randint(0, 3, (2, 3, 5), generator=g)) for _ in range(3)]
    got = accuracy(lambda x: x, _Batches(batches), torch.device("cpu"), per_pixel=True)
    pred = np.concatenate([b[0].argmax(1).flatten().numpy() for b in batches])
    true = np.concatenate([b[1].flatten().numpy() for b in batches])
    conf = np.zeros((4, 4))
    np.add.at(conf, (true, pred), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    assert got["miou"] == pytest.approx(100 * np.mean(inter[union > 0] / union[union > 0]))
    assert got["pixel_acc"] == got["top1"] == pytest.approx(100 * np.mean(pred == true))
    assert mean_iou(torch.zeros(3, 3, dtype=torch.long)) == 0.0


class _Distiller(nn.Module):
    """A student of one BatchNorm; ``groups`` as a decomposed stage has them."""

    def __init__(self, groups):
        super().__init__()
        self.bn = nn.BatchNorm1d(2, momentum=0.5)
        self.groups = groups

    def inference(self, x, side):
        return self.bn(x)


def _evaluator(groups=([1], [2]), setting="auto", batches=2, val=None):
    g = torch.Generator().manual_seed(3)
    train = [torch.randn(6, 2, generator=g) * 3 + 1 for _ in range(4)]
    task = SimpleNamespace(batches=lambda data, epoch: ((x, None, None) for x in data),
                           inputs=lambda x, y, idx: (x, ()),
                           score=lambda forward, loader, device, precision, cl: {"top1": float(forward(loader).detach().sum())})
    config = SimpleNamespace(bn_recalibrate=setting, bn_recalibrate_batches=batches, device=torch.device("cpu"),
                             precision="fp32", channels_last=False)
    data = SimpleNamespace(train=train, val=val, test=torch.ones(1, 2), eval_loader=torch.zeros(1, 2))
    return Evaluator(_Distiller(groups), task, data, config), train


def test_bn_recalibration_is_the_cumulative_average_of_its_batches_and_leaves_the_rng():
    evaluator, train = _evaluator(batches=3)
    d = evaluator.distiller
    d.bn.running_mean.fill_(100.0)
    state = torch.random.get_rng_state()
    evaluator.recalibrate_bn(global_step=7)
    # momentum None: the plain mean of each batch's mean and unbiased variance over the first 3 batches
    torch.testing.assert_close(d.bn.running_mean, torch.stack([b.mean(0) for b in train[:3]]).mean(0))
    torch.testing.assert_close(d.bn.running_var, torch.stack([b.var(0) for b in train[:3]]).mean(0))
    assert d.bn.momentum == 0.5 and d.training and int(d.bn.num_batches_tracked) == 3
    assert torch.equal(torch.random.get_rng_state(), state)
    d.bn.running_mean.fill_(-1.0)
    evaluator.recalibrate_bn(global_step=7)  # the same step: the statistics it would find, skipped
    assert torch.equal(d.bn.running_mean, torch.full((2,), -1.0))


@pytest.mark.parametrize("groups,setting,recalibrates", [(([1], [2]), "auto", True), (([1, 2],), "auto", False),
                                                         (([1, 2],), True, True), (([1], [2]), False, False)])
def test_evaluate_recalibrates_where_the_setting_says_and_restores_train_mode(groups, setting, recalibrates):
    evaluator, _ = _evaluator(groups, setting)
    d = evaluator.distiller
    d.train()
    d.bn.running_mean.fill_(100.0)
    scores = evaluator.evaluate(global_step=1)
    assert (evaluator.bn_recalibrated_at == 1) == recalibrates and d.training
    # scored in eval mode on the eval loader (zeros): (0 - running mean) / sqrt(var + eps), summed
    expected = float(((0 - d.bn.running_mean) / torch.sqrt(d.bn.running_var + d.bn.eps)).sum())
    assert scores["top1"] == pytest.approx(expected)
    assert (d.bn.running_mean != 100.0).all() == recalibrates


def test_the_test_split_is_scored_at_the_end_only_beside_a_validation_split():
    without, _ = _evaluator(setting=False)
    assert without.evaluate_test(3) is None
    beside, _ = _evaluator(setting=False, val=torch.zeros(1, 2))
    d = beside.distiller.eval()
    expected = float(((1 - d.bn.running_mean) / torch.sqrt(d.bn.running_var + d.bn.eps)).sum())  # test: ones
    assert beside.evaluate_test(3)["top1"] == pytest.approx(expected)
