"""Segments compose to the traced model's forward and share its parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import timm_kwargs
from kdgraph.compiler import compile_spec
from kdgraph.compiler.cuts import find_cuts
from kdgraph.errors import PlanError
from kdgraph.compiler.split import split_segments
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
