"""Cut finding (``compiler.cuts``) on small hand-built modules, where the right answer is written
out by hand (the live set after each node, the reduction of each grid), and on timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import traced_timm
from kdgraph.compiler import cuts as cuts_module
from kdgraph.compiler.cuts import (_nominal_reduction, _reduction, _token_reduction, find_cut_by_module, find_cuts,
                                   infer_layout, needs_multi_tensor_cuts)
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


@pytest.mark.parametrize("hw,h,w,expected", [
    ((224, 224), 56, 56, 4), ((224, 224), 7, 7, 32), ((32, 32), 32, 32, 1),
    ((224, 224), 4, 4, 64),  # 224/4 = 56 exactly, but a 64-stride with padding gives 4x4: 64
    ((96, 64), 12, 8, 8),  # non-square input, one reduction
    ((32, 32), 5, 5, None), ((32, 32), 8, 4, None), ((96, 64), 12, 16, None), ((32, 32), 0, 4, None),
    ((48, 48), 16, 16, 3),  # 3 tiles exactly and no power of two gives 16: the exact 3 stays
])
def test_reduction_of_a_grid(hw, h, w, expected):
    assert _reduction(hw, h, w) == expected


@pytest.mark.parametrize("hw,h,w,expected", [
    ((224, 224), 55, 55, 4),  # AlexNet's first conv (11x11, stride 4, no padding)
    ((224, 224), 109, 109, 2), ((299, 299), 147, 147, 2), ((299, 299), 35, 35, 8), ((299, 299), 8, 8, 32),
    ((224, 224), 55, 54, None),  # a square input keeps square maps
    ((224, 224), 40, 40, None),  # 224/4 = 56 and 224/8 = 28: 40 is near neither
])
def test_nominal_reduction_of_an_unpadded_grid(hw, h, w, expected):
    assert _nominal_reduction(hw, h, w) == expected


def test_token_reduction_counts_prefix_tokens_up_to_eight():
    assert _token_reduction((224, 224), 196 + 8) == (16, 8)
    assert _token_reduction((224, 224), 196 + 9) is None  # 205 = 5 x 41: no square patch tiles it
    assert _token_reduction((32, 32), 64) == (4, 0)
    assert _token_reduction((32, 48), 24) == (8, 0)  # 4 x 6 patches of 8 px
    assert _token_reduction((32, 32), 0) is None


class TinyUNet(nn.Module):
    """enc (8x8) -> down (4x4) -> mid (4x4) -> up (8x8) -> cat with enc -> out: enc stays live
    from its conv to the concat, so no single tensor crosses down or mid."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        m = self.mid(self.down(e))
        return self.out(torch.cat([e, self.up(m)], dim=1))


def test_a_unet_gets_multi_tensor_cuts_carrying_its_skip():
    traced = trace(TinyUNet(), (3, 8, 8))
    single = cuts_module._sweep(traced, False)
    # single-tensor: only enc's output (before down) and the concat (before out)
    assert [c.module for c in single] == ["enc", ""]
    assert single[1].node == "cat" and single[1].shape == (8, 8, 8)
    assert needs_multi_tensor_cuts(traced, single)  # the 4x4 resolution has no single-tensor cut
    cuts = find_cuts(traced)
    by_module = {c.module: c for c in cuts}
    assert set(by_module) == {"enc", "down", "mid", "up", ""}
    for name, shape in (("down", (8, 4, 4)), ("mid", (8, 4, 4)), ("up", (4, 8, 8))):
        c = by_module[name]
        assert c.multi and c.nodes == ("enc", name) and c.shape == shape and c.tensors[-1].node == name
        assert c.tensors[0].shape == (4, 8, 8) and c.tensors[0].reduction == 1
        assert c.shapes == [[4, 8, 8], list(shape)]
    assert by_module["down"].reduction == 2 and by_module["up"].reduction == 1
    assert not by_module["enc"].multi and by_module["enc"].members == (by_module["enc"],)
    assert [c.index for c in cuts] == sorted({c.index for c in cuts})
    assert find_cuts(traced, multi=False) == single


def test_a_sequential_model_never_needs_multi_tensor_cuts():
    traced = trace(_resnetlike(), (3, 8, 8))
    single = find_cuts(traced, multi=False)
    assert not needs_multi_tensor_cuts(traced, single)
    assert find_cuts(traced) == single
    # forced: inside each residual its input stays live beside the body's maps (2 tensors)
    forced = find_cuts(traced, multi=True)
    assert [c for c in forced if not c.multi] == single
    multi = [c for c in forced if c.multi]
    assert multi and all(len(c.tensors) == 2 and c.module.startswith(("1.", "2.")) for c in multi)
    assert {c.tensors[0].node for c in multi} == {single[0].node, single[1].node}  # each residual's input


def test_multi_tensor_cuts_are_bounded_by_max_cut_tensors(monkeypatch):
    traced = trace(TinyUNet(), (3, 8, 8))
    monkeypatch.setattr(cuts_module, "MAX_CUT_TENSORS", 1)
    assert not any(c.multi for c in find_cuts(traced, multi=True))


class _IntMiddle(nn.Module):
    """A float map, then an integer tensor (class indices), then an embedding: the integer
    value is the only live one after ``argmax`` but is no feature to compare or feed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.emb = nn.Embedding(4, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        i = self.a(x).argmax(1)
        return self.fc(self.emb(i).mean((1, 2)))


def test_integer_values_are_no_cut():
    traced = trace(_IntMiddle(), (3, 4, 4))
    cuts = find_cuts(traced)
    assert "argmax" in traced.nodes and traced.nodes["argmax"].dtype.startswith("int")
    assert "argmax" not in {c.node for c in cuts}
    assert [c.module for c in cuts][:2] == ["a", "emb"]


class _Block(nn.Module):
    """A plain chain inside a module that is no sequence container: cuts inside it stay open."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.c1(x))


def test_levels_count_the_open_modules_that_are_no_sequences():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Block(), nn.Flatten(), nn.Linear(4 * 16, 2))
    cuts = find_cuts(trace(model, (3, 4, 4)))
    inner, end = find_cut_by_module(cuts, "1.c1"), find_cut_by_module(cuts, "1")
    assert (inner.level, inner.closes) == (1, ("1.c1",))  # module 1 is still open
    assert (end.level, end.closes, end.module) == (0, ("1", "1.c2"), "1")  # shallowest first
    assert end is find_cut_by_module(cuts, "1.c2")


def test_a_one_step_collapse_to_1x1_is_a_vector_and_a_blown_up_grid_is_other():
    # 8x8 -> 1x1 in one conv (VGG's conv head): a vector, no map of reduction 8
    collapse = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 8), nn.Flatten(), nn.Linear(6, 2))
    cuts = find_cuts(trace(collapse, (3, 8, 8)))
    assert [(c.module, c.layout, c.reduction) for c in cuts[:2]] == [("0", "NCHW", 1), ("1", "vector", None)]
    # 2x2 -> 1x1 by a fixed max pool stays a map (reduction 4); then a fixed 3x3 of it tiles nothing
    grown = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((3, 3)),
                          nn.Flatten(), nn.Linear(36, 2))
    cuts = find_cuts(trace(grown, (3, 4, 4)))
    assert [(c.module, c.layout, c.reduction) for c in cuts[:3]] == [("0", "NCHW", 2), ("1", "NCHW", 4),
                                                                      ("2", "other", None)]
