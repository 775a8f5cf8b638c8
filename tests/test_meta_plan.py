"""Planning on the meta device (issue 16): `kdgraph plan` builds no weights, reads no tensor data.

The truth every meta plan is checked against is the same spec compiled with real, initialised
weights: the JSON contract, the table text, DOT and Mermaid must be identical for every shipped
spec. Checkpoints are checked from their headers with the same errors and notes as a real load;
a teacher with a checkpoint is built on meta and takes the file's tensors over, and must compute
what a teacher built and loaded the old way computes.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from kdgraph.compiler import blockgraph
from kdgraph.compiler import compile_spec
from kdgraph.errors import ModelError
from kdgraph.models import MODEL_SOURCES, build_model, holds_meta
from kdgraph.render import plan_view
from kdgraph.spec import ModelSpec, load_spec
from kdgraph.weights import read_state_dict

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
TIMM = "resnet10t"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # checkpoint paths in specs are relative to the repo root


def _heavy(path: Path) -> bool:
    import yaml

    size = (yaml.safe_load(path.read_text()).get("data") or {}).get("input_size") or [0, 0, 0]
    return size[-1] >= 128


def _outputs(c) -> dict:
    """Everything `kdgraph plan` can print, timings aside (they are measurements)."""
    d = c.to_dict()
    d.pop("timings_s")
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(plan_view(c))
    return {"json": d, "table": console.file.getvalue(), "dot": blockgraph.to_dot(c.graph, c.run.name),
            "mermaid": blockgraph.to_mermaid(c.graph)}


# torch.export of a transformers decoder names some nodes differently on meta and real weights
# (the attention output's .contiguous() is traced only on meta, one extra node per layer), so for
# causal-LM specs the node names lose their numeric suffix and the cuts their graph index; every
# cut's order, module, shape, layout, level, the stages, pairs and blocks are still compared.
# A plan on meta exports a static batch (kdgraph.compiler.exported: its graphs never run), where
# the head's full slice `hidden[:, -0:]` is an `alias` node; the real trace's symbolic batch keeps
# it a `slice`: the same cut, named by its op.
FX_SUFFIX = re.compile(r"\b([A-Za-z]\w*?)_\d+\b")


def _without_node_numbers(value):
    if isinstance(value, str):
        return FX_SUFFIX.sub(r"\1_N", value)
    if isinstance(value, dict):
        return {k: _without_node_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_node_numbers(v) for v in value]
    return value


def _comparable(outputs: dict, task: str) -> dict:
    if task != "causal_lm":
        return outputs
    out = _without_node_numbers(outputs)
    for role in ("teacher", "student"):
        for cut in (out["json"].get(role) or {}).get("cuts", []):
            cut.pop("index")
            cut["node"] = "slice_N" if cut["node"] == "alias" else cut["node"]
    return out


def _spec_params():
    for p in SPECS:
        yield pytest.param(p, marks=[pytest.mark.slow] if _heavy(p) else [], id=p.stem)


@pytest.mark.parametrize("path", list(_spec_params()))
def test_meta_plan_matches_real_weights(path):
    spec = load_spec(path)
    meta = compile_spec(spec, allow_missing_weights=True, materialize=False)
    real = compile_spec(spec, allow_missing_weights=True)
    for art in (meta.teacher, meta.student):
        if art is not None:
            assert all(p.is_meta for p in art.model.parameters()), f"{art.role} holds real weights"
    assert not holds_meta(real.student.model)
    assert _comparable(_outputs(meta), spec.task) == _comparable(_outputs(real), spec.task)


def _mini_spec(tmp_path: Path, teacher_ckpt: Path | None = None, student_ckpt: Path | None = None,
               teacher: str = TIMM, student: str = "resnet18", classes: int = 10) -> dict:
    raw = {"name": "m", "teacher": {"model": f"timm:{teacher}", "kwargs": {"num_classes": classes}},
           "student": {"model": f"timm:{student}", "kwargs": {"num_classes": classes}},
           "data": {"dataset": "synthetic", "input_size": [3, 32, 32], "num_classes": classes},
           "decompose": {"blocks": 3}, "schedule": {"method": "kd", "epochs": 1}}
    if teacher_ckpt:
        raw["teacher"]["checkpoint"] = str(teacher_ckpt)
    if student_ckpt:
        raw["student"]["checkpoint"] = str(student_ckpt)
    return raw


def _save(state: dict, path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt != "legacy")
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "legacy"])
def test_header_only_shapes_match_the_file(tmp_path, fmt):
    state = timm.create_model(TIMM, num_classes=10).state_dict()
    shapes = read_state_dict(_save(state, tmp_path / "w.bin", fmt), data="none")
    assert {k: (tuple(v.shape), v.dtype) for k, v in shapes.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    assert all(v.is_meta for v in shapes.values())


def test_plan_reads_no_tensor_data(tmp_path, monkeypatch):
    import safetensors.torch

    teacher = _save(timm.create_model(TIMM, num_classes=10).state_dict(), tmp_path / "t.safetensors", "safetensors")
    student = _save({"model": timm.create_model("resnet18", num_classes=10).state_dict()}, tmp_path / "s.pt", "torch")
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("plan read tensor data"))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("mmap")) or real_load(*a, **k))
    c = compile_spec(load_spec(_mini_spec(tmp_path, teacher, student)), materialize=False)
    assert loads == [True]  # the torch file mapped, its storages never read
    assert c.plan.k == 3 and all(p.is_meta for p in c.teacher.model.parameters())


def _error(fn) -> str:
    with pytest.raises(ModelError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_mis_fitting_checkpoints_give_the_same_errors_from_headers(tmp_path, fmt):
    state = timm.create_model(TIMM, num_classes=10).state_dict()
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(10, 7)
    state = {f"module.{k}": v for k, v in state.items()}  # prefixes are stripped on shapes too
    path = _save(state, tmp_path / "t.bin", fmt)
    spec = load_spec(_mini_spec(tmp_path, teacher_ckpt=path))
    planned = _error(lambda: compile_spec(spec, materialize=False))
    loaded = _error(lambda: compile_spec(spec))
    assert planned == loaded
    assert "missing keys (1): conv1.0.weight" in planned and "unexpected keys (1): extra.weight" in planned
    assert "fc.weight: checkpoint (10, 7) vs model (10, 512)" in planned


def test_teacher_for_other_classes_is_refused_from_the_header(tmp_path):
    path = _save(timm.create_model(TIMM, num_classes=1000).state_dict(), tmp_path / "t.safetensors", "safetensors")
    spec = load_spec(_mini_spec(tmp_path, teacher_ckpt=path))
    planned = _error(lambda: compile_spec(spec, materialize=False))
    assert planned == _error(lambda: compile_spec(spec)) and "trained for 1000 classes" in planned


def test_student_fresh_head_note_from_the_header(tmp_path):
    path = _save(timm.create_model("resnet18", num_classes=1000).state_dict(), tmp_path / "s.pt", "torch")
    spec = load_spec(_mini_spec(tmp_path, student_ckpt=path))
    planned, loaded = compile_spec(spec, materialize=False), compile_spec(spec)
    assert planned.notes == loaded.notes and "fc.weight, fc.bias freshly initialised" in planned.notes[0]
    assert _outputs(planned) == _outputs(loaded)


# --- training: the teacher built on meta takes the file's tensors over ---------------------------

SWIN = ("swin_tiny_patch4_window7_224", {"num_classes": 10, "img_size": 32, "window_size": 2, "embed_dim": 24,
                                         "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)})


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "legacy", "fp16"])
def test_teacher_from_checkpoint_computes_what_a_loaded_teacher_computes(tmp_path, fmt):
    """Swin: relative position indices and attention masks are non-persistent buffers, which no
    state dict restores; they must be the constructor's own."""
    name, kwargs = SWIN
    torch.manual_seed(0)
    truth = timm.create_model(name, **kwargs).eval()
    state = truth.state_dict()
    if fmt == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = _save(state, tmp_path / "t.ckpt", "torch" if fmt == "fp16" else fmt)
    teacher = build_model(ModelSpec(model=f"timm:{name}", kwargs=kwargs, checkpoint=path), role="teacher").eval()
    assert not holds_meta(teacher)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    reference = truth
    if fmt == "fp16":  # the old way: a real build with the half-precision values copied in
        reference = timm.create_model(name, **kwargs).eval()
        reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x))
    for (k, a), b in zip(teacher.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), k


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_teacher_takes_the_mapped_file_tensors_over(tmp_path):
    truth = timm.create_model(TIMM, num_classes=10).state_dict()
    path = _save(truth, tmp_path / "t.pt", "torch")
    teacher = build_model(ModelSpec(model=f"timm:{TIMM}", kwargs={"num_classes": 10}, checkpoint=path),
                          role="teacher")
    assert all(torch.equal(v, truth[k]) for k, v in teacher.state_dict().items())
    ranges = _mapped_from(path)
    inside = [n for n, p in teacher.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert inside == [n for n, _ in teacher.named_parameters()]  # no copy: every parameter lives in the file


# --- fallbacks: a factory or a forward that needs tensor values ----------------------------------

class _ReadsItsWeights(nn.Module):
    """Its constructor reads a parameter's value: no meta build."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = float(self.conv.weight.detach().abs().max()) + 1.0
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean((2, 3)))


class _DataDependent(nn.Module):
    """Its forward selects channels by a mask's values: no fake or meta shape propagation."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.keep = nn.Parameter(torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1]), requires_grad=False)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x[:, self.keep.nonzero().squeeze(1)].mean((2, 3)))


@pytest.mark.parametrize("cls, note", [(_ReadsItsWeights, "built with real weights for planning"),
                                       (_DataDependent, "planned with real weights")])
def test_models_that_need_values_fall_back_to_a_real_build(request, tmp_path, cls, note):
    MODEL_SOURCES.register("metatest", lambda name, kwargs: cls(**kwargs))
    request.addfinalizer(lambda: MODEL_SOURCES.unregister("metatest"))
    raw = _mini_spec(tmp_path)
    raw["student"] = {"model": "metatest:x", "kwargs": {"num_classes": 10}}
    raw["decompose"] = {"blocks": 2}
    spec = load_spec(raw)
    planned, real = compile_spec(spec, materialize=False), compile_spec(spec)
    assert not holds_meta(planned.student.model)
    assert [n for n in planned.notes if note in n and n.startswith("student metatest:x")]
    out = _outputs(planned)
    out["json"].pop("notes")
    expected = _outputs(real)
    expected["json"].pop("notes")
    assert {k: v for k, v in out.items() if k != "table"} == {k: v for k, v in expected.items() if k != "table"}


# --- the whole process: a billion-parameter teacher in bounded memory -----------------------------

@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_plan_of_a_giant_teacher_allocates_no_weights(tmp_path):
    import yaml

    raw = _mini_spec(tmp_path, teacher="vit_giant_patch14_224", student="resnet50")
    raw["data"]["input_size"] = [3, 224, 224]
    spec = tmp_path / "giant.yaml"
    spec.write_text(yaml.safe_dump(raw))
    # VmHWM, this process image's own peak: ru_maxrss would carry over the pytest parent's from fork.
    code = ("import runpy, sys; sys.argv = ['kdgraph', 'plan', sys.argv[1], '--format', 'json'];\n"
            "try: runpy.run_module('kdgraph', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(hwm, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
    assert '"adapters_in_use"' in proc.stdout
    assert peak_mb < 2000, f"peak RSS {peak_mb:.0f} MB: the teacher's 1.0B parameters (4 GB) were allocated"
