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
        got = model(x)
    assert model.heads == tuple(expected)  # aux_loss: true gives the heads (out, aux)
    out = got[0] if "aux" in expected else got
    assert out.shape[:2] == (2, 5) and out.shape[-2:] != x.shape[-2:]  # at the head's stride
    torch.testing.assert_close(resize_to(out, x.shape[-2:]), expected["out"])
    if "aux" in expected:
        torch.testing.assert_close(resize_to(got[1], x.shape[-2:]), expected["aux"])
        alone = SegmentationModel(model.net, name, kwargs, heads=("out",)).eval()
        with torch.no_grad():
            torch.testing.assert_close(alone(x), out)
    assert model.num_classes == 5


def test_the_source_names_its_heads_from_aux_loss():
    assert create_model("torchvision:fcn_resnet50", {"num_classes": 3}, meta=True).heads == ("out",)
    assert create_model("torchvision:fcn_resnet50", {"num_classes": 3, "aux_loss": True}, meta=True).heads == \
        ("out", "aux")
    assert create_model("torchvision:lraspp_mobilenet_v3_large", {"num_classes": 3}, meta=True).heads == ("out",)


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


AUTO = """
name: seg-plan
seed: 0
teacher: {{model: "torchvision:{teacher}", kwargs: {{num_classes: 21, aux_loss: true}}}}
student: {{model: "torchvision:{student}", kwargs: {{num_classes: 21{aux}}}}}
data: {{dataset: synthetic, input_size: [3, 128, 128], num_classes: 21, batch_size: 4}}
decompose: {{blocks: 4}}
schedule: {{method: stablekd, recompositions: 2, epochs: 3}}
loss: {{dense: cwd, kl_weight: 5}}
output: {out}
"""


@pytest.mark.parametrize("teacher,student,aux,out_grids", [
    # (teacher's out, student's out) logit grids of a 128² input; heads as (name, teacher, student)
    ("deeplabv3_resnet50", "lraspp_mobilenet_v3_large", False, ("16×16 (stride 8)", "16×16 (stride 8)")),
    ("fcn_resnet101", "deeplabv3_mobilenet_v3_large", True, ("16×16 (stride 8)", "8×8 (stride 16)")),
])
def test_the_issues_pairs_plan_with_auto_cuts_and_both_heads(tmp_path, teacher, student, aux, out_grids):
    """`kdgraph plan` of the issue's pairs with decompose.cuts auto, on the meta device: every
    block pairs (a MobileNetV3 student keeps a stride-8 feature for its head, so past it its cuts
    hold two tensors: the auto cuts are its single-tensor ones), adapters and projectors per
    block, and a row per head with its output stride; exit 0, no traceback."""
    import io
    import json

    from rich.console import Console
    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    from kdgraph.compiler import compile_spec
    from kdgraph.render import plan_view
    from kdgraph.spec import load_spec

    path = Path(tmp_path, "seg.yaml")
    path.write_text(AUTO.format(teacher=teacher, student=student, aux=", aux_loss: true" if aux else "",
                                out=tmp_path / "out"))
    c = compile_spec(load_spec(path), materialize=False)
    assert c.task == "dense" and all(p.is_meta for p in c.student.model.parameters())
    inner = c.pairing.blocks[:-1]
    assert len(inner) == 3 and all(not b.student.multi and not b.teacher.multi for b in inner)
    assert all(b.projection is not None for b in inner)  # stablekd's default projector: frozen PCA
    reductions = [c.student.traced.input_size[1] // b.student.shape[-1] for b in inner]
    assert reductions == sorted(reductions) and reductions[-1] == 8  # the cuts run down the backbone
    assert [n for n, _ in c.teacher.heads] == ["out", "aux"]
    assert [n for n, _ in c.student.heads] == (["out", "aux"] if aux else ["out"])
    assert c.graph.nodes["head_loss"]["entry"] == "cwd"
    plan = c.to_dict()
    assert [h["name"] for h in plan["teacher"]["heads"]] == ["out", "aux"]
    json.dumps(plan)
    buf = io.StringIO()
    Console(file=buf, width=400).print(plan_view(c))
    text = buf.getvalue()
    t_grid, s_grid = out_grids
    assert f"21 logits per pixel, {t_grid}" + ("" if t_grid == s_grid else f" / {s_grid}") in text
    assert "head aux" in text and ("(teacher only)" in text) is not aux
    assert "frozen pca" in text
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output[-2000:]
    assert "head out" in result.output and "head aux" in result.output


def test_two_heads_train_through_the_distiller_and_score(tmp_path):
    """A student with heads (out, aux): the head loss's ce is out's plus aux_weight times aux's
    (written out below), only out is distilled, the aux head gets gradients, inference returns
    both heads and the task scores out."""
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.distiller import Distiller
    from kdgraph.segmentation.losses import channel_wise_divergence
    from kdgraph.spec import load_spec
    from kdgraph.tasks.dense import dense_scores

    path = Path(tmp_path, "seg.yaml")
    path.write_text(AUTO.format(teacher="deeplabv3_mobilenet_v3_large", student="deeplabv3_mobilenet_v3_large",
                                aux=", aux_loss: true", out=tmp_path / "out")
                    .replace("num_classes: 21", "num_classes: 5").replace("128, 128", "64, 64")
                    .replace("method: stablekd, recompositions: 2, epochs: 3", "method: kd, epochs: 1")
                    .replace("decompose: {blocks: 4}", "decompose: {blocks: 2}"))
    torch.manual_seed(0)
    c = compile_spec(load_spec(path), allow_missing_weights=True)
    d = Distiller(c)
    d.set_stage(c.plan.stages[0])
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    y[:, :16] = 255
    torch.manual_seed(7)  # the heads' dropout draws the same masks in both forwards
    terms = d(x, y)
    assert set(terms) == {"ce", "cwd"}
    torch.manual_seed(7)
    with torch.no_grad():
        s_out, s_aux = c.student.model(x)
        t_out, _ = c.teacher.model(x)

    def ce(logits):
        up = resize_to(logits, (64, 64))
        return torch.nn.functional.cross_entropy(up, y, ignore_index=255)

    torch.testing.assert_close(terms["ce"].detach(), ce(s_out) + 0.5 * ce(s_aux), rtol=1e-4, atol=1e-5)
    grid = tuple(t_out.shape[-2:])  # CWD on the teacher's logit grid, the labels taken to it by nearest
    valid = torch.nn.functional.interpolate((y != 255).float()[:, None], size=grid, mode="nearest-exact")[:, 0]
    torch.testing.assert_close(terms["cwd"].detach(),
                               5 * channel_wise_divergence(resize_to(s_out, grid), t_out, 1.0, valid),
                               rtol=1e-4, atol=1e-6)
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in c.student.model.net.aux_classifier.parameters())
    d.eval()

    class Loader:
        def epoch(self, e, start=0):
            return iter([(x, y)])

    with torch.no_grad():
        heads = d.inference(x)
    assert isinstance(heads, tuple) and len(heads) == 2
    got = dense_scores(lambda xb: d.inference(xb), Loader(), torch.device("cpu"))
    want = dense_scores(lambda xb: heads[0], Loader(), torch.device("cpu"))
    assert got == want


def test_a_timm_backbone_with_lraspps_head_is_its_formula_and_traces():
    """TimmSegmentation's out against the head written out on the backbone's own stride-8 and
    deepest features; the fx trace equals the eager forward."""
    from kdgraph.compiler.trace import trace
    from kdgraph.segmentation.models import timm_segmentation

    torch.manual_seed(3)
    model = timm_segmentation("resnet18", num_classes=5, channels=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        low, high = model.backbone(x)
        assert low.shape[-1] == 8 and high.shape[-1] == 2  # strides 8 and 32
        gate = torch.sigmoid(torch.nn.functional.conv2d(high.mean(dim=(2, 3), keepdim=True), model.scale[1].weight))
        bn = model.cbr[1]
        h = torch.nn.functional.conv2d(high, model.cbr[0].weight)
        h = torch.relu((h - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                       * bn.weight[:, None, None] + bn.bias[:, None, None])
        up = torch.nn.functional.interpolate(h * gate, size=(8, 8), mode="bilinear", align_corners=False)
        want = (torch.nn.functional.conv2d(low, model.low_classifier.weight, model.low_classifier.bias)
                + torch.nn.functional.conv2d(up, model.high_classifier.weight, model.high_classifier.bias))
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
        traced = trace(model, (3, 64, 64), "student")
        torch.testing.assert_close(traced.gm(x), model(x))
    with pytest.raises(ModelError, match="no feature map at stride 4"):
        timm_segmentation("vit_tiny_patch16_224", num_classes=3, low_stride=4)


def test_a_timm_segmentation_student_plans_against_a_torchvision_teacher(tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    path = Path(tmp_path, "seg.yaml")
    path.write_text(AUTO.format(teacher="deeplabv3_resnet50", student="x", aux="", out=tmp_path / "out").replace(
        '"torchvision:x", kwargs: {num_classes: 21}',
        '"module:kdgraph.segmentation.models:timm_segmentation", kwargs: {backbone: mobilenetv3_large_100, '
        'num_classes: 21}'))
    c = compile_spec(load_spec(path), materialize=False)
    assert c.task == "dense" and c.student.output_stride == 8 and c.teacher.output_stride == 8
    inner = c.pairing.blocks[:-1]
    assert [b.student.module for b in inner] == ["backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2"]
    assert all(not b.teacher.multi for b in inner)
