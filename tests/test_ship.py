"""Students a user can ship: `kdgraph export` writes timm's folder layout; plain timm (in a
process that never imports kdgraph) loads it and, with the preprocessing recorded in
config.json, gives the logits kdgraph's own student gives. Adapters fold into the
student's own layers where the algebra allows; elsewhere the export is a torch.export
program. Also: eval/export need no teacher and read formats from content, not suffixes;
plan works before the teacher's weights exist; --version and python -m kdgraph."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.commands import export_spec
from kdgraph.runtime.export import file_format, folded_maps, load_student
from kdgraph.runtime.ship import fold_into_student, ship_student
from kdgraph.spec import load_spec

from _runtime_helpers import ROOT, randomise_bn, run_cli, tiny_spec, train_here, write_spec


def _tiny_resnet(widths):
    return {"num_classes": 10, "in_chans": 1, "channels": widths, "stem_width": widths[0]}


def bottleneck_spec(out, method="stablekd", **kw):
    """timm resnet26 (bottleneck blocks, a 1x1 projection shortcut opening every stage) at
    half the teacher's widths: every cut needs an adapter, and every one can fold."""
    kw.setdefault("decompose", {"adapters": "in_path"})  # the adapters and their fold are the subject
    spec = tiny_spec(out, method, blocks=5, student="timm:resnet26", data={"input_size": [1, 32, 32]}, **kw)
    spec["student"]["kwargs"] = _tiny_resnet([8, 16, 32, 64])
    spec["teacher"] = {"model": "timm:resnet26", "kwargs": _tiny_resnet([16, 32, 64, 128])}
    return spec


def test_adapters_fold_into_the_bottleneck_students_own_layers(tmp_path):
    import timm

    compiled = compile_spec(load_spec(bottleneck_spec(tmp_path / "run")))
    d = Distiller(compiled)
    assert d.adapters_in_inference and sorted(d.adapters) == ["1", "2", "3", "4"]
    randomise_bn(d, 0)  # the adapters' BN too: folding must use running statistics
    d.eval()
    folded = fold_into_student(compiled, folded_maps(d))
    assert folded.reason is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = timm.create_model("resnet26", **_tiny_resnet([8, 16, 32, 64])).eval()
    plain.load_state_dict(folded.model.state_dict())  # strict: exactly the architecture's keys
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref = d.inference(x)
        assert torch.allclose(plain(x), ref, atol=1e-5, rtol=1e-4)
        # the fold changed weights: the unfolded student computes something else
        assert not torch.allclose(compiled.student.model.eval()(x), ref, atol=1e-3)


def test_an_adapter_before_a_padded_conv_does_not_fold_and_says_why(tmp_path):
    compiled = compile_spec(load_spec(tiny_spec(tmp_path / "run", "stablekd", decompose={"adapters": "in_path"})))
    d = Distiller(compiled).eval()
    folded = fold_into_student(compiled, folded_maps(d))
    assert folded.model is None
    assert "3x3 convolution with padding" in folded.reason and "conv1" in folded.reason


def test_unfoldable_student_ships_as_a_torch_export_program(tmp_path):
    compiled = compile_spec(load_spec(tiny_spec(tmp_path / "run", "stablekd", decompose={"adapters": "in_path"})))
    d = Distiller(compiled)
    randomise_bn(d, 1)
    d.eval()
    pre = {"input_size": [1, 8, 8], "mean": [0.3], "std": [0.4]}
    result = ship_student(compiled, folded_maps(d), tmp_path / "ship", pre, {"top1": 12.5})
    assert result["format"] == "torch.export"
    files = sorted(p.name for p in (tmp_path / "ship").iterdir())
    assert files == ["README.md", "config.json", "model.pt2"]
    assert "3x3 convolution" in (tmp_path / "ship" / "README.md").read_text()
    x = torch.randn(6, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            f"m = torch.export.load({str(tmp_path / 'ship' / 'model.pt2')!r}).module()\n"
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
            "assert not any(k.startswith('kdgraph') for k in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_no_kdgraph_env(), timeout=300)
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), d.inference(x), atol=1e-5, rtol=1e-4)
        # kdgraph's own loader checks the archive before torch.export.load runs it: ours passes
        assert torch.allclose(load_student(compiled, tmp_path / "ship")(x), d.inference(x), atol=1e-5, rtol=1e-4)


def _no_kdgraph_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_plain_timm_loads_the_export_and_matches_kdgraph_with_the_recorded_preprocessing(tmp_path):
    """End to end: train, export, load with timm's local-dir: in a process without kdgraph,
    normalise raw pixels with config.json's mean/std, compare with kdgraph's logits."""
    from kdgraph.data import create_dataset

    spec = load_spec(write_spec(bottleneck_spec(tmp_path / "run", epochs=3, fraction=0.1), tmp_path / "s.yaml"))
    summary = train_here(spec)
    assert (tmp_path / "run" / "best.safetensors").is_file()
    result = export_spec(spec, tmp_path / "ship")
    assert result["format"] == "state_dict"
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ship" / "config.json").read_text())
    assert config["architecture"] == "resnet26" and config["num_classes"] == 10
    assert config["model_args"] == {k: v for k, v in _tiny_resnet([8, 16, 32, 64]).items() if k != "num_classes"}
    assert f"{summary['student_top1']:.2f} %" in (tmp_path / "ship" / "README.md").read_text()

    ds = create_dataset(spec.data, spec.seed)
    pixels = ds.test_x[:64].float() / ds.pixel_max  # what a user has: pixels in [0, 1]
    torch.save(pixels, tmp_path / "pixels.pt")
    compiled = compile_spec(spec)
    ours = load_student(compiled, tmp_path / "run" / "student.safetensors").eval()
    with torch.no_grad():
        expected = ours(ds.normalize(ds.test_x[:64]))
    code = f"""
import sys, warnings, torch, timm
warnings.simplefilter("ignore")
model = timm.create_model("local-dir:{tmp_path / 'ship'}", pretrained=True).eval()
cfg = timm.data.resolve_data_config(model=model)
x = torch.load("{tmp_path / 'pixels.pt'}")
x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
assert tuple(cfg["input_size"]) == tuple(x.shape[1:]), cfg
with torch.no_grad():
    torch.save(model(x), "{tmp_path / 'logits.pt'}")
assert not any(k.startswith("kdgraph") for k in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_no_kdgraph_env(), timeout=300)
    got = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()

    # eval scores every format the same, read from content (a .pt holding safetensors), teacher-free
    (tmp_path / "student.pt").write_bytes((tmp_path / "run" / "student.safetensors").read_bytes())
    assert file_format(tmp_path / "student.pt") == "safetensors"
    assert file_format(tmp_path / "run" / "checkpoints" / "last.pt") == "torch"
    assert file_format(tmp_path / "ship") == "export"
    spec_file = write_spec(bottleneck_spec(tmp_path / "run", epochs=3, fraction=0.1)
                           | {"teacher": {"model": "timm:resnet26", "kwargs": _tiny_resnet([16, 32, 64, 128]),
                                          "checkpoint": str(tmp_path / "absent.safetensors")}},
                           tmp_path / "s2.yaml")
    scores = set()
    for ckpt in ("ship", "student.pt", "run/checkpoints/last.pt"):
        proc = run_cli("eval", str(spec_file), "--checkpoint", str(tmp_path / ckpt), "--format", "json")
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        assert "teacher_top1" not in res  # its weights are absent: the student is scored anyway
        scores.add(round(res["student_top1"], 6))
    assert scores == {round(summary["student_top1"], 6)}


def test_training_outputs_best_and_final_timestamps_and_file_modes(tmp_path):
    spec = load_spec(tiny_spec(tmp_path / "run", "kd", epochs=2, fraction=0.1))
    old = os.umask(0o022)
    try:
        summary = train_here(spec)
    finally:
        os.umask(old)
    out = tmp_path / "run"
    for name in ("student.safetensors", "best.safetensors", "summary.json", "metrics.jsonl",
                 "checkpoints/last.pt", "run.json", "plan.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert summary["best_top1"] >= summary["student_top1"]
    assert summary["best_epoch"] in (1, 2)
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert max(r["student_top1"] for r in epochs) == summary["best_top1"]
    assert all("time" in r and r["time"].endswith("+00:00") for r in epochs)
    pre = summary["preprocessing"]
    assert pre["input_size"] == [1, 8, 8]
    from kdgraph.data import create_dataset

    raw = create_dataset(spec.data, spec.seed)
    assert pre["mean"] == pytest.approx([raw.mean[0] / 16]) and pre["std"] == pytest.approx([raw.std[0] / 16])
    assert 0 < pre["mean"][0] < 1 and 0 < pre["std"][0] < 1
    best = load_file(str(out / "best.safetensors"))
    assert best.keys() == load_file(str(out / "student.safetensors")).keys()


def test_plan_needs_no_weights_file_and_says_so(tmp_path):
    spec = tiny_spec(tmp_path / "run", "stablekd", teacher_checkpoint=tmp_path / "not-yet.safetensors")
    proc = run_cli("plan", str(write_spec(spec, tmp_path / "s.yaml")))
    assert proc.returncode == 0, proc.stderr
    assert "warning: teacher.checkpoint" in proc.stderr and "not-yet.safetensors" in proc.stderr
    train = run_cli("train", str(tmp_path / "s.yaml"))
    assert train.returncode == 2 and "not-yet.safetensors" in train.stderr


def test_version_and_python_dash_m():
    from kdgraph import __version__

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    version = subprocess.run([sys.executable, "-m", "kdgraph", "--version"], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith(f"kdgraph {__version__} (torch ")
    helptext = subprocess.run([sys.executable, "-m", "kdgraph", "--help"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
    assert helptext.returncode == 0 and "Usage: kdgraph" in helptext.stdout
    for command in ("plan", "train", "eval", "export"):
        assert command in helptext.stdout


def test_tensorboard_logging_carries_what_metrics_jsonl_says(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = load_spec(tiny_spec(tmp_path / "run", "kd", epochs=2, fraction=0.1, runtime={"log": "tensorboard"}))
    train_here(spec)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    board = acc.Scalars("epoch/student_top1")
    assert [e.step for e in board] == [r["global_step"] for r in epochs]
    assert [e.value for e in board] == pytest.approx([r["student_top1"] for r in epochs])
    steps = [r for r in records if r["kind"] == "step"]
    assert [e.value for e in acc.Scalars("step/lr")] == pytest.approx([r["lr"] for r in steps])
    assert "step/kl" in acc.Tags()["scalars"]


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated-safetensors", "folder-without-model"])
def test_unreadable_students_give_one_clear_error(tmp_path, case):
    from safetensors.torch import save_file

    from kdgraph.errors import KDGraphError

    compiled = compile_spec(load_spec(tiny_spec(tmp_path / "run", "kd")))
    path = tmp_path / "student.safetensors"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"garbage" * 10)
    elif case == "truncated-safetensors":
        save_file({k: v.contiguous() for k, v in compiled.student.model.state_dict().items()}, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path = tmp_path / "ship"
        path.mkdir()
        (path / "config.json").write_text("{}")
    expected = {"empty": "the file is empty", "garbage": "not a safetensors or torch file",
                "truncated-safetensors": "truncated or corrupt", "folder-without-model": "not a kdgraph export"}
    with pytest.raises(KDGraphError, match=expected[case]) as info:
        load_student(compiled, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


_PREPROCESSING = {"input_size": [1, 8, 8], "mean": [0.3], "std": [0.4]}


def test_an_export_over_an_earlier_diffusers_export_leaves_none_of_its_files(tmp_path):
    """The reverse of tests/test_diffusers.py's case: timm's layout over diffusers' drops the old
    diffusion_pytorch_model.safetensors, and keeps another tool's file."""
    compiled = compile_spec(load_spec(tiny_spec(tmp_path / "run", "kd")))
    folder = tmp_path / "ship"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "_kdgraph": {"x": 1}}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"old weights")
    (folder / "notes.txt").write_text("mine")
    result = ship_student(compiled, {}, folder, _PREPROCESSING, {"top1": 12.5})
    assert result["format"] == "state_dict"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


def test_an_export_killed_midway_leaves_a_folder_the_rerun_writes_over(tmp_path, monkeypatch):
    """A kill while the weights were written left model.safetensors without config.json, and the
    rerun refused the folder as "not a kdgraph export"."""
    import safetensors.torch

    from kdgraph.runtime.ship import check_destination

    compiled = compile_spec(load_spec(tiny_spec(tmp_path / "run", "kd")))
    folder = tmp_path / "ship"
    real = safetensors.torch.save_file

    def killed(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the signal arrives mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        ship_student(compiled, {}, folder, _PREPROCESSING, {"top1": 12.5})
    assert (folder / "model.safetensors").read_bytes() == b"half a file" and not (folder / "config.json").exists()
    assert check_destination(folder) == folder
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert ship_student(compiled, {}, folder, _PREPROCESSING, {"top1": 12.5})["format"] == "state_dict"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (folder / "config.json").unlink()  # a user's folder of that shape is still refused
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a kdgraph export"):
        check_destination(folder)
