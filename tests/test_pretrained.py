"""Pretrained teachers and students built from a spec: torchvision files, fresh heads for
students, kdgraph's own training checkpoints as teachers; ``pretrained: true`` through timm's
and torchvision's own loaders (never reaching a hub: sockets are disabled here); planning
without weights; top-5. (Reading and fitting weight files themselves: tests/test_weights.py.)

The truth every load is checked against is the source model's own ``state_dict``.
"""

from __future__ import annotations

import socket

import pytest
import timm
import torch
import torchvision

from kdgraph.compiler import compile_spec
from kdgraph.errors import ModelError
from kdgraph.models import build_model, read_state_dict
from kdgraph.spec import ModelSpec, load_spec

from _runtime_helpers import ROOT, tiny_spec, train_here
from test_weights import TIMM, _same, _save_safetensors, _save_torch, _timm  # the weight files' helpers


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing in this file may reach a hub: every connection attempt fails at once."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in kdgraph's tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- torchvision files ------------------------------------------------------------------------

def test_torchvision_resnet_pth(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=10)
    truth = source.state_dict()
    path = _save_torch(truth, tmp_path / "resnet18-f37072fd.pth")
    spec = ModelSpec(model="torchvision:resnet18", kwargs={"num_classes": 10}, checkpoint=path)
    _same(build_model(spec).state_dict(), truth)
    # Files of old torchvision releases have no BatchNorm counters: they load all the same.
    old = _save_torch({k: v for k, v in truth.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    _same(build_model(spec.model_copy(update={"checkpoint": old})).state_dict(), truth)


# --- heads ----------------------------------------------------------------------------------

def test_student_checkpoint_for_other_classes_gets_a_fresh_head(tmp_path):
    truth = _timm(num_classes=1000).state_dict()
    path = _save_safetensors(truth, tmp_path / "in1k.safetensors")
    notes: list[str] = []
    spec = ModelSpec(model=f"timm:{TIMM}", kwargs={"num_classes": 7}, checkpoint=path)
    torch.manual_seed(3)
    student = build_model(spec, role="student", notes=notes)
    _same(student.state_dict(), truth, skip=("fc.",))
    assert student.fc.weight.shape == (7, 512)
    torch.manual_seed(3)
    assert torch.equal(student.fc.weight, timm.create_model(TIMM, num_classes=7).fc.weight)  # its own init
    assert len(notes) == 1 and "fc.weight, fc.bias freshly initialised" in notes[0]


def test_teacher_checkpoint_for_other_classes_is_an_error(tmp_path):
    path = _save_safetensors(_timm(num_classes=1000).state_dict(), tmp_path / "in1k.safetensors")
    spec = ModelSpec(model=f"timm:{TIMM}", kwargs={"num_classes": 7}, checkpoint=path)
    with pytest.raises(ModelError, match=r"(?s)fc.weight: checkpoint \(1000, 512\) vs model \(7, 512\).*"
                                         r"trained for 1000 classes.*fine-tune it first"):
        build_model(spec, role="teacher")


# --- kdgraph's own training checkpoints (issue 15.13) -----------------------------------------

@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    """A one-epoch supervised run of the zoo's tiny teacher: OUT/checkpoints/last.pt and
    OUT/student.safetensors."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    raw = tiny_spec(out, "supervised", blocks=1, epochs=1, fraction=0.1,
                    student="module:kdgraph.zoo:resnet_tiny_teacher")
    spec = load_spec(raw)
    summary = train_here(spec)
    return out, raw, summary


def test_teacher_checkpoint_can_be_a_kdgraph_last_pt(tmp_path, supervised_run):
    out, _, _ = supervised_run
    truth = read_state_dict(out / "student.safetensors")  # the exported student, written independently
    raw = tiny_spec(tmp_path / "kd", "kd", blocks=2, teacher_checkpoint=out / "checkpoints" / "last.pt")
    compiled = compile_spec(load_spec(raw))
    _same(compiled.teacher.model.state_dict(), truth)


# --- pretrained: true -----------------------------------------------------------------------------

def test_pretrained_timm_goes_through_timm_loader(tmp_path):
    """timm's own mechanism, pointed at a local file (pretrained_cfg_overlay) instead of its hub."""
    truth = _timm(num_classes=1000).state_dict()
    path = _save_safetensors(truth, tmp_path / "model.safetensors")
    kwargs = {"pretrained_cfg_overlay": {"file": str(path)}}
    teacher = build_model(ModelSpec(model=f"timm:{TIMM}", pretrained=True, kwargs=kwargs), role="teacher")
    _same(teacher.state_dict(), truth)
    notes: list[str] = []
    student = build_model(ModelSpec(model=f"timm:{TIMM}", pretrained=True, kwargs={**kwargs, "num_classes": 10}),
                          role="student", notes=notes)
    _same(student.state_dict(), truth, skip=("fc.",))
    assert student.fc.weight.shape == (10, 512)
    assert "pretrained classifier (1000 classes) is replaced by a fresh one for 10 classes" in notes[0]


def test_pretrained_teacher_for_other_classes_fails_before_fetching(monkeypatch):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("must not build"))
    with pytest.raises(ModelError, match="predict 1000 classes, kwargs.num_classes asks for 10"):
        build_model(ModelSpec(model=f"timm:{TIMM}", pretrained=True, kwargs={"num_classes": 10}), role="teacher")


def test_pretrained_timm_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(model=f"timm:{TIMM}", pretrained=True, kwargs={"num_classes": 10}))
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith(f"timm:{TIMM}: cannot load its pretrained weights") and "checkpoint: PATH" in text


def test_pretrained_timm_without_network_fails_before_the_hubs_retries(tmp_path, monkeypatch):
    """Offline without the hub's offline switch, timm's client retried for about a minute."""
    import time

    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: pytest.fail("tried the hub"))
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(model=f"timm:{TIMM}", pretrained=True, kwargs={"num_classes": 10}))
    text = str(info.value)
    assert time.perf_counter() - t0 < 10
    assert "\n" not in text and text.startswith(f"timm:{TIMM}: cannot load its pretrained weights")
    assert "huggingface.co is not reachable" in text and "not in the local cache" in text and "checkpoint: PATH" in text


def _fake_torchvision_download(monkeypatch, state=None, error=None):
    def load(url, *args, **kwargs):
        if error is not None:
            raise error
        return state

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", load)


def test_pretrained_torchvision_gets_a_fresh_head(monkeypatch):
    torch.manual_seed(0)
    truth = torchvision.models.resnet18().state_dict()  # ImageNet-shaped: 1000 classes
    _fake_torchvision_download(monkeypatch, state=truth)
    same = build_model(ModelSpec(model="torchvision:resnet18", pretrained=True), role="teacher")
    _same(same.state_dict(), truth)
    notes: list[str] = []
    student = build_model(ModelSpec(model="torchvision:resnet18", pretrained=True, kwargs={"num_classes": 4}),
                          notes=notes)
    _same(student.state_dict(), truth, skip=("fc.",))
    assert student.fc.weight.shape == (4, 512) and "fresh one for 4 classes" in notes[0]


def test_pretrained_torchvision_offline_is_one_line(monkeypatch):
    from urllib.error import URLError

    _fake_torchvision_download(monkeypatch, error=URLError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(ModelError) as info:
        build_model(ModelSpec(model="torchvision:resnet18", pretrained=True))
    text = str(info.value)
    assert "\n" not in text and text.startswith("torchvision:resnet18: cannot load") and "checkpoint: PATH" in text


def test_plan_fetches_no_weights(monkeypatch):
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: pytest.fail("plan fetched weights"))
    raw = {"name": "p", "teacher": {"model": f"timm:{TIMM}", "pretrained": True},
           "student": {"model": "timm:resnet18", "pretrained": True},
           "data": {"dataset": "synthetic", "input_size": [3, 32, 32], "num_classes": 1000},
           "decompose": {"blocks": 3}, "schedule": {"method": "kd", "epochs": 1}}
    compiled = compile_spec(load_spec(raw))
    assert compiled.plan.k == 3
    assert [n.split(":")[0] for n in compiled.notes] == ["teacher timm", "student timm"]
    assert all("not fetched" in n for n in compiled.notes)


# --- the README's own-data specs ------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["your-own-data-teacher", "your-own-data"])
def test_your_own_data_specs_parse_and_plan_without_weights_or_data(monkeypatch, stem):
    """The README's section 'Your own data and teacher' shows these files verbatim."""
    monkeypatch.chdir(ROOT)
    spec = load_spec(ROOT / "specs" / f"{stem}.yaml")
    assert spec.data.dataset == "imagefolder" and not (ROOT / spec.data.root).exists()
    assert spec.student.pretrained
    compiled = compile_spec(spec, allow_missing_weights=True)  # as `kdgraph plan` does
    expected = [f"data.root {spec.data.root}"]
    if spec.teacher is not None:  # step 2 names step 1's output, which does not exist here
        assert str(spec.teacher.checkpoint) == "runs/my-teacher/student.safetensors"
        expected.insert(0, "teacher.checkpoint runs/my-teacher/student.safetensors")
    assert list(compiled.missing_weights) == expected
    assert compiled.num_classes == 5
    assert compiled.plan.k == spec.decompose.blocks
    assert any("fresh one for 5 classes" in n for n in compiled.notes)


# --- evaluation ---------------------------------------------------------------------------------

def test_metrics_summary_and_eval_report_top5(supervised_run):
    import json

    from kdgraph.runtime.commands import evaluate_spec

    out, raw, summary = supervised_run
    assert 0 <= summary["student_top1"] <= summary["student_top5"] <= 100
    assert json.loads((out / "summary.json").read_text())["student_top5"] == summary["student_top5"]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[-1]["student_top5"] == summary["student_top5"]
    test = evaluate_spec(load_spec(raw))
    assert test["split"] == "test" and test["student_top1"] == pytest.approx(summary["student_top1"])
    assert test["student_top5"] == pytest.approx(summary["student_top5"])
    train = evaluate_spec(load_spec(raw), split="train")
    assert train["split"] == "train" and train["samples"] != test["samples"]
    assert train["student_top1"] <= train["student_top5"]


def test_eval_cli_reports_top5_on_the_chosen_split(tmp_path, supervised_run):
    import json

    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    from _runtime_helpers import write_spec

    out, raw, summary = supervised_run
    spec = write_spec(raw, tmp_path / "spec.yaml")
    res = CliRunner().invoke(app, ["eval", str(spec), "--split", "train", "--format", "json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["split"] == "train" and {"student_top1", "student_top5", "samples"} <= set(result)
    res = CliRunner().invoke(app, ["eval", str(spec)])
    assert res.exit_code == 0, res.output
    assert f"student_top5: {summary['student_top5']:.2f}%" in res.output and "split: test" in res.output
