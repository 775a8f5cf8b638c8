"""Splitting (``compiler.split``): segments composed in order equal the eager model's forward
(train and eval, shared parameters), with side inputs, multi-tensor cuts and taps alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import timm_kwargs
from kdgraph.compiler import compile_spec
from kdgraph.compiler.cuts import find_cut_by_module, find_cuts
from kdgraph.errors import PlanError
from kdgraph.compiler.split import TAP_PREFIX, insert_tap, is_lazy, split_segments, split_side
from kdgraph.ir import SideInput
from kdgraph.runtime.chain import call_segment, side_values
from kdgraph.compiler.boundaries import choose_boundaries
from kdgraph.compiler.stages import find_stages
from kdgraph.spec import load_spec
from kdgraph.compiler.trace import trace

from _runtime_helpers import tiny_spec

TIMM = [
    ("resnet18", {}), ("resnet50", {}), ("efficientnet_b0", {"drop_rate": 0.3, "drop_path_rate": 0.1}),
    ("mobilenetv3_small_100", {"drop_rate": 0.2}), ("regnety_002", {}), ("convnext_atto", {"drop_path_rate": 0.1}),
    ("densenet121", {}), ("swin_tiny_patch4_window7_224", {"drop_path_rate": 0.1}),
    ("vit_tiny_patch16_224", {"drop_rate": 0.1, "drop_path_rate": 0.1}), ("mixer_s16_224", {}),
    ("levit_128s", {}), ("dla34", {}),
]


def _compose(segments, x):
    for seg in segments:
        x = seg(x)
    return x


def _check(model, segments, x):
    segments = torch.nn.ModuleList(segments)
    # eval
    model.eval()
    segments.eval()
    with torch.no_grad():
        torch.testing.assert_close(_compose(segments, x), model(x), rtol=1e-4, atol=1e-5)
    # train: same RNG stream for dropout / drop path in both runs; BN uses batch statistics
    model.train()
    segments.train()
    torch.manual_seed(123)
    want = model(x)
    torch.manual_seed(123)
    got = _compose(segments, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.eval()
    # shared parameters: the very same tensors
    params = {id(p) for p in model.parameters()}
    seg_params = [p for s in segments for p in s.parameters()]
    assert seg_params and all(id(p) in params for p in seg_params)
    named = dict(model.named_parameters())
    for s in segments:
        for name, p in s.named_parameters():
            assert p is named[name] and p.data_ptr() == named[name].data_ptr()
    covered = {id(p) for p in seg_params}
    assert covered == params  # every parameter sits in some segment


@pytest.mark.parametrize("name,extra", TIMM, ids=[n for n, _ in TIMM])
def test_timm_segments_compose_to_forward(name, extra):
    import timm

    kw, side = timm_kwargs(name)
    torch.manual_seed(0)
    model = timm.create_model(name, **kw, **extra)
    traced = trace(model, (3, side, side))
    cuts = find_cuts(traced)
    bounds = choose_boundaries(find_stages(cuts, traced), 5, traced)
    segments = split_segments(traced, [b.cut.node for b in bounds])
    assert len(segments) == 5
    x = torch.randn(2, 3, side, side)
    _check(model, segments, x)
    # intermediate outputs have the boundary shapes
    with torch.no_grad():
        h = x
        for seg, b in zip(segments, bounds):
            h = seg(h)
            assert tuple(h.shape[1:]) == b.cut.shape


@pytest.mark.parametrize("student", ["resnet_tiny_student", "resnet_tiny_teacher", "resnet_tiny_student_same"])
def test_zoo_segments_via_compile_spec(student):
    c = compile_spec(load_spec(tiny_spec(teacher=False, student=f"module:kdgraph.zoo:{student}", method="supervised")))
    segs = c.student.segments
    assert len(segs) == 4
    _check(c.student.model, segs, torch.randn(3, 1, 8, 8))


def test_teacher_and_student_segments_of_a_pair():
    c = compile_spec(load_spec(tiny_spec()))
    x = torch.randn(2, 1, 8, 8)
    for art in (c.teacher, c.student):
        _check(art.model, art.segments, x)


def test_custom_module_spec_segments():
    from pathlib import Path

    from kdgraph.spec import load_spec

    spec = load_spec(Path(__file__).parent.parent / "specs" / "custom-module.yaml")
    c = compile_spec(spec)
    x = torch.randn(2, *c.input_size)
    for art in (c.teacher, c.student):
        segs = art.segments
        assert len(segs) == spec.decompose.blocks
        _check(art.model, segs, x)


class _Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.25, 0.1]).view(1, 3, 1, 1))
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        s = self.scale * 2  # constant, used in the second segment
        x = self.a(x - self.mean)
        x = self.b(x) * s
        return self.fc(x.mean((2, 3)))


def test_constants_are_copied_into_the_segments_that_use_them():
    model = _Constants()
    traced = trace(model, (3, 4, 4))
    cut = next(c for c in find_cuts(traced) if c.module == "a")
    segs = split_segments(traced, [cut.node])
    _check(model, segs, torch.randn(2, 3, 4, 4))
    assert model.scale in list(segs[1].parameters())


def test_a_boundary_that_is_not_a_cut_is_rejected():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return x + self.b(self.a(x))

    traced = trace(Res(), (1, 4, 4))
    with pytest.raises(PlanError, match="not a cut"):
        split_segments(traced, ["a"])


def _chain(model):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 16, 2)) if model is None else model


def test_a_tap_keeps_the_value_inside_a_block_while_armed():
    torch.manual_seed(0)
    model = _chain(None).eval()
    traced = trace(model, (3, 4, 4))
    cut = find_cut_by_module(find_cuts(traced), "1")
    segs = split_segments(traced, [cut.node])
    inner = find_cut_by_module(find_cuts(traced), "2").node  # the conv inside block 2
    insert_tap(segs[1], inner, "xs_p1")
    tap = segs[1].get_submodule(TAP_PREFIX + "xs_p1")
    seen = {}
    model[2].register_forward_hook(lambda m, i, o: seen.update(conv=o.detach().clone()))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
        got = segs[1](segs[0](x))
        assert tap.value is None  # not armed: nothing kept
        tap.armed = True
        assert torch.equal(segs[1](segs[0](x)), got)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tap.value, seen["conv"])
    assert not any(TAP_PREFIX in k for k in model.state_dict())  # the model's state is unchanged


def test_tapping_a_node_the_segment_lacks_is_refused():
    traced = trace(_chain(None), (3, 4, 4))
    segs = split_segments(traced, [find_cut_by_module(find_cuts(traced), "1").node])
    with pytest.raises(PlanError, match=r"^student_block1: no node 'nope' to tap$"):
        insert_tap(segs[0], "nope", "xs_p1")


class _Timed(nn.Module):
    """A denoiser in miniature: a time embedding (side input ``t`` alone) read by the first
    and the last block."""

    def __init__(self):
        super().__init__()
        self.temb = nn.Linear(1, 4)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 3, 1)

    def forward(self, x, t):
        e = self.temb(t.float()[:, None] / 10)[:, :, None, None]
        h = self.a(x) + e
        h = torch.relu(self.b(h))
        return self.c(h) + e[:, :3]


def test_side_values_reach_the_blocks_that_read_them():
    torch.manual_seed(0)
    model = _Timed().eval()
    traced = trace(model, (3, 4, 4), side=(SideInput("t", "timestep", 10),))
    cuts = [c for c in find_cuts(traced) if not c.multi]
    # a, a + e, b, relu, c: the side value e live all along is no part of any cut
    assert [c.module for c in cuts] == ["a", "", "b", "", "c"]
    segs = split_segments(traced, [cuts[1].node, cuts[3].node])
    side = split_side(traced, segs)
    e_nodes = set(side.side_outputs)
    assert segs[1].side_inputs == ()  # the middle block reads no side value
    assert segs[0].side_inputs and set(segs[0].side_inputs) <= e_nodes
    assert segs[2].side_inputs and set(segs[2].side_inputs) <= e_nodes
    assert set(segs[0].side_inputs) | set(segs[2].side_inputs) == e_nodes
    order = traced.order
    assert list(side.side_outputs) == sorted(e_nodes, key=order.index)
    x, t = torch.randn(3, 3, 4, 4), torch.tensor([0, 4, 9])
    with torch.no_grad():
        values = side_values(side, (t,))
        h = x
        for seg in segs:
            h = call_segment(seg, h, values)
        torch.testing.assert_close(h, model(x, t))
    assert split_side(trace(_chain(None), (3, 4, 4)), segs) is None  # no side inputs: no side segment


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        return self.out(torch.cat([e, self.up(self.down(e))], dim=1))


def test_a_multi_tensor_cut_hands_every_tensor_to_the_next_block():
    torch.manual_seed(0)
    model = _Skip()
    traced = trace(model, (3, 8, 8))
    down = find_cut_by_module(find_cuts(traced), "down")
    assert down.nodes == ("enc", "down")
    segs = split_segments(traced, [down.nodes])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        mid = segs[0](x)
        assert isinstance(mid, tuple) and [tuple(m.shape[1:]) for m in mid] == [(4, 8, 8), (8, 4, 4)]
        torch.testing.assert_close(segs[1](*mid), model(x))
    placeholders = [n.name for n in segs[1].graph.nodes if n.op == "placeholder"]
    assert placeholders == ["cut_enc", "cut_down"]


def test_segments_of_a_lazy_trace_are_lazy_and_compute_the_same():
    torch.manual_seed(0)
    model = _chain(None).eval()
    x = torch.randn(2, 3, 4, 4)
    out = {}
    for lazy in (False, True):
        traced = trace(model, (3, 4, 4), lazy=lazy)
        segs = split_segments(traced, [find_cut_by_module(find_cuts(traced), "1").node])
        assert all(is_lazy(s) == lazy for s in segs)
        with torch.no_grad():
            out[lazy] = segs[1](segs[0](x))
    assert torch.equal(out[True], out[False])
    torch.testing.assert_close(out[True], model(x))


class _SkipBN(nn.Module):
    """A U-Net level with BatchNorm and dropout on both sides of a multi-tensor cut."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.3))
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.Sequential(nn.Dropout(0.3), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        e = self.enc(x)
        return self.out(torch.cat([e, self.up(self.down(e))], dim=1))


def test_training_through_split_segments_is_training_the_model():
    """Train mode across a multi-tensor cut: the same outputs (one RNG stream for dropout, batch
    statistics), the same gradients on the very same parameters, the same BN running stats."""
    torch.manual_seed(0)
    model, twin = _SkipBN().train(), _SkipBN().train()
    twin.load_state_dict(model.state_dict())
    traced = trace(model, (3, 8, 8))
    segs = split_segments(traced, [find_cut_by_module(find_cuts(traced), "down").nodes]).train()
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(5)
    want = twin(x)
    want.square().mean().backward()
    torch.manual_seed(5)
    got = segs[1](*segs[0](x))
    got.square().mean().backward()
    torch.testing.assert_close(got, want)
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    torch.testing.assert_close(model.down[1].running_mean, twin.down[1].running_mean)


class _BatchRead(nn.Module):
    """The batch size read in the second block from that block's own input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.fc(h.reshape(h.shape[0], -1))


def test_a_batch_size_read_in_a_block_follows_the_batch_it_is_fed():
    model = _BatchRead().eval()
    traced = trace(model, (3, 4, 4), batch_size=2)
    segs = split_segments(traced, [find_cut_by_module(find_cuts(traced), "a").node])
    x = torch.randn(5, 3, 4, 4)  # another batch size than the trace's
    with torch.no_grad():
        torch.testing.assert_close(segs[1](segs[0](x)), model(x))
