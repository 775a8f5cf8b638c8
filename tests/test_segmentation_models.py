"""kdgraph.segmentation.models: torchvision's segmentation models as traceable single-head models,
checked against torchvision's own eager forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from kdgraph.errors import ModelError
from kdgraph.models import create_model
from kdgraph.segmentation.losses import resize_to
from kdgraph.segmentation.models import SEGMENTATION_MODELS, SegmentationModel, create_segmentation_model


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """torchvision's default weights_backbone downloads ImageNet weights: none may be fetched."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_every_torchvision_segmentation_model_is_listed():
    assert set(SEGMENTATION_MODELS) == set(torchvision.models.list_models(module=torchvision.models.segmentation))


@pytest.mark.parametrize("name,kwargs", [
    ("fcn_resnet50", {"aux_loss": True}), ("deeplabv3_resnet50", {"aux_loss": True}),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}), ("lraspp_mobilenet_v3_large", {}),
])
def test_heads_upsampled_equal_torchvisions_forward(name, kwargs):
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", {"num_classes": 5, **kwargs})
    assert isinstance(model, SegmentationModel) and model.constructor == (name, {"num_classes": 5, **kwargs,
                                                                                   "weights_backbone": None})
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model.net(x)
        out = model(x)
    assert out.shape[:2] == (2, 5) and out.shape[-2:] != x.shape[-2:]  # at the head's stride
    torch.testing.assert_close(resize_to(out, x.shape[-2:]), expected["out"])
    if "aux" in expected:
        both = SegmentationModel(model.net, name, kwargs, heads=("out", "aux")).eval()
        with torch.no_grad():
            out2, aux = both(x)
        torch.testing.assert_close(resize_to(aux, x.shape[-2:]), expected["aux"])
        torch.testing.assert_close(out2, out)
    assert model.num_classes == 5


def test_the_source_refuses_heads_and_a_missing_aux_head():
    with pytest.raises(ModelError, match="kwargs.heads is not a torchvision argument"):
        create_model("torchvision:fcn_resnet50", {"heads": ["out", "aux"]}, meta=True)
    with pytest.raises(ModelError, match="needs aux_loss: true"):
        SegmentationModel(create_segmentation_model("fcn_resnet50", {}).net, "fcn_resnet50", {}, heads=("out", "aux"))
    with pytest.raises(ModelError, match="not a segmentation model"):
        create_segmentation_model("resnet18", {})


def test_the_fx_trace_is_the_model_and_cuts_run_through_the_backbone():
    from kdgraph.compiler.cuts import find_cuts
    from kdgraph.compiler.trace import trace

    torch.manual_seed(1)
    model = create_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 3}).eval()
    traced = trace(model, (3, 64, 64), "student")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(x), model(x))
    cuts = find_cuts(traced)
    single = [c.module for c in cuts if not c.tensors]
    assert "net.backbone.3" in single and "net.backbone.4" in single  # stride 4 and 8 stage ends


SPEC = """
name: seg-plan
seed: 0
teacher: {{model: "torchvision:{teacher}", kwargs: {{num_classes: 21}}}}
student: {{model: "torchvision:{student}", kwargs: {{num_classes: 21}}}}
data: {{dataset: synthetic, input_size: [3, 128, 128], num_classes: 21, batch_size: 4}}
decompose:
  blocks: 4
  cuts:
{cuts}
schedule: {{method: stablekd, recompositions: 2, epochs: 3}}
output: runs/seg-plan
"""


@pytest.mark.parametrize("teacher,student,cuts", [
    ("deeplabv3_resnet50", "lraspp_mobilenet_v3_large",
     [("net.backbone.maxpool", "net.backbone.1"), ("net.backbone.layer1", "net.backbone.3"),
      ("net.backbone.layer2", "net.backbone.4")]),
    ("fcn_resnet101", "deeplabv3_mobilenet_v3_large",
     [("net.backbone.maxpool", "net.backbone.1"), ("net.backbone.layer1", "net.backbone.3"),
      ("net.backbone.layer2", "net.backbone.6")]),
])
def test_the_issues_pairs_plan_on_the_meta_device(tmp_path, teacher, student, cuts):
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    text = "\n".join(f"    - {{teacher: {t}, student: {s}}}" for t, s in cuts)
    path = Path(tmp_path, "seg.yaml")
    path.write_text(SPEC.format(teacher=teacher, student=student, cuts=text))
    c = compile_spec(load_spec(path), materialize=False)
    assert all(p.is_meta for p in c.student.model.parameters())
    blocks = c.pairing.blocks
    assert [b.is_head for b in blocks] == [False, False, False, True]
    got = [(b.teacher.module, b.student.module) for b in blocks[:-1]]
    assert got == cuts
    assert all(b.rule.startswith("explicit") for b in blocks[:-1])
    assert c.student.output_shape[1] == 21 and len(c.student.output_shape) == 4  # dense logits at the head
