"""diffusers' folder layout (``save_pretrained``'s): how a ``diffusers:`` denoiser ships
(``ship_diffusers``), and how such a folder is read back as the spec's student
(``diffusers_state``; ``DIFFUSERS``, the denoise task's ``FolderLayout``).

``ship_diffusers`` writes the U-Net's ``config.json`` (its config, with a ``_kdgraph`` block
that diffusers ignores) and ``diffusion_pytorch_model.safetensors``;
``UNet2DModel.from_pretrained(OUT)`` loads it without kdgraph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdgraph.errors import KDGraphError
from kdgraph.runtime.ship import (CONFIG, INCOMPLETE, ExportError, FolderLayout, _begin_export, _write_text,
                                  check_destination, clear_earlier_export)
from kdgraph.tasks.denoise.diffusers_source import DiffusersUNet
from kdgraph.weights import read_weights_file

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Compiled

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@torch.no_grad()
def ship_diffusers(model: nn.Module, folder: Path, card: dict[str, Any], *, atol: float = 1e-5) -> dict[str, Any]:
    """Write ``model.unet`` (a trained ``DiffusersUNet``) with diffusers' ``save_pretrained`` to
    ``folder``, read it back with ``from_pretrained`` and check its prediction against
    ``model``'s on a fixed batch. Returns {"folder", "format": "diffusers", "reason"}."""
    folder = _begin_export(check_destination(folder))
    clear_earlier_export(folder)
    unet = model.unet
    unet.save_pretrained(str(folder), safe_serialization=True)
    config_file = folder / CONFIG
    config = json.loads(config_file.read_text())
    config["_kdgraph"] = {k: v for k, v in card.items() if v is not None}  # keys with "_" diffusers skips
    _write_text(config_file, json.dumps(config, indent=2) + "\n")
    back = type(unet).from_pretrained(str(folder), low_cpu_mem_usage=False).eval()  # no "accelerate not found"
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    x = torch.randn(2, unet.config.in_channels, *size, generator=g)
    t = torch.tensor([1, 500])
    y = torch.tensor([0, 1]) if unet.config.num_class_embeds else None
    dtype = next(unet.parameters()).dtype
    expected = model(x.to(dtype), t, y).float()
    got = back(x.to(dtype), t, class_labels=y).sample.float()
    if not torch.allclose(got, expected, atol=atol, rtol=1e-4):
        raise ExportError(f"the diffusers export in {folder} does not reproduce the student "
                          f"(max |diff| {float((got - expected).abs().max()):.3g})")
    (folder / INCOMPLETE).unlink()
    return {"folder": str(folder), "format": "diffusers", "reason": f"{type(unet).__name__}.save_pretrained"}


def diffusers_state(compiled: Compiled, path: Path) -> dict[str, torch.Tensor]:
    """The weights of a diffusers export folder (``save_pretrained``'s) as the state_dict of the
    spec's ``diffusers:`` student (the U-Net's under ``unet.``), once its config.json is found
    to describe that U-Net: a U-Net of other shapes fails to load, one of other settings
    (activation, norm eps, ...) would load and compute something else."""
    model = compiled.student.model
    if not isinstance(model, DiffusersUNet):
        raise KDGraphError(f"{path} is a diffusers export (config.json, {DIFFUSERS_WEIGHTS}); this spec's "
                           f"student is {compiled.run.student.model}: a diffusers export is evaluated with the "
                           "spec of the diffusers: student it was exported from")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KDGraphError(f"cannot read {path / CONFIG}: {str(exc).splitlines()[0]}") from None
    mine = json.loads(model.unet.to_json_string())  # as save_pretrained writes it
    if not isinstance(config, dict) or config.get("_class_name") != mine["_class_name"]:
        got = config.get("_class_name") if isinstance(config, dict) else None
        raise KDGraphError(f"{path} holds a diffusers {got or 'model of no _class_name'}; this spec's student is a "
                           f"{mine['_class_name']}")
    differ = [f"{k}: {config[k]!r}, the spec's {mine[k]!r}" for k in sorted(config.keys() & mine.keys())
              if not k.startswith("_") and config[k] != mine[k]]
    if differ:
        raise KDGraphError(f"{path} does not fit the student of this spec: its {CONFIG} differs in "
                           f"{'; '.join(differ)}; give the spec it was exported from")
    return {f"unet.{k}": v for k, v in read_weights_file(path / DIFFUSERS_WEIGHTS).items()}


DIFFUSERS = FolderLayout("diffusers", (CONFIG, DIFFUSERS_WEIGHTS),
                         f"a diffusers export: {CONFIG} and {DIFFUSERS_WEIGHTS}", diffusers_state)
