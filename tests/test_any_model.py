"""Issue 12, "any model": flat networks (no stage containers) and models fx cannot trace whole.

The truth for flat networks is independent of kdgraph: timm's ``feature_info`` for vgg11,
and for hand-built flat Sequentials the strides written into them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_spec
from kdgraph.compiler import compile_spec
from kdgraph.cuts import find_cuts
from kdgraph.stages import choose_boundaries, find_stages
from kdgraph.trace import trace


def _planned(model: nn.Module, size: int, in_chans: int = 3):
    traced = trace(model, (in_chans, size, size))
    cuts = find_cuts(traced)
    return traced, cuts, find_stages(cuts, traced)


def flat_cnn(width: int = 8, in_chans: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A VGG-like flat Sequential: conv/bn/relu layers and max pools, no stage containers."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_chans, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 5: reduction 2
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8: reduction 4
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 11: reduction 8
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))


@pytest.fixture(scope="module")
def vgg11():
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("vgg11", num_classes=10).eval()
    return model, *_planned(model, 32)


def test_vgg11_cuts_match_feature_info(vgg11):
    # Every tap timm names is a cut of its width and reduction, the last one (features.20, a
    # MaxPool2d(2) of a 2x2 map at 32 px) included: a fixed-kernel pool's 1x1 output is a map.
    model, _, cuts, _ = vgg11
    for fi in model.feature_info:
        assert any(fi["module"] in c.closes and c.channels == fi["num_chs"] and c.reduction == fi["reduction"]
                   for c in cuts), fi


def test_vgg11_stage_ends_are_feature_info_taps(vgg11):
    model, traced, _, stages = vgg11
    taps = [fi["module"] for fi in model.feature_info]
    bounds = choose_boundaries(stages, 5, traced)
    assert [taps.index(next(p for p in b.cut.closes if p in taps)) for b in bounds] == [2, 3, 4, 5]
    assert [b.cut.reduction for b in bounds] == [4, 8, 16, 32]
    assert all(b.rule == "stage end" for b in bounds)


def test_flat_sequential_stages_come_from_feature_shapes():
    traced, cuts, stages = _planned(flat_cnn(), 16, in_chans=1)
    assert all(c.level == 0 for c in cuts)  # nothing groups the layers
    bounds = choose_boundaries(stages, 5, traced)
    assert [b.cut.module for b in bounds] == ["4", "7", "10", "11"]
    assert [b.cut.reduction for b in bounds] == [1, 2, 4, 8]
    head = next(c for c in cuts if c.module == "12")
    assert head.layout == "vector"  # the adaptive (global) pool ends the feature maps


def test_flat_teacher_and_student_plan_with_adapters():
    spec = tiny_spec(blocks=4, data={"dataset": "synthetic", "input_size": [1, 16, 16]})
    c = compile_spec(spec, models=(flat_cnn(16), flat_cnn(8)))
    assert [b.to_dict()["teacher"] for b in c.pairing.blocks] == ["7", "10", "11", "output"]
    assert [a.lift for a in c.pairing.adapters] == [(16, 32), (32, 64), (32, 64)]


@pytest.mark.parametrize("name,size,reductions", [
    ("alexnet", 64, [4, 8, 16, 64]),  # 15, 7, 3 (nominal reductions) and 1x1 (exactly 64)
    ("squeezenet1_0", 224, [2, 4, 8, 16]),  # ceil-mode pools: 109, 54, 27, 13
    ("vgg11", 32, [4, 8, 16, 32]),  # its AdaptiveAvgPool2d((7, 7)) blows a 1x1 map up: not a stage
])
def test_torchvision_flat_networks_plan_at_nominal_reductions(name, size, reductions):
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=10).eval()
    traced, _, stages = _planned(model, size)
    bounds = choose_boundaries(stages, 5, traced)
    assert [b.cut.reduction for b in bounds] == reductions
    assert all(b.cut.module.startswith("features") for b in bounds)
