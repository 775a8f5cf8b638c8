"""kdgraph.tasks.denoise.diffusers_source: ``DiffusersUNet.forward`` computes what diffusers' own
``UNet2DModel(x, t, class_labels=y).sample`` computes (the truth), across its branches (class
embeddings, skip blocks, Fourier time, centred input); unknown, untraceable or missing diffusers
models are one-line ModelErrors."""

from __future__ import annotations

import sys

import pytest
import torch

from kdgraph.errors import ModelError
from kdgraph.models import create_model

pytest.importorskip("diffusers")

from test_diffusers import CONFIG, _batch, _unet  # the small class-conditional UNet2DModel


@pytest.mark.parametrize("over", [
    {"class_embed_type": "timestep", "num_class_embeds": None},  # classes through the timestep projection
    {"in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64], "time_embedding_type": "fourier",
     "center_input_sample": True, "num_class_embeds": None,  # diffusers' skip blocks read 3 channels
     "down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D"],
     "up_block_types": ["AttnSkipUpBlock2D", "SkipUpBlock2D"]},
], ids=["timestep-class-embedding", "skip-blocks-fourier-centred"])
def test_the_wrapper_computes_diffusers_forward_in_its_other_branches(over):
    model = _unet(**over)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.in_chans, 16, 16, generator=g)
    t = torch.tensor([3.0, 500.0])
    y = torch.tensor([1, 7]) if over.get("class_embed_type") else None
    with torch.no_grad():
        got, want = model(x, t, y), model.unet(x, t, class_labels=y).sample
    assert got.abs().mean() > 0 and torch.equal(got, want)
    assert set(model.state_dict()) == {f"unet.{k}" for k in model.unet.state_dict()}  # the U-Net's, under unet.


def test_the_wrapper_computes_diffusers_forward():
    model = _unet()
    x, t, y = _batch()
    assert torch.equal(model(x, t, y), model.unet(x, t, class_labels=y).sample)
    plain = _unet(num_class_embeds=None)
    assert torch.equal(plain(x, t), plain.unet(x, t).sample)


def test_unknown_and_untraceable_diffusers_models_say_why():
    with pytest.raises(ModelError, match="unet_2d_condition.py.*torch.is_tensor"):
        create_model("diffusers:UNet2DConditionModel", {})
    with pytest.raises(ModelError, match="unknown diffusers model 'UNet3D'.*UNet2DModel"):
        create_model("diffusers:UNet3D", {})


def test_a_missing_diffusers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'kdgraph\[diffusion\]'"):
        create_model("diffusers:UNet2DModel", CONFIG)
