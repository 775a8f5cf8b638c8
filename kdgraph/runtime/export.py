"""The trained student: kdgraph's own file, loads by content, evaluation and export.

``OUTPUT/student.safetensors`` (written by every run) is the student's own state_dict when
no adapter stays in its inference path; with adapters, each lift/lower pair is folded into
one exact Cs -> Cs map and the file holds the student under ``model.`` and the maps under
``folded.`` (cross-architecture adapters are kept whole). ``kdgraph export`` turns either,
or a training checkpoint, into a folder anyone can load (see ``ship``). Files are told
apart by their content, never their suffix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kdgraph.adapters import TupleMap, build_adapters, fold
from kdgraph.errors import KDGraphError
from kdgraph.paths import path_problem
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.runtime import ship
from kdgraph.runtime.chain import ExportedStudent
from kdgraph.runtime.program import check_program
from kdgraph.weights import read_weights_file, sniff

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled, RunRecord


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def export_student(distiller, compiled: Compiled, path: Path, state: dict | None = None) -> Path:
    """Write the inference student to ``path`` (.safetensors); ``state``: the student's whole
    state_dict where the module holds shards of it (a sharded student's, gathered)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kdgraph": "1", "spec_name": compiled.run.name, "student": compiled.run.student.model}
    if not distiller.adapters_in_inference:
        state = compiled.student.model.state_dict() if state is None else state
        save_file(_contiguous(state), str(path), metadata={**meta, "format": "plain"})
        return path
    folded = folded_maps(distiller)
    module = _exported(compiled, folded)
    meta["folded"] = json.dumps({i: _describe(m) for i, m in folded.items()})
    save_file(_contiguous(module.state_dict()), str(path), metadata={**meta, "format": "folded"})
    return path


def _describe(m: nn.Module) -> list:
    """[width, class name] of a folded map; a multi-tensor cut's TupleMap lists its maps by
    position: [[[position, width, class name], ...], "TupleMap"]."""
    if isinstance(m, TupleMap):
        return [[[int(j), *_describe(part)] for j, part in m.maps.items()], "TupleMap", m.size]
    return [_width(m), type(m).__name__]


def _map_of(width: int, kind: str) -> nn.Module:
    return nn.Conv2d(width, width, 1) if kind == "Conv2d" else nn.Linear(width, width)


def _width(m: nn.Module) -> int | None:
    """Channels of a folded map; None for an adapter pair kept whole (format, CAP)."""
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels if isinstance(m, nn.Conv2d) else None


def file_format(path: Path, given: bool = False, layouts: tuple[ship.FolderLayout, ...] = ()) -> str:
    """What ``path`` holds, read from its content (never its suffix): 'export' (a folder
    written by `kdgraph export` in timm's layout), the name of one of the task's other folder
    ``layouts`` (``Task.layouts()``), 'safetensors', 'torch' (a torch.save zip or pickle).
    ``given``: the user named ``path`` (--checkpoint), so the error suggests nothing else."""
    path = Path(path)
    if (problem := path_problem(path)) is not None:
        raise KDGraphError(f"--checkpoint {str(path)[:200]} {problem}")
    if not path.exists():
        raise KDGraphError(f"no trained student at {path}" + ("" if given else "; run `kdgraph train` first or "
                                                                "pass --checkpoint"))
    if path.is_dir():
        for layout in layouts:  # first: a layout's files may include a model.safetensors of its own keys
            if layout.holds(path):
                return layout.name
        if (path / ship.WEIGHTS).is_file() or (path / ship.PROGRAM).is_file():
            return "export"
        raise KDGraphError(f"{path} is a folder without {ship.WEIGHTS} or {ship.PROGRAM}: not a kdgraph export"
                           + "".join(f" (nor {layout.description})" for layout in layouts))
    return "torch" if sniff(path).startswith("torch") else "safetensors"


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """The tensors (read and checked by ``read_weights_file``) and the metadata of ``path``."""
    state = read_weights_file(path)
    with safe_open(str(path), "pt") as f:
        return state, f.metadata() or {}


def _folded_from_meta(compiled: Compiled, meta: dict) -> dict[int, nn.Module]:
    folded = {}
    pairs = build_adapters(compiled.pairing)
    for i, (width, kind, *rest) in json.loads(meta["folded"]).items():
        if kind == "TupleMap":  # width: [[position, width, kind], ...]; rest: [tensors]
            folded[int(i)] = TupleMap({j: _map_of(w, k) for j, w, k in width}, rest[0])
        elif kind == "AdapterPair":
            folded[int(i)] = pairs[i]
        else:
            folded[int(i)] = _map_of(width, kind)
    return folded


def load_trained(compiled: Compiled, path: Path, layouts: tuple[ship.FolderLayout, ...] = ()
                 ) -> dict[int, nn.Module]:
    """Load the trained student of ``path`` into ``compiled.student.model``; returns the
    folded adapter map after each block that keeps one (empty for a plain student).

    ``path``: a training checkpoint, a kdgraph student .safetensors (plain or folded), an
    export folder holding model.safetensors or, for a ``diffusers:`` student, a diffusers export
    folder; the format is read from the content."""
    path = Path(path)
    kind = file_format(path, layouts=layouts)
    other = {layout.name: layout for layout in layouts}.get(kind)  # a folder of the task's own layout
    if kind == "torch":
        from kdgraph.runtime.distiller import Distiller

        distiller = Distiller(compiled)
        try:
            distiller.load_state_dict(ckpt.load(path)["model"])
        except RuntimeError as exc:
            raise KDGraphError(f"{path} does not fit this spec's student: {str(exc).splitlines()[0]}") from None
        distiller.eval()
        return folded_maps(distiller)
    if kind == "export":
        if not (path / ship.WEIGHTS).is_file():
            raise KDGraphError(f"{path} holds a torch.export program ({ship.PROGRAM}), not weights to train or "
                               "re-export; evaluate it with `kdgraph eval --checkpoint` or load it with torch.export.load")
        state, meta = _read_safetensors(path / ship.WEIGHTS)
        maps, module = {}, compiled.student.model
    elif other is not None:
        state, maps, module = other.read(compiled, path), {}, compiled.student.model
    else:
        state, meta = _read_safetensors(path)
        maps = _folded_from_meta(compiled, meta) if meta.get("format") == "folded" else {}
        module = _exported(compiled, maps) if maps else compiled.student.model
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise KDGraphError(f"{path} does not fit the student of this spec: {str(exc).splitlines()[0]}") from None
    return maps


def _exported(compiled: Compiled, folded: dict[int, nn.Module]) -> ExportedStudent:
    return ExportedStudent.of(compiled, folded)


def folded_maps(distiller) -> dict[int, nn.Module]:
    """The folded map of each adapter pair the distiller's inference program keeps."""
    return {i: fold(distiller.adapters[str(i)].eval()) for i in distiller.adapters_in_inference}


def load_student(compiled: Compiled, path: Path, layouts: tuple[ship.FolderLayout, ...] = ()) -> nn.Module:
    """The trained student of ``path`` as one inference module (any format kdgraph writes)."""
    path = Path(path)
    if file_format(path, layouts=layouts) == "export" and not (path / ship.WEIGHTS).is_file():
        check_program(path / ship.PROGRAM)  # torch.export.load runs what a crafted archive holds
        try:
            program = _ExportedProgram(torch.export.load(str(path / ship.PROGRAM)).module())
        except Exception as exc:  # torch.export's errors name no common base class
            raise KDGraphError(f"cannot load {path / ship.PROGRAM}: {str(exc).splitlines()[0]}") from None
        _check_program_fits(compiled, program, path / ship.PROGRAM)
        return program
    maps = load_trained(compiled, path, layouts)
    return _exported(compiled, maps) if maps else compiled.student.model


def _check_program_fits(compiled: Compiled, program: nn.Module, path: Path) -> None:
    """A program exported from another pair takes another input or predicts another number
    of classes: found on a probe batch of this spec's input size, before any data is read."""
    expected = compiled.num_classes
    try:
        with torch.no_grad():
            out = program(torch.zeros(2, *compiled.input_size))
            try:  # evaluation's batches come in any size (the last one is short): the batch must be dynamic
                program(torch.zeros(3, *compiled.input_size))
            except Exception:  # noqa: BLE001 - a guard on the batch size; torch's errors share no base class
                raise KDGraphError(f"{path} takes a fixed batch size (a batch of 3 fails where 2 works); export "
                                   "it with a dynamic batch dimension (torch.export.Dim on dim 0), as kdgraph "
                                   "export does") from None
        classes = tuple(out.shape[1:2]) if isinstance(out, torch.Tensor) else ()  # (N,) or (N, C, ...): C
        got = classes[0] if classes else None
        problem = None if got is not None and (expected is None or got == expected) else \
            f"it predicts {got if got is not None else 'no'} classes, this spec's student {expected}"
    except KDGraphError:
        raise
    except Exception as exc:  # a guard on the input shape, a shape error inside: no common base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = f"it does not take this spec's input {list(compiled.input_size)} ({first[:200]})"
    if problem is not None:
        raise KDGraphError(f"{path} does not fit the student of this spec: {problem}; give the spec it was "
                           "exported from")


def preprocessing_of(run: RunRecord, data) -> dict:
    """What a user must do to an image before the student sees it: size, mean and std on
    pixels in [0, 1], resize and crop rule; from the run's data (``kdgraph.data.Data``). A streamed
    plan without ``crop_pct`` (an image + mask folder's) resizes the whole image to the input size."""
    streamed = data.plan.loader == "stream"
    crop_pct = data.plan.crop_pct if streamed else 1.0
    h, w = data.plan.input_size[1:]
    resize = (run.data.resize if not streamed else "resize + centre crop" if crop_pct is not None
              else f"resize to {h}x{w} (bilinear, antialiased), no crop")
    return {"input_size": list(data.plan.input_size), "mean": list(data.mean), "std": list(data.std),
            "interpolation": "bilinear", "crop_pct": crop_pct, "resize": resize}


class _ExportedProgram(nn.Module):
    """A torch.export program as a module. It is always in inference mode; an exported
    program refuses train()/eval() calls, so they stop here."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)
