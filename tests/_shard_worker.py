"""One rank of tests/test_big_teacher.py's two-rank check (launched by torchrun): the frozen
teacher's outputs and parameter bytes, unsharded and then sharded with FSDP2 over the ranks,
written to OUT/rank{r}.pt. Argument: OUT, then the teacher dtype."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import frozen_teacher
from kdgraph.runtime.techniques import init_distributed, shard_teacher
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec


def main(out: Path, dtype: str) -> None:
    info = init_distributed()
    torch.manual_seed(0)  # the same teacher weights on every rank, as the Trainer seeds them
    spec = load_spec(tiny_spec(out / "run", "kd+mse", teacher=True, runtime={"device": "cpu"}))
    spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"dtype": dtype})})
    compiled = compile_spec(spec)
    teacher = frozen_teacher(compiled)
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank its own batch
    x = torch.randn(6, 1, 8, 8, generator=g)
    blocks = set(range(1, len(teacher.segments) + 1))
    before = {"features": teacher.features(x, blocks), "logits": teacher(x), "bytes": teacher.parameter_bytes()}
    shard_teacher(teacher, info, torch.device("cpu"))
    after = {"features": teacher.features(x, blocks), "logits": teacher(x), "bytes": teacher.parameter_bytes(),
             "logits_only": teacher.features(x, {len(teacher.segments)})}
    torch.save({"before": before, "after": after, "world_size": info.world_size},
               out / f"rank{info.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
