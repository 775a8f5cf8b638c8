"""Export and evaluation of the trained student.

Without adapters the export is the student's own state_dict: ``timm.create_model(name,
**kwargs).load_state_dict`` takes it without kdgraph. With adapters, each lift/lower pair
is folded into one exact Cs -> Cs 1x1 conv (or Linear) and the file holds the student's
weights under ``model.`` and the folded maps under ``folded.``; cross-architecture (format,
CAP) adapters resample, so they are kept whole there. ``kdgraph eval`` rebuilds that
module from the spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import build_adapters, fold
from ..compiler import Compiled, compile_spec
from ..stream import build_data
from ..errors import KDGraphError
from ..spec import Spec
from . import checkpoint as ckpt
from .evaluate import top1


class ExportedStudent(nn.Module):
    """The student's segments with folded adapters between them (parameters shared with ``model``)."""

    def __init__(self, compiled: Compiled, folded: dict[int, nn.Module]):
        super().__init__()
        self.model = compiled.student.model
        self.folded = nn.ModuleDict({str(i): m for i, m in folded.items()})
        self._segments = list(compiled.student.segments())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for seg in self._segments:  # their copied constants are not submodules of self
            seg._apply(fn, recurse)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, seg in enumerate(self._segments, start=1):
            x = seg(x)
            if str(i) in self.folded:
                x = self.folded[str(i)](x)
        return x


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def export_student(distiller, compiled: Compiled, path: Path) -> Path:
    """Write the inference student to ``path`` (.safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kdgraph": "1", "spec_name": compiled.spec.name, "student": compiled.spec.student.model}
    if not distiller.adapted_chain:
        save_file(_contiguous(compiled.student.model.state_dict()), str(path), metadata={**meta, "format": "plain"})
        return path
    folded = {int(i): fold(pair.eval()) for i, pair in distiller.adapters.items()}
    module = ExportedStudent(compiled, folded)
    meta["folded"] = json.dumps({i: [_width(m), type(m).__name__] for i, m in folded.items()})
    save_file(_contiguous(module.state_dict()), str(path), metadata={**meta, "format": "folded"})
    return path


def _width(m: nn.Module) -> int | None:
    """Channels of a folded map; None for an adapter pair kept whole (format, CAP)."""
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels if isinstance(m, nn.Conv2d) else None


def load_student(compiled: Compiled, path: Path) -> nn.Module:
    """The exported student of ``compiled`` with the weights of ``path`` (.safetensors or a training .pt)."""
    path = Path(path)
    if not path.exists():
        raise KDGraphError(f"no trained student at {path}; run `kdgraph train` first or pass --checkpoint")
    if path.suffix != ".safetensors":
        from .distiller import Distiller

        distiller = Distiller(compiled)
        distiller.load_state_dict(ckpt.load(path)["model"])
        return _Inference(distiller)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    if meta.get("format") == "folded":
        folded = {}
        pairs = build_adapters(compiled.pairing)
        for i, (width, kind) in json.loads(meta["folded"]).items():
            if kind == "AdapterPair":
                folded[int(i)] = pairs[i]
            else:
                folded[int(i)] = nn.Conv2d(width, width, 1) if kind == "Conv2d" else nn.Linear(width, width)
        module = ExportedStudent(compiled, folded)
    else:
        module = compiled.student.model
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise KDGraphError(f"{path} does not fit the student of this spec: {str(exc).splitlines()[0]}") from exc
    return module


class _Inference(nn.Module):
    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, x):
        return self.distiller.inference(x)


def evaluate_spec(spec: Spec, checkpoint: Path | None = None) -> dict:
    """Top-1 of the trained student (and of the teacher) on the spec's test split, on the CPU or GPU."""
    from .techniques import DistInfo, resolve_device

    device = resolve_device(spec.runtime.device, DistInfo())
    compiled = compile_spec(spec)
    student = load_student(compiled, checkpoint or spec.output_dir / "student.safetensors").to(device).eval()
    data = build_data(spec, compiled.data, device, DistInfo())  # the loader and normalisation training used
    loader = data.test
    result = {"student_top1": top1(student, loader, device, spec.runtime.precision)}
    if compiled.teacher is not None:
        teacher = compiled.teacher.model.to(device).eval()
        result["teacher_top1"] = top1(teacher, loader, device, spec.runtime.precision)
    result["test_samples"] = data.test_samples()
    return result


def export_spec(spec: Spec, to: Path, checkpoint: Path | None = None) -> Path:
    """Export the student of a training checkpoint (default OUTPUT/checkpoints/last.pt)."""
    from .distiller import Distiller

    compiled = compile_spec(spec)
    distiller = Distiller(compiled)
    distiller.load_state_dict(ckpt.load(checkpoint or spec.output_dir / "checkpoints" / "last.pt")["model"])
    return export_student(distiller.eval(), compiled, to)
