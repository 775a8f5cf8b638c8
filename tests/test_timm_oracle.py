"""timm's own ``feature_info`` as a test oracle for cuts, stages and boundaries.

Every feature_info entry names a module whose output timm considers a feature map, with its
width (num_chs) and reduction. kdgraph must find a cut closing that module with the same
width and reduction; where a reduction has exactly one entry, the stage holding that cut
must end there (or at a cut closing the same module).
"""

from __future__ import annotations

from collections import Counter

import pytest
from torch import nn

from conftest import traced_timm
from kdgraph.errors import TraceError
from kdgraph.compiler.boundaries import choose_boundaries
from kdgraph.compiler.stages import same_value
from kdgraph.compiler.trace import trace

MODELS = [
    # ResNet family
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet18d",
    "seresnet18", "resnet26", "res2net50_26w_4s", "skresnet18", "resnetv2_50", "eca_resnet33ts",
    # RegNet, CSP / darknet, DLA, DenseNet, DPN, VGG-like
    "regnetx_002", "regnety_002", "regnetx_004", "cspresnet50", "cspdarknet53", "darknet53",
    "dla34", "dla46_c", "densenet121", "dpn68", "repvgg_a0", "mobileone_s0", "gernet_s",
    "selecsls42b", "nfnet_l0",
    # EfficientNet / MobileNet / NAS family
    "efficientnet_b0", "efficientnet_b2", "mobilenetv2_100", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "tinynet_a", "lcnet_050", "mnasnet_100", "fbnetc_100",
    "hardcorenas_a", "semnasnet_050", "spnasnet_100", "rexnet_100", "ghostnet_100",
    # ConvNeXt-likes, MetaFormers, hybrids
    "convnext_atto", "convnext_tiny", "edgenext_xx_small", "poolformer_s12", "mobilevit_xxs",
    "levit_128s",
    # transformers / MLPs
    "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "deit_tiny_patch16_224", "mixer_s16_224",
]
# Not in MODELS: hrnet_w18_small (its feature_info names the modules of timm's features_only
# wrapper, 'stem', 'stage1'.., which the classifier does not have), tresnet_m (an entry with
# module ''), and models whose position embeddings or asserts pin the input at 224
# (coat_lite_tiny, resmlp_12_224, pit_ti_224, crossvit_tiny_240, botnet26t_256).

# Genuine disagreements between timm's feature_info and kdgraph's rules, with the reason.
CUT_XFAIL = {
    "xception41": "feature_info taps blocks.N.stack.act3 inside a residual block (before the add): "
                  "no single tensor crosses there, so it cannot be a cut",
}
# Where timm's convention and kdgraph's stage rule pick different cuts of one stage, the
# stage ends at timm's tap (Stage.tap, shown in the plan's rule column). The hint must not
# hide a regression elsewhere: only these models may need it, each for its stated reason.
MOVED_BY_TAP = {
    "resnet18d": "deep stem: the stem Sequential 'conv1' is followed by bn1/act1 at the same shape; "
                 "the container rule (needed for blocks -> norm in ViT/Swin) would end the stage at "
                 "conv1, timm taps act1",
    "ghostnet_100": "timm taps the first (stride-2) block of each resolution (blocks.1), the rule its "
                    "last block (blocks.2)",
    "dpn68": "timm taps features.conv5_3; the Sequential 'features' also holds the final BN+act "
             "(conv5_bn_ac), so the container rule would end the stage after it",
    "nfnet_l0": "timm taps stem.conv3 / final_conv before their activation, the rule the activation "
                "after them (stem.act4 / final_act)",
}
# The rule's end and timm's tap are the same tensor (final_conv is an nn.Identity after 'stages'):
# the rule's end stays and the plan says "same tensor as feature_info tap final_conv".
SAME_TENSOR = {"repvgg_a0": "final_conv", "mobileone_s0": "final_conv"}
RESNETS = ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet18d",
           "seresnet18", "resnet26", "res2net50_26w_4s", "skresnet18"]


def _param(name, xfails):
    marks = [pytest.mark.xfail(reason=xfails[name], strict=True)] if name in xfails else []
    return pytest.param(name, marks=marks, id=name)


def _feature_info(model):
    return [dict(fi) for fi in model.feature_info if fi["module"]]


@pytest.mark.parametrize("name", [_param(n, CUT_XFAIL) for n in MODELS + list(CUT_XFAIL)])
def test_feature_info_modules_are_cuts(name):
    model, traced, cuts, _ = traced_timm(name)
    missing = []
    for fi in _feature_info(model):
        ok = [c for c in cuts if fi["module"] in c.closes
              and c.channels == fi["num_chs"] and c.reduction == fi["reduction"]]
        if not ok:
            near = [(c.node, c.closes, c.channels, c.reduction) for c in cuts if fi["module"] in c.closes]
            missing.append((fi, near))
    assert not missing, f"{name}: feature_info entries without a matching cut: {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_single_feature_per_reduction_ends_its_stage(name):
    model, traced, cuts, stages = traced_timm(name)
    infos = _feature_info(model)
    per_reduction = Counter(fi["reduction"] for fi in infos)
    wrong = []
    for fi in infos:
        if per_reduction[fi["reduction"]] != 1:
            continue
        cut = next(c for c in cuts if fi["module"] in c.closes and c.channels == fi["num_chs"])
        stage = next((s for s in stages if cut in s.cuts), None)
        assert stage is not None, f"{name}: cut {cut.node} ({fi['module']}) is in no stage"
        if not (stage.end is cut or fi["module"] in stage.end.closes or same_value(traced, stage.end, cut)):
            wrong.append((fi["module"], stage.end.node, stage.end.closes))
    assert not wrong, f"{name}: stages end elsewhere than feature_info says: {wrong}"


@pytest.mark.parametrize("name", MODELS)
def test_feature_info_moves_stage_ends_only_where_known(name):
    _, traced, _, stages = traced_timm(name)
    moved = [s.tap for s in stages if s.tap.startswith("feature_info tap")]
    same = [s.tap for s in stages if s.tap.startswith("same tensor")]
    assert bool(moved) == (name in MOVED_BY_TAP), moved
    assert same == ([f"same tensor as feature_info tap {SAME_TENSOR[name]}"] if name in SAME_TENSOR else [])
    if name in SAME_TENSOR:
        end = next(s for s in stages if s.tap.startswith("same tensor"))
        tap = next(c for c in end.cuts if SAME_TENSOR[name] in c.closes)
        assert end.end is not tap and same_value(traced, end.end, tap)
        assert traced.gm.get_submodule(SAME_TENSOR[name]).__class__ is nn.Identity


def test_the_plan_rule_column_says_where_feature_info_chose_the_end():
    _, traced, _, stages = traced_timm("repvgg_a0")
    assert choose_boundaries(stages, 5, traced)[-1].rule == "stage end (same tensor as feature_info tap final_conv)"
    _, traced, _, stages = traced_timm("dpn68")
    assert choose_boundaries(stages, 5, traced)[-1].rule == "stage end (feature_info tap features.conv5_3)"


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_boundaries_are_layer1_to_layer4(name):
    model, traced, cuts, stages = traced_timm(name)
    bounds = choose_boundaries(stages, 5, traced)
    expected = [fi["module"] for fi in model.feature_info][-4:]
    assert expected == ["layer1", "layer2", "layer3", "layer4"]
    assert [b.cut.module for b in bounds] == expected
    assert all(b.rule == "stage end" for b in bounds)


@pytest.mark.parametrize("name,expected", [
    ("vit_tiny_patch16_224", ["blocks.2", "blocks.5", "blocks.8", "blocks"]),
    ("mixer_s16_224", ["blocks.1", "blocks.3", "blocks.5", "blocks"]),
    ("swin_tiny_patch4_window7_224", ["layers.0", "layers.1", "layers.2", "layers"]),
    ("convnext_atto", ["stages.0", "stages.1", "stages.2", "stages"]),
    ("efficientnet_b0", ["blocks.1", "blocks.2", "blocks.4", "blocks"]),
])
def test_boundaries_other_families(name, expected):
    _, traced, _, stages = traced_timm(name)
    assert [b.cut.module for b in choose_boundaries(stages, 5, traced)] == expected


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b0", "convnext_atto"])
def test_every_cut_of_a_module_closes_its_last_child(name):
    """Every cut that closes a sequence (nn.Sequential: its children run in definition order)
    also closes that sequence's last child, the model's own structure being the truth; and the
    ViT's ``blocks`` is closed, with ``blocks.11``, by one cut."""
    model, _, cuts, _ = traced_timm(name)
    modules = dict(model.named_modules())
    checked = 0
    for cut in cuts:
        for path in cut.closes:
            if isinstance(modules.get(path), nn.Sequential) and len(modules[path]):
                last = f"{path}.{list(modules[path].named_children())[-1][0]}"
                assert last in cut.closes, (cut.node, path, last)
                checked += 1
    assert checked >= 1
    if name.startswith("vit"):
        assert [c.closes[:2] for c in cuts if "blocks" in c.closes] == [("blocks", "blocks.11")]


def test_wrong_input_size_raises_trace_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(TraceError, match="input_size"):
        trace(model, (3, 4, 4))
    assert trace(model, (3, 2, 2)).nodes  # the right size traces
