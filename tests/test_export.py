"""Export of the trained student: plain state_dicts timm loads without kdgraph; folded
adapters that reload (load_student) to the very inference function the distiller had."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.export import export_student, load_student
from kdgraph.spec import load_spec

from _runtime_helpers import randomise_bn, tiny_spec, train_here, write_spec


def test_plain_export_loads_into_timm(tmp_path):
    import timm

    spec = load_spec(tiny_spec(tmp_path, "supervised", student="timm:resnet18", blocks=1,
                               data={"input_size": [1, 32, 32]}))
    compiled = compile_spec(spec)
    d = Distiller(compiled)
    assert not d.adapters_in_inference
    randomise_bn(compiled.student.model, 0)
    path = export_student(d.eval(), compiled, tmp_path / "student.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    model.load_state_dict(load_file(str(path)))  # strict: exactly the architecture's keys
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), d.inference(x), atol=1e-5)
        assert torch.allclose(model(x), compiled.student.model(x), atol=1e-5)


def test_folded_export_reloads_to_the_inference_path(tmp_path):
    spec = load_spec(tiny_spec(tmp_path, "stablekd", decompose={"adapters": "in_path"}))
    compiled = compile_spec(spec)
    d = Distiller(compiled)
    assert d.adapters_in_inference and len(d.adapters) == 3
    randomise_bn(d, 1)  # the student's and the adapters' BN: folding must use running stats
    d.eval()
    path = export_student(d, compiled, tmp_path / "student.safetensors")
    fresh = compile_spec(spec)  # another (random) student: every weight must come from the file
    student = load_student(fresh, path).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ref = d.inference(x)
        assert torch.allclose(student(x), ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(fresh.student.model.eval()(x), ref, atol=1e-3)
    # the folded maps are one Cs -> Cs 1x1 conv each, not the lift/lower pairs
    keys = load_file(str(path)).keys()
    assert {k for k in keys if k.startswith("folded.")} == {f"folded.{i}.{p}" for i in (1, 2, 3)
                                                            for p in ("weight", "bias")}
    assert load_file(str(path))["folded.2.weight"].shape == (32, 32, 1, 1)


@pytest.mark.slow
def test_cli_export_writes_the_trained_student(tmp_path):
    from kdgraph.cli.main import app

    spec_dict = tiny_spec(tmp_path / "run", "stablekd", recompositions=1, epochs=2, fraction=0.1,
                          decompose={"adapters": "in_path"})  # adapters in the path: the program export
    spec_path = write_spec(spec_dict, tmp_path / "spec.yaml")
    summary = train_here(load_spec(spec_path))
    res = CliRunner().invoke(app, ["export", str(spec_path), "--to", str(tmp_path / "exported")])
    assert res.exit_code == 0, res.output
    assert "torch.export program" in res.output  # the zoo student's 3x3 convs cannot absorb adapters
    compiled = compile_spec(load_spec(spec_path))
    a = load_student(compiled, tmp_path / "run" / "student.safetensors").eval()
    b = load_student(compile_spec(load_spec(spec_path)), tmp_path / "exported")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5, rtol=1e-4)
    res = CliRunner().invoke(app, ["eval", str(spec_path), "--checkpoint", str(tmp_path / "exported"), "-f", "json"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads(res.output)["student_top1"] == pytest.approx(summary["student_top1"])
