"""One rank of tests/test_big_teacher.py's two-rank checks (launched by torchrun): the frozen
teacher's outputs and parameter bytes, unsharded and then sharded with FSDP2 over the ranks,
written to OUT/rank{r}.pt. Arguments: OUT, the teacher dtype, and for a denoiser (a zoo
diffusion U-Net pair, side inputs t and y) ``denoiser TEACHER_FILE``, its weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import frozen_teacher
from kdgraph.runtime.techniques import init_distributed, shard_teacher
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec

UNET = {"in_chans": 1, "num_classes": 4, "widths": [8, 16, 32]}


def denoiser_spec(out: Path, teacher_file: str) -> dict:
    """A StableKD pair of zoo U-Nets on 1x16x16 noisy images, the teacher's weights from ``teacher_file``."""
    return {
        "name": "shard-ddpm", "seed": 0,
        "student": {"model": "module:kdgraph.zoo:diffusion_unet_small", "kwargs": UNET},
        "teacher": {"model": "module:kdgraph.zoo:diffusion_unet_teacher", "kwargs": UNET, "checkpoint": teacher_file},
        "data": {"dataset": "synthetic", "input_size": [1, 16, 16], "num_classes": 4, "samples": 16, "batch_size": 8,
                 "augment": "none"},
        "denoise": {"timesteps": 100, "class_conditional": True},
        "decompose": {"blocks": 4}, "schedule": {"method": "stablekd", "epochs": 2, "recompositions": 1},
        "runtime": {"device": "cpu", "num_threads": 1}, "output": str(out),
    }


def main(out: Path, dtype: str, model: str = "classifier", teacher_file: str = "") -> None:
    info = init_distributed()
    torch.manual_seed(0)  # the same teacher weights on every rank, as the Trainer seeds them
    raw = denoiser_spec(out / "run", teacher_file) if model == "denoiser" else \
        tiny_spec(out / "run", "kd+mse", teacher=True, runtime={"device": "cpu"})
    spec = load_spec(raw)
    spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"dtype": dtype})})
    compiled = compile_spec(spec)
    teacher = frozen_teacher(compiled)
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank its own batch
    x = torch.randn(6, *compiled.input_size, generator=g)
    side = (torch.randint(0, 100, (6,), generator=g), torch.randint(0, 4, (6,), generator=g)) \
        if model == "denoiser" else ()
    blocks = set(range(1, len(teacher.segments) + 1))

    def outputs() -> dict:
        values = teacher.side(side) if side else None
        return {"features": teacher.features(x, blocks, values), "logits": teacher(x, *side),
                "bytes": teacher.parameter_bytes(), "side": values,
                "logits_only": teacher.features(x, {len(teacher.segments)}, values)}

    before = outputs()
    shard_teacher(teacher, info, torch.device("cpu"))
    after = outputs()
    torch.save({"before": before, "after": after, "world_size": info.world_size, "inputs": (x, *side)},
               out / f"rank{info.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
