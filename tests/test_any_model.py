"""Issue 12, "any model": flat networks (no stage containers) and models fx cannot trace whole.

The truth for flat networks is independent of kdgraph: timm's ``feature_info`` for vgg11,
and for hand-built flat Sequentials the strides written into them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kdgraph.compiler import compile_spec
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.boundaries import choose_boundaries
from kdgraph.compiler.stages import find_stages
from kdgraph.compiler.trace import trace
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec


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
    spec = load_spec(tiny_spec(blocks=4, data={"dataset": "synthetic", "input_size": [1, 16, 16]},
                                decompose={"adapters": "in_path"}))
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


# --- models torch.fx cannot trace whole ----------------------------------------------------

class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the model around it can."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: not fx-traceable
            return self.conv(x)
        return x


class WithBranchyBlocks(nn.Module):
    def __init__(self, w: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(Branchy(w), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), Branchy(2 * w), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), Branchy(4 * w))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(self.stem(x)))).mean((2, 3)))


class UntraceableTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:  # in the top-level forward: no module to make a leaf
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_untraceable_submodules_become_leaves_and_the_model_plans():
    model = WithBranchyBlocks()
    traced = trace(model, (1, 16, 16))
    assert [leaf.split(" ", 1)[0] for leaf in traced.leaves] == ["layer1.0", "layer2.1", "layer3.1"]
    assert all("(Branchy)" in leaf and "if x.sum() > 0:" in leaf and "test_any_model.py:" in leaf
               for leaf in traced.leaves)
    called = {n.target for n in traced.gm.graph.nodes if n.op == "call_module"}
    assert {"layer1.0", "layer2.1", "layer3.1"} <= called and "layer1.0.conv" not in called
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(traced.gm(x), model(x))  # the leaf runs its Python, branch and all

    spec = load_spec(tiny_spec(blocks=4, data={"dataset": "synthetic", "input_size": [1, 16, 16]}))
    c = compile_spec(spec, models=(WithBranchyBlocks(16), WithBranchyBlocks(8)))
    assert [b.to_dict()["student"] for b in c.pairing.blocks] == ["layer1", "layer2", "layer3", "output"]
    leaf_notes = [n for n in c.notes if "whole as a leaf" in n]
    assert len(leaf_notes) == 6 and leaf_notes[0].startswith("teacher: traced layer1.0 (Branchy)")
    assert c.to_dict()["student"]["leaves"] == list(c.student.traced.leaves)


def test_plan_cli_reports_the_leaves(tmp_path):
    from typer.testing import CliRunner

    from kdgraph.cli.main import app

    (tmp_path / "branchy_models.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_any_model import WithBranchyBlocks\n"
        "def make(num_classes=10, in_chans=1):\n    return WithBranchyBlocks(8, num_classes)\n"
        % str(__import__("pathlib").Path(__file__).parent))
    (tmp_path / "spec.yaml").write_text(
        "name: branchy\nstudent: {model: 'module:branchy_models:make'}\n"
        "data: {dataset: synthetic, input_size: [1, 16, 16]}\ndecompose: {blocks: 3}\n"
        "schedule: {method: supervised, epochs: 1}\n")
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "spec.yaml")], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "student: traced layer1.0 (Branchy) whole as a leaf" in " ".join(result.output.split())


def test_an_untraceable_top_level_forward_is_a_one_line_error_naming_module_and_line():
    from kdgraph.errors import TraceError

    with pytest.raises(TraceError) as info:
        trace(UntraceableTop(), (1, 8, 8), role="student")
    msg = str(info.value)
    assert "\n" not in msg
    assert "torch.fx cannot trace the student (UntraceableTop)" in msg
    assert "module '<root>' (UntraceableTop)" in msg and "test_any_model.py:" in msg
    assert "if x.mean() > 0:" in msg


def test_a_model_that_is_all_leaf_is_refused_naming_the_leaf():
    from kdgraph.errors import PlanError

    class AllInOne(nn.Module):  # features and classifier in one untraceable forward
        def __init__(self):
            super().__init__()
            self.body = Branchy(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            if x.std() > 0:
                x = self.body(x)
            return self.fc(x.flatten(1))

    model = nn.Sequential(AllInOne(), nn.ReLU(), nn.Linear(10, 10))
    traced = trace(model, (1, 8, 8))
    assert [leaf.split(" ", 1)[0] for leaf in traced.leaves] == ["0"]
    cuts = find_cuts(traced)
    with pytest.raises(PlanError, match=r"torch.fx traced 0 \(AllInOne\) whole, as a leaf"):
        choose_boundaries(find_stages(cuts, traced), 3, traced)


@pytest.mark.parametrize("shape,hw,reduction", [
    ((64, 55, 55), (224, 224), 4),  # AlexNet: k11 s4 p2
    ((96, 109, 109), (224, 224), 2),  # SqueezeNet: k7 s2, no padding
    ((2048, 8, 8), (299, 299), 32),  # Inception v3's last map
    ((288, 35, 35), (299, 299), 8),
    ((1280, 4, 4), (224, 224), 64),  # 224 / 64 rounded up (selecsls, shvit), not 224 / 56
    ((192, 16, 16), (224, 224), 14),  # a patch-14 stem tiles 224 exactly
    ((8, 3, 3), (64, 64), 16),
])
def test_nominal_reductions_of_grids_that_do_not_tile_the_input(shape, hw, reduction):
    from kdgraph.compiler.cuts import infer_layout

    assert infer_layout(shape, hw) == ("NCHW", shape[0], reduction, 0)
