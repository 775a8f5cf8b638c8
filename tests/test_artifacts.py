"""The compiler's artifacts (``compiler.artifacts``): output heads, stride, classes and logits shape
read from the traced graph, side tensors per block, Models.map and RunRecord's copy; the truth is
the eager model's own output shapes, written out by hand."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import torch
from torch import nn

from _runtime_helpers import tiny_spec
from kdgraph.compiler import compile_spec
from kdgraph.compiler.artifacts import ModelArtifacts, Models
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.split import split_segments
from kdgraph.compiler.trace import trace
from kdgraph.ir import SideInput
from kdgraph.spec import load_spec


class _Seg(nn.Module):
    """Per-pixel logits at ``stride`` (an FCN head), and an ``aux`` head where ``heads`` names two."""

    def __init__(self, stride: int = 1, named: bool = False):
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, stride=stride, padding=1)
        self.out = nn.Conv2d(6, 5, 1)
        self.aux = nn.Conv2d(6, 5, 1)
        if named:
            self.heads = ("out", "aux")
        self.named = named

    def forward(self, x):
        h = torch.relu(self.body(x))
        return (self.out(h), self.aux(h)) if self.named else self.out(h)


def _art(model, size=(3, 16, 16), **kw):
    return ModelArtifacts("student", model, trace(model, size, **kw))


@pytest.mark.parametrize("stride,per_pixel,num_classes,logits", [(1, True, 5, [5, 16, 16]), (2, True, 5, [5, 8, 8]),
                                                                  (8, True, 5, [5, 2, 2])])
def test_per_pixel_logits_and_their_stride(stride, per_pixel, num_classes, logits):
    art = _art(_Seg(stride))
    with torch.no_grad():
        shape = tuple(art.model(torch.randn(2, 3, 16, 16)).shape)
    assert art.heads == (("out", shape),) and art.output_shape == shape
    assert (art.output_stride, art.per_pixel, art.num_classes, art.logits_shape) == (stride, per_pixel, num_classes,
                                                                                     logits)
    d = art.to_dict()
    assert d["heads"] == [{"name": "out", "shape": logits}] and d["model"] == "_Seg"


def test_a_stride_that_does_not_tile_the_input_is_none():
    art = _art(_Seg(2), size=(3, 15, 15))  # 15 px -> 8 logits: 15 / 8 is no integer
    assert art.output_stride is None and not art.per_pixel and art.num_classes is None and art.logits_shape is None


def test_named_heads_and_a_classifier():
    art = _art(_Seg(1, named=True))
    assert [name for name, _ in art.heads] == ["out", "aux"] and art.output_shape == (2, 5, 16, 16)
    unnamed = _Seg(1, named=True)
    del unnamed.heads
    assert _art(unnamed).heads == () and _art(unnamed).output_shape is None
    clf = _art(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7)))
    assert (clf.num_classes, clf.logits_shape, clf.per_pixel) == (7, [7], False)
    assert "heads" not in clf.to_dict() and "side_inputs" not in clf.to_dict()


class _Timed(nn.Module):
    def __init__(self):
        super().__init__()
        self.temb = nn.Linear(1, 4)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x, t):
        e = self.temb(t.float()[:, None])[:, :, None, None]
        return self.b(self.a(x) + e)


def test_side_tensors_per_block_and_in_the_dict():
    model = _Timed()
    traced = trace(model, (3, 8, 8), side=(SideInput("t", "timestep", 10),))
    cut = next(c for c in find_cuts(traced) if c.node == "add")
    segs = tuple(split_segments(traced, [cut.node]))
    art = ModelArtifacts("student", model, traced, segments=segs)
    tensors = art.side_tensors()
    assert len(tensors) == 2 and tensors[1] == []  # block 2 reads no side value
    (read,) = tensors[0]
    assert read["node"] == segs[0].side_inputs[0] and read["shape"] == [4, 1, 1]
    d = art.to_dict()
    assert d["side_inputs"] == [{"name": "t", "kind": "timestep", "high": 10}] and d["side_tensors"] == tensors


def test_models_map_and_each():
    t, s = ModelArtifacts("teacher", nn.Linear(2, 2)), ModelArtifacts("student", nn.Linear(2, 2))
    both = Models(t, s, ("note",))
    assert both.each() == (t, s) and Models(None, s).each() == (s,)
    roles = both.map(lambda a: ModelArtifacts(a.role.upper(), a.model))
    assert (roles.teacher.role, roles.student.role, roles.notes) == ("TEACHER", "STUDENT", ("note",))
    assert Models(None, s).map(lambda a: a).teacher is None
    with pytest.raises(FrozenInstanceError):
        both.student = t


def test_the_run_record_hands_out_a_copy_of_the_spec():
    c = compile_spec(load_spec(tiny_spec(method="supervised", blocks=2)), materialize=False)
    d = c.run.to_dict()
    d["seed"] = 99
    d["student"]["kwargs"]["num_classes"] = -1
    again = c.run.to_dict()
    assert again["seed"] == 0 and again["student"]["kwargs"]["num_classes"] != -1
    out = c.to_dict()
    assert out["num_classes"] == c.student.num_classes == 10 and out["spec"] == again
    assert [b["rule"] for b in out["blocks"]][-1] == "head" and out["teacher"] is None
