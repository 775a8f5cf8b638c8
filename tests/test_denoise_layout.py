"""kdgraph.tasks.denoise.layout: ``ship_diffusers`` writes diffusers' own layout (read back by
diffusers' ``from_pretrained``, the truth) and ``diffusers_state`` reads it back as the spec's
student's state_dict only where its config.json describes that U-Net (each refusal one line)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdgraph.errors import KDGraphError

pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402

from kdgraph.tasks.denoise.diffusers_source import DiffusersUNet  # noqa: E402
from kdgraph.tasks.denoise.layout import DIFFUSERS, DIFFUSERS_WEIGHTS, diffusers_state, ship_diffusers  # noqa: E402

CONFIG = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
          "layers_per_block": 1, "norm_num_groups": 8, "num_class_embeds": 10,
          "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return DiffusersUNet(UNet2DModel(**{**CONFIG, **over})).eval()


def _compiled(model):
    return SimpleNamespace(student=SimpleNamespace(model=model),
                           run=SimpleNamespace(student=SimpleNamespace(model="diffusers:UNet2DModel")))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layout") / "ship"
    model = _model()
    out = ship_diffusers(model, folder, {"prediction_type": "epsilon", "command": None})
    return folder, model, out


def test_a_shipped_folder_reads_back_as_the_students_state(shipped):
    folder, model, out = shipped
    assert out == {"folder": str(folder), "format": "diffusers", "reason": "UNet2DModel.save_pretrained"}
    assert DIFFUSERS.holds(folder) and not (folder / ".incomplete").exists()
    assert json.loads((folder / "config.json").read_text())["_kdgraph"] == {"prediction_type": "epsilon"}
    other = _model(seed=1)  # same shapes, other weights
    state = diffusers_state(_compiled(other), folder)
    want = model.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


def test_a_folder_of_another_unet_is_refused_naming_what_differs(shipped):
    folder, _, _ = shipped
    with pytest.raises(KDGraphError, match=r"does not fit the student of this spec: its config.json differs in "
                                           r"block_out_channels: \[16, 32\], the spec's \[16, 64\]") as info:
        diffusers_state(_compiled(_model(block_out_channels=[16, 64])), folder)
    assert "\n" not in str(info.value)
    with pytest.raises(KDGraphError, match="differs in act_fn: 'silu', the spec's 'gelu'"):  # same shapes
        diffusers_state(_compiled(_model(act_fn="gelu")), folder)


def test_a_folder_that_is_not_a_unet2dmodel_or_unreadable_is_refused(tmp_path, shipped):
    folder, _, _ = shipped
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / DIFFUSERS_WEIGHTS).write_bytes((folder / DIFFUSERS_WEIGHTS).read_bytes())
    (odd / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(KDGraphError, match="holds a diffusers UNet2DConditionModel; this spec's student is a "
                                           "UNet2DModel"):
        diffusers_state(_compiled(_model()), odd)
    (odd / "config.json").write_text("[1, 2]")
    with pytest.raises(KDGraphError, match="holds a diffusers model of no _class_name"):
        diffusers_state(_compiled(_model()), odd)
    (odd / "config.json").write_text("{not json")
    with pytest.raises(KDGraphError, match=r"cannot read .*odd/config.json: "):
        diffusers_state(_compiled(_model()), odd)


def test_a_student_that_is_not_a_diffusers_unet_is_refused(shipped):
    folder, _, _ = shipped
    compiled = SimpleNamespace(student=SimpleNamespace(model=torch.nn.Linear(2, 2)),
                               run=SimpleNamespace(student=SimpleNamespace(model="timm:resnet18")))
    with pytest.raises(KDGraphError, match="is a diffusers export .*this spec's student is timm:resnet18"):
        diffusers_state(compiled, folder)


def test_a_diffusers_export_over_an_earlier_timm_layout_export_leaves_none_of_its_files(tmp_path, capfd, caplog):
    """The old README.md and model.safetensors stayed beside the new config.json: a folder that
    looked like both layouts. Another tool's file there stays. And the check's read-back says
    nothing ("accelerate was not found" on every export)."""
    from diffusers import UNet2DModel

    from kdgraph.tasks.denoise.diffusers_source import DiffusersUNet
    from kdgraph.tasks.denoise.layout import ship_diffusers

    folder = tmp_path / "ship"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet_tiny", "kdgraph": {"spec": "x"}}))
    (folder / "model.safetensors").write_bytes(b"old weights")
    (folder / "README.md").write_text("old card")
    (folder / "notes.txt").write_text("mine")
    torch.manual_seed(0)
    ship_diffusers(DiffusersUNet(UNet2DModel(**CONFIG)).eval(), folder, {"prediction_type": "epsilon"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                        "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "config.json").read_text())["_kdgraph"] == {"prediction_type": "epsilon"}
    assert "accelerate" not in capfd.readouterr().err + caplog.text
