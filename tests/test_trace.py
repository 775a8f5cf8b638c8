"""Tracing (``compiler.trace``): bound arguments, shared parameters, the model left as it was
found; the truth is the eager model itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdgraph.compiler.trace import trace
from kdgraph.errors import TraceError

from test_cuts import _resnetlike  # a conv stem, two residual blocks, a head


def test_concrete_args_are_bound_and_required_args_rejected():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, mask=None, scale: float = 1.0):
            x = self.a(x) * scale
            if mask is not None:
                x = x * mask
            return self.b(x)

    traced = trace(Masked(), (1, 4, 4))
    placeholders = [n for n in traced.gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1

    class NeedsTwo(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(TraceError, match="'y'"):
        trace(NeedsTwo(), (1, 2, 2))


def test_traced_graph_shares_parameters_with_the_model():
    model = _resnetlike()
    traced = trace(model, (3, 8, 8))
    assert traced.gm.get_submodule("1.conv1") is model[1].conv1
    assert traced.gm.get_submodule("1.conv1").weight is model[1].conv1.weight
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced.gm(x), model(x))
    assert traced.input_size == (3, 8, 8)
    assert traced.nodes["output"].op == "output"
    assert traced.is_container("1") and not traced.is_container("1.conv1")


def test_shape_prop_keeps_training_mode_and_bn_stats():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 2)).train()
    before = [b.clone() for b in model.buffers()]
    trace(model, (3, 8, 8))
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_trace_leaves_the_built_model_as_it_found_it():
    """No module added (a functional dropout follows its module's mode without one), and each
    module's train/eval flag restored, a mix of modes included."""
    import timm

    model = timm.create_model("resnet18", num_classes=10, drop_rate=0.3)
    model.train()
    model.layer2.eval()
    before = [(name, type(m), m.training) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    traced = trace(model, (3, 32, 32))
    assert [(name, type(m), m.training) for name, m in model.named_modules()] == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 32, 32)
    traced.gm.eval()
    model.eval()  # the head's dropout follows the model's mode through the traced graph
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model(x))
