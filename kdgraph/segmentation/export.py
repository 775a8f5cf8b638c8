"""Export of a segmentation student that plain torchvision loads: torchvision's own state dict and
the constructor call that builds the model it fits.

An export folder holds::

    model.safetensors   the torchvision model's state dict (its own keys: ``backbone.…``,
                        ``classifier.…``), float tensors as trained
    constructor.json    {"library": "torchvision", "name": NAME, "kwargs": {...},
                         "written_by": "kdgraph", "torchvision": VERSION}

Loading it needs torch, torchvision and safetensors only::

    ctor = json.load(open("constructor.json"))
    model = torchvision.models.get_model(ctor["name"], weights=None, **ctor["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

The model's forward then returns torchvision's dict (``out`` upsampled to the input's size).
Files already in the folder are never overwritten unless kdgraph wrote them (a constructor.json
that says so, or the marker ``.kdgraph-export-incomplete`` an export writes first and removes last,
so that a killed export's folder is written over by the rerun).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdgraph.errors import KDGraphError
from kdgraph.segmentation.models import SegmentationModel

__all__ = ["CONSTRUCTOR", "WEIGHTS", "export_torchvision", "torchvision_state_dict"]

WEIGHTS = "model.safetensors"
CONSTRUCTOR = "constructor.json"
PREFIX = "net."


def torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``SegmentationModel`` state dict as torchvision's own: every key under ``net.``, the prefix
    dropped; any other key (an adapter left in the student's path) is refused."""
    others = [k for k in state if not k.startswith(PREFIX)]
    if others:
        raise KDGraphError(f"the student's state holds {len(others)} entries outside its torchvision model "
                           f"(e.g. {others[0]!r}); export the plain student")
    return {k[len(PREFIX):]: v.detach().cpu().contiguous() for k, v in state.items()}


def _check_writable(folder: Path) -> None:
    from kdgraph.paths import INCOMPLETE

    existing = [p for p in (folder / WEIGHTS, folder / CONSTRUCTOR) if p.exists()]
    if not existing or (folder / INCOMPLETE).is_file():  # none, or an export killed before it finished
        return
    try:
        ours = json.loads((folder / CONSTRUCTOR).read_text()).get("written_by") == "kdgraph"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ours = False
    if not ours:
        raise KDGraphError(f"{existing[0]} exists and kdgraph did not write it; export to another folder")


def export_torchvision(model: SegmentationModel, folder: Path | str) -> Path:
    """Write ``model``'s torchvision state dict and constructor to ``folder``; returns the folder."""
    import torchvision
    from safetensors.torch import save_file

    if not isinstance(model, SegmentationModel):
        raise KDGraphError(f"a torchvision segmentation export needs a SegmentationModel, got {type(model).__name__}")
    if any(t.is_meta for t in model.state_dict().values()):
        raise KDGraphError("the student's weights are on the meta device (a plan, not a trained model)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KDGraphError(f"{folder} is a file; the export is a folder")
    folder.mkdir(parents=True, exist_ok=True)
    _check_writable(folder)
    name, kwargs = model.constructor
    state = torchvision_state_dict(model.state_dict())
    record = {"library": "torchvision", "name": name, "kwargs": kwargs, "written_by": "kdgraph",
              "torchvision": torchvision.__version__}
    from kdgraph.paths import INCOMPLETE

    (folder / INCOMPLETE).write_text("kdgraph export was writing this folder; run it again\n")  # first
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONSTRUCTOR).write_text(json.dumps(record, indent=2) + "\n")
    (folder / INCOMPLETE).unlink()  # last: until here a rerun writes over the folder
    return folder
