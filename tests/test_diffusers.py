"""The diffusers: model source: a diffusers UNet2DModel traced as a denoiser (x, t, y), cut and
recomposed, distilled, and exported in diffusers' own layout.

Independent truth: diffusers' own ``UNet2DModel.forward`` (the wrapper and the recomposed
blocks must give what ``unet(x, t, class_labels=y).sample`` gives), diffusers' own
``from_pretrained`` in a process that never imports kdgraph, and diffusers' own DDIMScheduler
step (ε- and v-prediction).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _runtime_helpers import write_spec
from kdgraph.compiler.boundaries import choose_boundaries
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.split import split_segments, split_side
from kdgraph.compiler.stages import find_stages
from kdgraph.compiler.trace import trace
from kdgraph.errors import KDGraphError
from kdgraph.ir import SideInput
from kdgraph.models import create_model
from kdgraph.runtime.chain import StudentChain
from kdgraph.spec import load_spec

pytest.importorskip("diffusers")

SIZE = (1, 16, 16)
SIDE = (SideInput("t", "timestep", 1000), SideInput("y", "class", 10))
CONFIG = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
          "layers_per_block": 1, "norm_num_groups": 8, "num_class_embeds": 10,
          "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SIZE, generator=g), torch.randint(0, 1000, (n,), generator=g), \
        torch.randint(0, 10, (n,), generator=g)


def _unet(**over):
    torch.manual_seed(0)
    return create_model("diffusers:UNet2DModel", {**CONFIG, **over}).eval()


def test_unet2dmodel_splits_and_recomposes_its_eager_forward():
    model = _unet()
    traced = trace(model, SIZE, "student", side=SIDE)
    cuts = find_cuts(traced)
    assert cuts, "no cut in a two-level UNet2DModel"
    x, t, y = _batch()
    expected = model.unet(x, t, class_labels=y).sample
    stages = find_stages(cuts, traced)
    for blocks in (1, 2, 3):
        bounds = [b.cut.nodes if b.cut.multi else b.cut.node for b in choose_boundaries(stages, blocks, traced)]
        segments = split_segments(traced, bounds)
        chain = StudentChain(segments, split_side(traced, segments))
        values, h = chain.side((t, y)), x
        for i in range(1, blocks + 1):
            h = chain.block(i, h, values)
        assert torch.equal(h, expected), blocks


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_a_ddim_step_is_diffusers_own_for_either_prediction(prediction):
    """kdgraph's (x̂₀, ε̂) of a prediction, and the DDIM step made from them, are what diffusers'
    DDIMScheduler computes with the prediction_type kdgraph records for the export."""
    from diffusers import DDIMScheduler

    from kdgraph.tasks.denoise.diffusion import DIFFUSERS_PREDICTION, x0_and_eps

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                              prediction_type=DIFFUSERS_PREDICTION[prediction])
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    g = torch.Generator().manual_seed(0)
    x_t, pred = torch.randn(2, *SIZE, generator=g), torch.randn(2, *SIZE, generator=g)
    out = scheduler.step(pred, t, x_t, eta=0.0)
    ab, ab_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 1000 // 10]
    x0, eps = x0_and_eps(pred, x_t, ab, prediction)
    assert torch.allclose(out.pred_original_sample, x0, atol=1e-5)
    assert torch.allclose(out.prev_sample, ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps, atol=1e-5)


def _spec(tmp_path, method, student_widths=(16, 32), teacher_ckpt=None):
    model = lambda widths: {"model": "diffusers:UNet2DModel",  # noqa: E731
                            "kwargs": {**CONFIG, "num_class_embeds": 4, "block_out_channels": list(widths)}}
    spec = {
        "name": "tiny-diffusers", "seed": 0, "student": model(student_widths),
        "data": {"dataset": "synthetic", "input_size": list(SIZE), "num_classes": 4, "samples": 16,
                 "batch_size": 8, "augment": "none"},
        "denoise": {"timesteps": 100, "class_conditional": True, "sample_steps": 2, "sample_images": 4},
        "decompose": {"blocks": 1 if method == "supervised" else 3},
        "schedule": {"method": method, "epochs": 1 if method == "supervised" else 2, **({"recompositions": 1} if method == "stablekd" else {})},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "runtime": {"device": "cpu", "log_every": 1, "num_threads": 1},
        "output": str(tmp_path / "run"),
    }
    if method != "supervised":
        spec["teacher"] = {**model((16, 32)), "checkpoint": str(teacher_ckpt)}
    return spec


_LOAD = """
import json, sys, torch
from diffusers import UNet2DModel
unet = UNet2DModel.from_pretrained(sys.argv[1]).eval()
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 1, 16, 16, generator=g)
with torch.no_grad():
    out = unet(x, torch.tensor([3, 50, 99]), class_labels=torch.tensor([0, 1, 3])).sample
print(json.dumps({"kdgraph": "kdgraph" in sys.modules, "out": out.flatten().tolist()}))
"""


def test_a_diffusers_student_distils_exports_and_loads_without_kdgraph(tmp_path):
    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime import loop
    from kdgraph.runtime.commands import export_spec
    from kdgraph.runtime.export import load_trained

    loop.train(load_spec(write_spec(_spec(tmp_path / "t", "supervised"), tmp_path / "t.yaml")))
    spec = load_spec(write_spec(_spec(tmp_path / "s", "stablekd", teacher_ckpt=tmp_path / "t" / "run" /
                                      "student.safetensors"), tmp_path / "s.yaml"))
    summary = loop.train(spec)
    assert summary["student_mse"] > 0
    result = export_spec(spec, tmp_path / "ship")
    assert result["format"] == "diffusers"
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in (tmp_path / "ship").iterdir()}
    shipped = json.loads((tmp_path / "ship" / "config.json").read_text())
    assert shipped["_class_name"] == "UNet2DModel"
    assert shipped["_kdgraph"]["prediction_type"] == "epsilon"  # diffusers' name: the user's scheduler's setting
    cli = CliRunner().invoke(app, ["export", str(tmp_path / "s.yaml"), "--to", str(tmp_path / "cli")],
                             terminal_width=400)
    assert cli.exit_code == 0 and "diffusers' layout" in cli.output, cli.output
    assert (tmp_path / "cli" / "diffusion_pytorch_model.safetensors").is_file()
    done = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "ship")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not loaded["kdgraph"]
    compiled = compile_spec(spec)
    load_trained(compiled, spec.output_dir / "student.safetensors")
    student = compiled.student.model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16, generator=g)
    with torch.no_grad():
        expected = student(x, torch.tensor([3, 50, 99]), torch.tensor([0, 1, 3]))
    assert torch.allclose(torch.tensor(loaded["out"]).view_as(expected), expected, atol=1e-5)
    # a half-width student keeps adapters at its cuts: diffusers' layout has no place for them
    half = _spec(tmp_path / "h", "stablekd", student_widths=(8, 16), teacher_ckpt=spec.teacher.checkpoint)
    half = load_spec(write_spec(half, tmp_path / "h.yaml"))
    loop.train(half)
    with pytest.raises(KDGraphError, match="adapters after blocks"):
        export_spec(half, tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_a_diffusers_pair_plans_on_the_meta_device(tmp_path):
    """Planning builds both U-Nets without weights and finds the blocks of the denoise task."""
    from kdgraph.compiler import compile_spec

    spec = _spec(tmp_path, "stablekd", teacher_ckpt=None)
    spec["teacher"].pop("checkpoint")
    compiled = compile_spec(load_spec(write_spec(spec, tmp_path / "s.yaml")), materialize=False)
    d = json.loads(json.dumps(compiled.to_dict()))
    for role in ("teacher", "student"):
        assert d[role]["side_inputs"] == [{"name": "t", "kind": "timestep", "high": 100},
                                          {"name": "y", "kind": "class", "high": 4}]
        assert len(d[role]["side_tensors"]) == 3  # one list per block


