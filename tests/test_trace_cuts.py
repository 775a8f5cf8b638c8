"""Tracing and cut finding on small hand-built modules, where the right answer is obvious."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import traced_timm
from kdgraph.compiler.cuts import find_cut_by_module, find_cuts, infer_layout
from kdgraph.errors import TraceError
from kdgraph.compiler.trace import trace


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


def _resnetlike():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(8), Residual(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_residual_block_has_no_cut_inside():
    traced = trace(_resnetlike(), (3, 8, 8))
    cuts = find_cuts(traced)
    assert [c.module for c in cuts] == ["0", "1", "2", "3", "4"]
    assert not any(p.startswith(("1.", "2.")) for c in cuts for p in c.closes)
    inside = [n for n, i in traced.nodes.items() if i.modules[-1:] in (("1.conv1",), ("1.act",), ("1.conv2",))]
    assert len(inside) == 3 and not {c.node for c in cuts} & set(inside)
    assert [c.layout for c in cuts] == ["NCHW", "NCHW", "NCHW", "vector", "vector"]
    assert cuts[1].shape == (8, 8, 8) and cuts[1].reduction == 1 and cuts[1].channels == 8


def test_plain_sequential_has_a_cut_after_every_layer_but_the_last():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 7), nn.Linear(7, 3))
    traced = trace(model, (3, 8, 8))
    cuts = find_cuts(traced)
    assert [c.module for c in cuts] == [str(i) for i in range(7)]  # the logits (7) are not a cut
    assert [c.closes for c in cuts] == [(str(i),) for i in range(7)]
    assert [c.reduction for c in cuts[:5]] == [1, 1, 1, 2, 2]
    assert [c.channels for c in cuts] == [4, 4, 4, 6, 6, 96, 7]
    assert cuts[5].layout == "vector" and cuts[5].shape == (96,)
    assert all(c.level == 0 for c in cuts)


class WithConstants(nn.Module):
    """A buffer and a parameter read at the top and used at the bottom: not input-dependent."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        s = self.scale * 3 + self.bias  # computed first, live until the end
        k = torch.ones(1) * 0.5
        x = self.a(x)
        x = self.b(x)
        x = self.c(x)
        return x * s + k


def test_get_attr_and_constants_do_not_block_cuts():
    traced = trace(WithConstants(), (3, 4, 4))
    cuts = find_cuts(traced)
    assert ["a", "b", "c"] == [c.module for c in cuts][:3]
    consts = [i for i in traced.nodes.values() if i.op == "get_attr"]
    assert len(consts) >= 2 and not any(i.input_dependent for i in consts)
    assert not traced.nodes["add"].input_dependent  # bias + constant, computed before a


class ShapeReader(nn.Module):
    """``n = x.shape[0]`` read before a and used after c: the size crosses a and b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        n = x.shape[0]
        x = self.c(self.b(self.a(x)))
        return self.fc(x.reshape(n, -1))


def test_sizes_read_from_the_input_are_live():
    cuts = find_cuts(trace(ShapeReader(), (3, 4, 4)))
    assert not {"a", "b"} & {c.module for c in cuts}


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


@pytest.mark.parametrize("shape,hw,expected", [
    ((64, 8, 8), (32, 32), ("NCHW", 64, 4, 0)),
    ((8, 8, 64), (32, 32), ("NHWC", 64, 4, 0)),
    ((8, 8, 8), (8, 8), ("NCHW", 8, 1, 0)),  # ambiguous: NCHW assumed
    ((96, 56, 56), (224, 224), ("NCHW", 96, 4, 0)),
    ((7, 7, 768), (224, 224), ("NHWC", 768, 32, 0)),
    ((16, 192), (64, 64), ("tokens", 192, 16, 0)),
    ((17, 192), (64, 64), ("tokens", 192, 16, 1)),  # class token
    ((197, 384), (224, 224), ("tokens", 384, 16, 1)),
    ((196, 384), (224, 224), ("tokens", 384, 16, 0)),
    ((201, 384), (224, 224), ("tokens", 384, 16, 5)),  # class + 4 register tokens
    ((1000,), (224, 224), ("vector", 1000, None, 0)),
    ((50, 7), (32, 32), ("other", 7, None, 0)),  # no prefix count leaves a square grid
    ((3, 5, 7), (32, 32), ("other", None, None, 0)),
    ((4, 8, 16), (32, 32), ("other", None, None, 0)),  # 4x and 2x: not one reduction
    ((2, 3, 4, 5), (32, 32), ("other", None, None, 0)),
])
def test_infer_layout(shape, hw, expected):
    assert infer_layout(shape, hw) == expected


def test_pooled_1x1_map_is_a_vector_but_a_1x1_input_map_is_not():
    cuts = find_cuts(trace(_resnetlike(), (3, 8, 8)))
    assert cuts[3].shape == (8, 1, 1) and cuts[3].layout == "vector" and cuts[3].reduction is None
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    cuts = find_cuts(trace(model, (3, 1, 1)))
    assert cuts[0].layout == "NCHW" and cuts[0].reduction == 1


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224",
                                  "swin_tiny_patch4_window7_224", "densenet121"])
def test_cuts_strictly_increasing_and_single_tensor(name):
    _, traced, cuts, _ = traced_timm(name)
    idx = [c.index for c in cuts]
    assert idx == sorted(set(idx)) and cuts
    order = traced.order
    for c in cuts:
        assert order[c.index] == c.node
        assert traced.nodes[c.node].shape[1:] == c.shape
        assert c.closes[:1] == ((c.module,) if c.module else ())
    last = [n for n in traced.gm.graph.nodes if n.op == "output"][0].args[0]
    assert cuts[-1].node != last.name  # the logits are not a cut


def test_swin_cuts_are_nhwc_and_vit_tokens_have_a_class_token():
    _, _, cuts, _ = traced_timm("swin_tiny_patch4_window7_224")
    layers0 = find_cut_by_module(cuts, "layers.0")
    assert layers0.layout == "NHWC" and layers0.reduction == 4 and layers0.shape == (16, 16, 96)
    _, _, cuts, _ = traced_timm("vit_tiny_patch16_224")
    b = find_cut_by_module(cuts, "blocks.3")
    assert (b.layout, b.reduction, b.prefix_tokens, b.shape) == ("tokens", 16, 1, (17, 192))
    assert find_cut_by_module(cuts, "no.such.module") is None
    assert find_cut_by_module(cuts, b.node) is b


def test_cut_to_dict_is_plain_data():
    cut = find_cuts(trace(_resnetlike(), (3, 8, 8)))[0]
    d = cut.to_dict()
    assert d["shape"] == [8, 8, 8] and d["closes"] == ["0"] and d["layout"] == "NCHW"
    assert set(d) >= {"node", "module", "closes", "shape", "layout", "channels", "reduction"}
