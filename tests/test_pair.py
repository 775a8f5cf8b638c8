"""Pairing (``compiler.pair``): which adapter each block pair gets (none, conv1x1, linear, format,
cap, per tensor), the refusals naming both cuts, projections in place of adapters and the ReLU
ends they split; the truth is written out by hand on Cut records and a small traced model."""

from __future__ import annotations

import pytest
from torch import nn

from kdgraph.compiler.artifacts import ModelArtifacts, Models
from kdgraph.compiler.cuts import find_cut_by_module, find_cuts
from kdgraph.compiler.pair import _relu_ends, pair_blocks, project_blocks
from kdgraph.compiler.trace import trace
from kdgraph.errors import PlanError
from kdgraph.ir import AdapterSpec, Boundary, Cut, FeatureFormat, ProjectionSpec, TupleAdapterSpec
from kdgraph.layouts import FormatAdapter
from kdgraph.scalekd import CrossAttentionProjector

HW = (32, 32)


def _map(node, c, hw, reduction, index=1):
    return Cut(node, index, node, (node,), (c, *hw), "NCHW", c, reduction)


def _tokens(node, c, n, reduction, prefix=0, index=1):
    return Cut(node, index, node, (node,), (n, c), "tokens", c, reduction, prefix)


def _b(*cuts, rule="stage end"):
    return [Boundary(c, rule) for c in cuts]


def test_equal_cuts_need_no_adapter_and_widths_get_a_channel_map():
    t1, t2 = _map("t1", 16, (8, 8), 4), _map("t2", 64, (4, 4), 8, 2)
    s1, s2 = _map("s1", 16, (8, 8), 4), _map("s2", 32, (4, 4), 8, 2)
    p = pair_blocks(_b(s1, s2), _b(t1, t2), HW)
    assert [b.index for b in p.blocks] == [1, 2, 3] and p.blocks[-1].is_head
    assert p.blocks[0].adapter is None
    assert p.blocks[1].adapter == AdapterSpec(2, "conv1x1", "NCHW", 32, 64)
    assert [b.rule for b in p.blocks] == ["stage end", "stage end", "head"]
    tok = pair_blocks(_b(_tokens("s", 8, 16, 8)), _b(_tokens("t", 12, 16, 8)), HW)
    assert tok.blocks[0].adapter == AdapterSpec(1, "linear", "tokens", 8, 12)


def test_different_grids_get_a_counted_format_adapter_by_relative_depth():
    t = _tokens("blocks.5", 192, 17, 8, prefix=1)
    s = _map("layer2", 32, (8, 8), 4)
    p = pair_blocks(_b(s), _b(t, rule="depth split 1/2"), HW)
    a = p.blocks[0].adapter
    sf, tf = FeatureFormat("NCHW", 32, (8, 8)), FeatureFormat("tokens", 192, (4, 4), 1)
    assert (a.kind, a.student_format, a.teacher_format) == ("format", sf, tf)
    assert a.module_params == (FormatAdapter.count_params(sf, tf), FormatAdapter.count_params(tf, sf))
    assert p.blocks[0].rule == "depth split 1/2 / stage end; relative depth"
    cap = pair_blocks(_b(s), _b(t), HW, projector="cap").blocks[0].adapter
    assert cap.kind == "cap" and cap.module_params[0] == CrossAttentionProjector.count_params(sf, tf)
    same = pair_blocks(_b(s), _b(_map("t", 32, (8, 8), 4)), HW, projector="cap").blocks[0].adapter
    assert same.kind == "cap"  # cap lifts even where the formats agree


def test_a_pooled_vector_cannot_pair_with_a_map_and_every_problem_is_named():
    vec = Cut("pool", 9, "pool", ("pool",), (64,), "vector", 64, None)
    with pytest.raises(PlanError) as info:
        pair_blocks(_b(_map("s1", 16, (8, 8), 4), _map("s2", 32, (4, 4), 8)),
                    _b(vec, Cut("odd", 10, "odd", ("odd",), (3, 5, 7), "other", None, None)), HW)
    msg = str(info.value)
    assert msg.startswith("teacher and student blocks cannot be paired:\n  block 1: teacher cut 'pool' (vector [64]) "
                          "and student cut 's1' (NCHW [16, 8, 8]) cannot be converted\n  block 2: teacher cut 'odd'")
    assert msg.endswith("Choose other cuts with decompose.cuts or fewer decompose.blocks.")


def _multi(prefix, widths, index=5):
    members = tuple(_map(f"{prefix}{j}", c, (8 >> j, 8 >> j), 4 << j, index=j) for j, c in enumerate(widths))
    last = members[-1]
    return Cut(last.node, index, last.module, last.closes, last.shape, "NCHW", last.channels, last.reduction,
               tensors=members)


def test_multi_tensor_cuts_pair_tensor_by_tensor():
    p = pair_blocks(_b(_multi("s", (8, 16))), _b(_multi("t", (8, 32))), HW)
    a = p.blocks[0].adapter
    assert a == TupleAdapterSpec(1, (None, AdapterSpec(1, "conv1x1", "NCHW", 16, 32)))
    assert pair_blocks(_b(_multi("s", (8, 16))), _b(_multi("t", (8, 16))), HW).blocks[0].adapter is None
    with pytest.raises(PlanError, match=r"block 1: teacher cut t2 \(3 tensors: t0, t1, t2\) and student cut s1 "
                                        r"\(2 tensors: s0, s1\) carry 3 and 2 tensors"):
        pair_blocks(_b(_multi("s", (8, 16))), _b(_multi("t", (8, 16, 32))), HW)
    with pytest.raises(PlanError, match=r"the cap projector maps one tensor; use decompose.projector: conv1x1"):
        pair_blocks(_b(_multi("s", (8, 16))), _b(_multi("t", (8, 32))), HW, projector="cap")


def test_without_a_teacher_blocks_have_no_adapter():
    p = pair_blocks(_b(_map("s1", 16, (8, 8), 4)), None, HW)
    assert p.blocks[0].teacher is None and p.blocks[0].adapter is None and p.k == 2


def test_projection_replaces_every_adapter_and_splits_relu_ends():
    t1, t2 = _map("t1", 64, (8, 8), 4), _map("t2", 128, (4, 4), 8, 2)
    s1, s2 = _map("s1", 16, (8, 8), 4), _map("s2", 32, (4, 4), 8, 2)
    p = project_blocks(pair_blocks(_b(s1, s2), _b(t1, t2), HW), HW, frozenset({2}))
    assert p.adapters_mode == "projected" and p.adapters == [] and p.fallback == ""
    assert p.projections == [
        ProjectionSpec(1, FeatureFormat("NCHW", 16, (8, 8)), FeatureFormat("NCHW", 64, (8, 8)), False),
        ProjectionSpec(2, FeatureFormat("NCHW", 32, (4, 4)), FeatureFormat("NCHW", 128, (4, 4)), True)]


def test_multi_tensor_adapters_are_not_projected_and_the_fallback_says_so():
    pairing = pair_blocks(_b(_multi("s", (8, 16))), _b(_multi("t", (8, 32))), HW)
    p = project_blocks(pairing, HW)
    assert p.adapters_mode == "in_path" and p.blocks == pairing.blocks
    assert p.fallback == ("block 1: multi-tensor cuts are not projected (a PCA per tensor is not implemented); "
                          "every block keeps its adapters in the path (in_path)")


class _Ends(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.b(self.act(self.a(x)))
        h = self.c(h.relu())
        return self.fc(h.mean((2, 3)))


def test_relu_ends_are_the_blocks_whose_student_cut_is_a_relu_output():
    model = _Ends()
    traced = trace(model, (3, 8, 8))
    cuts = find_cuts(traced)
    relu = next(c for c in cuts if c.node == "relu")
    ends = [find_cut_by_module(cuts, "act"), find_cut_by_module(cuts, "b"), relu, find_cut_by_module(cuts, "c")]
    pairing = pair_blocks(_b(*ends), None, (8, 8))
    models = Models(None, ModelArtifacts("student", model, traced, tuple(cuts)))
    assert _relu_ends(models, pairing) == frozenset({1, 3})  # the ReLU module and the relu method


@pytest.mark.parametrize("asked,method,lifts,mode", [
    ("auto", "stablekd", False, "projected"),  # blocks chained through lower∘lift: projected instead
    ("auto", "stablekd", True, "in_path"),  # TPP or cap need a lift into the teacher's width
    ("auto", "kd", False, "in_path"),  # adapters are training-only lifts
    ("in_path", "stablekd", False, "in_path"), ("projected", "kd", True, "projected"),  # as asked
])
def test_adapters_mode_resolves_auto(asked, method, lifts, mode):
    from types import SimpleNamespace

    from kdgraph.compiler.pair import adapters_mode

    spec = SimpleNamespace(decompose=SimpleNamespace(adapters=asked), schedule=SimpleNamespace(method=method),
                           lifts_into_teacher_width=lifts)
    assert adapters_mode(spec) == mode
