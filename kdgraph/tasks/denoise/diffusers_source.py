"""The ``diffusers:`` model source: a diffusers U-Net built from its config, wrapped as a
kdgraph denoiser ``forward(x, t, y=None) -> ε̂``.

    diffusers:UNet2DModel   kwargs: the model's config (sample_size, block_out_channels, ...)

diffusers' own ``UNet2DModel.forward`` does not trace with torch.fx: it branches on
``torch.is_tensor(timestep)`` (unet_2d.py, "1. time"), which is false for an fx proxy, and
then builds ``torch.tensor([timestep])`` from it. ``DiffusersUNet.forward`` is that forward
with the timestep taken as a (B,) tensor, calling the same submodules in the same order, so
it computes what ``unet(x, t, class_labels=y).sample`` computes (tested) and its state_dict
is the U-Net's under ``unet.``. ``kdgraph export`` writes ``unet`` with diffusers'
``save_pretrained``.

diffusers is an optional dependency (``pip install 'kdgraph[diffusion]'``), imported only
when such a model is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdgraph.errors import ModelError

__all__ = ["DIFFUSERS_MODELS", "DiffusersUNet", "create_diffusers", "import_diffusers"]

DIFFUSERS_MODELS = ("UNet2DModel",)

_UNTRACEABLE = {  # what stops fx in the forward of diffusers' other U-Nets, where
    "UNet2DConditionModel": "diffusers/models/unets/unet_2d_condition.py, UNet2DConditionModel.forward: "
                            "`if not torch.is_tensor(timesteps)` (fx cannot branch on a traced value), "
                            "and its text conditioning encoder_hidden_states is a tensor side input kdgraph "
                            "does not feed",
}


def import_diffusers():
    """The diffusers package, or a ModelError saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ModelError(f"diffusers: models need the diffusers package ({exc}); pip install 'kdgraph[diffusion]'"
                         ) from None
    return diffusers


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as ``forward(x, t, y=None)``: the noise predicted in ``x``
    (B, C, H, W) at timesteps ``t`` (B,) and, class-conditional (``num_class_embeds``), of
    classes ``y`` (B,). ``unet`` is the diffusers model itself (``save_pretrained`` it)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.in_chans = unet.config.in_channels
        self.num_classes = unet.config.num_class_embeds

    def _embedding(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
        if unet.class_embedding is not None and y is not None:  # decided while tracing: y is an input or None
            labels = unet.time_proj(y) if unet.config.class_embed_type == "timestep" else y
            emb = emb + unet.class_embedding(labels).to(dtype=unet.dtype)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        unet, config = self.unet, self.unet.config
        emb = self._embedding(t, y)
        if config.center_input_sample:
            x = 2 * x - 1.0
        skip = x
        h = unet.conv_in(x)
        res = (h,)
        for block in unet.down_blocks:  # a ModuleList: unrolled by fx
            if hasattr(block, "skip_conv"):
                h, block_res, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
            else:
                h, block_res = block(hidden_states=h, temb=emb)
            res += block_res
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)
        skip = None
        for block in unet.up_blocks:
            block_res, res = res[-len(block.resnets):], res[:-len(block.resnets)]
            if hasattr(block, "skip_conv"):
                h, skip = block(h, block_res, emb, skip)
            else:
                h = block(h, block_res, emb)
        h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        if skip is not None:
            h = h + skip
        if config.time_embedding_type == "fourier":
            h = h / t.reshape(-1, *([1] * (h.dim() - 1)))
        return h


def create_diffusers(name: str, kwargs: dict[str, Any]) -> DiffusersUNet:
    """``diffusers:NAME`` with ``kwargs`` as its config, random weights."""
    if name in _UNTRACEABLE:
        raise ModelError(f"diffusers:{name} does not trace with torch.fx: {_UNTRACEABLE[name]}; "
                         f"diffusers models kdgraph builds: {', '.join(DIFFUSERS_MODELS)}")
    if name not in DIFFUSERS_MODELS:
        raise ModelError(f"unknown diffusers model {name!r}; diffusers models kdgraph builds: "
                         f"{', '.join(DIFFUSERS_MODELS)}")
    diffusers = import_diffusers()
    return DiffusersUNet(getattr(diffusers, name)(**kwargs))
