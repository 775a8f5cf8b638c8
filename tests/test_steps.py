"""kdgraph.runtime.steps: the Stepper's optimisation step and the optimizer's parameter groups.

Independent truths: the SGD update written out (p - lr * g, with g the gradient of the whole
batch's mean loss taken by torch.autograd.grad on a copy of the model), the gradient-norm clip
written out (g * c / ||g|| where ||g|| > c), timm's weight-decay rule (1-d parameters undecayed)
listed by hand for a known model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.runtime.config import RuntimeConfig
from kdgraph.runtime.steps import Stepper, optimizer_params
from kdgraph.runtime.techniques import DistInfo
from kdgraph.spec.schema import OptimSpec


class ToyDistiller(nn.Module):
    """A stand-in with the distiller's call convention: terms of (x, y[, cached]); records the
    batch sizes and cached parts it is called with."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.calls: list[tuple[int, object]] = []

    def forward(self, x, y, cached=None, progress=None, side=()):
        self.calls.append((len(y), cached))
        out = self.student(x)
        return {"ce": F.cross_entropy(out, y), "l2": 0.1 * out.pow(2).mean()}


def _config(micro_batches: int = 1, clip: float | None = None) -> RuntimeConfig:
    return RuntimeConfig(device=torch.device("cpu"), precision="fp32", channels_last=False, compile=False,
                         deterministic=False, cudnn_benchmark=False, micro_batches=micro_batches,
                         clip_grad_norm=clip, batch_size=10, log_every=1, checkpoint_every=0, eval_every=1,
                         bn_recalibrate=False, bn_recalibrate_batches=None, track_stability=False,
                         tensorboard=False, seed=0)


def _stepper(distiller: nn.Module, micro_batches: int = 1, clip: float | None = None, lr: float = 0.5) -> Stepper:
    optim = OptimSpec(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0, lr_schedule="constant")
    return Stepper(optim, distiller, _config(micro_batches, clip), DistInfo(), [1], 4, find_unused=False)


def _batch(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _whole_batch_gradient(distiller: ToyDistiller, x, y) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The gradient of the whole batch's summed terms, on a copy (the truth the step must follow)."""
    twin = copy.deepcopy(distiller)
    out = twin.student(x)
    terms = {"ce": F.cross_entropy(out, y), "l2": 0.1 * out.pow(2).mean()}
    grads = torch.autograd.grad(sum(terms.values()), list(twin.student.parameters()))
    return list(grads), {k: v.item() for k, v in terms.items()}


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_step_is_sgd_on_the_whole_batch_gradient(micro_batches):
    """One step moves every parameter by -lr times the whole batch's gradient, also when the
    batch of 10 is split into micro-batches of 4, 3 and 3 (each part's loss weighted by its
    share); the terms returned are the whole batch's."""
    distiller = ToyDistiller()
    x, y = _batch()
    before = [p.detach().clone() for p in distiller.student.parameters()]
    grads, want_terms = _whole_batch_gradient(distiller, x, y)
    terms, loss = _stepper(distiller, micro_batches).step(x, y)
    assert [n for n, _ in distiller.calls] == ([10] if micro_batches == 1 else [4, 3, 3])
    for p, p0, g in zip(distiller.student.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, rtol=1e-5, atol=1e-6)
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(want_terms, rel=1e-5)
    assert loss.item() == pytest.approx(sum(want_terms.values()), rel=1e-5)
    assert distiller.frozen.grad is None and torch.equal(distiller.frozen, torch.ones(2))


def test_clip_grad_norm_scales_the_gradient_to_the_limit():
    """With ||g|| above the limit c, the update is -lr * g * c / ||g|| (the global norm over
    every parameter); c above ||g|| changes nothing."""
    x, y = _batch()
    grads, _ = _whole_batch_gradient(ToyDistiller(), x, y)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    for clip, scale in ((norm / 4, 0.25), (norm * 2, 1.0)):
        distiller = ToyDistiller()
        before = [p.detach().clone() for p in distiller.student.parameters()]
        _stepper(distiller, clip=clip).step(x, y)
        for p, p0, g in zip(distiller.student.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), p0 - 0.5 * g * scale, rtol=1e-4, atol=1e-6)


def test_cached_teacher_output_is_split_with_the_batch():
    """The cached teacher output of a batch reaches each micro-batch as the rows of its part:
    a tensor split as tensor_split splits the batch, a (probabilities, indices) pair part by part."""
    x, y = _batch()
    probs, idx = torch.arange(10.0).unsqueeze(1), torch.arange(10).unsqueeze(1) * 2
    distiller = ToyDistiller()
    _stepper(distiller, micro_batches=3).step(x, y, cached=(probs, idx))
    got = [c for _, c in distiller.calls]
    assert [p[:, 0].tolist() for p, _ in got] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [i[:, 0].tolist() for _, i in got] == [[0, 2, 4, 6], [8, 10, 12], [14, 16, 18]]
    distiller = ToyDistiller()
    _stepper(distiller).step(x, y, cached=probs)
    assert torch.equal(distiller.calls[0][1], probs)


def test_optimizer_groups_follow_timms_weight_decay_rule():
    """Without decay_norms_and_biases: the two Linear weights decay, the biases and LayerNorm's
    scale and shift (1-d) do not, the frozen parameter is in no group; with it, one group of
    every trainable parameter, all decayed."""
    distiller = ToyDistiller()
    s = distiller.student
    groups = optimizer_params(OptimSpec(weight_decay=0.05), distiller)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay == {0.05: {id(s[0].weight), id(s[2].weight)},
                        0.0: {id(s[0].bias), id(s[1].weight), id(s[1].bias), id(s[2].bias)}}
    flat = optimizer_params(OptimSpec(weight_decay=0.05, decay_norms_and_biases=True), distiller)
    assert {id(p) for p in flat} == {id(p) for p in s.parameters()}
    optimizer = _stepper(distiller).optimizer
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6
