"""One rank of tests/test_sharding.py's two-rank checks (launched by torchrun): the toy causal-LM
pair trained through the real ``Trainer`` (its step, its checkpoints) with the student whole
under DDP and sharded with FSDP2, written to OUT/rank{r}.pt. Arguments: OUT, the spec's JSON.

    ddp        20 steps, the student under DDP, the teacher whole (the reference)
    sharded    20 steps, student and teacher sharded; a DCP checkpoint after step 10
    resumed    a new Trainer restored from that checkpoint, steps 11..20
    ckpt       20 steps sharded with activation checkpointing of the student's layers
Each rank records its own losses and the two ranks' mean, and the parameter bytes it holds.
With a third argument ``one`` (run without torchrun): one process, the student whole, batches
of both ranks' windows (twice the batch size), restored from the two-rank DCP checkpoint of
``sharded`` (model, optimizer, scheduler, position), steps 11..20, to OUT/one.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kdgraph.runtime.loop import Trainer
from kdgraph.runtime.sharding import ShardedCheckpoints, local_bytes
from kdgraph.runtime.techniques import DistInfo
from kdgraph.spec import load_spec

STEPS, SAVE_AT = 20, 10


def run_steps(trainer: Trainer, start: int, stop: int, save_at: int | None = None) -> list[tuple[float, float]]:
    """Global steps [start, stop) of the trainer's step: (this rank's loss, the ranks' mean) each."""
    n = len(trainer.data.train)
    trainer.distiller.train()
    out = []
    for g in range(start, stop):
        epoch, step = divmod(g, n)
        xb, yb, _ = next(iter(trainer.batches(epoch, step)))
        _, loss = trainer.train_step(xb, yb)
        trainer.global_step = g + 1
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
        out.append((float(loss), float(mean) / (dist.get_world_size() if dist.is_initialized() else 1)))
        if save_at is not None and g + 1 == save_at:
            trainer.save(*divmod(g + 1, n))
    return out


def trainer_of(raw: dict, out: Path, name: str, **runtime) -> Trainer:
    raw = json.loads(json.dumps(raw))
    raw["output"] = str(out / name)
    raw["runtime"].update(runtime)
    raw["teacher"]["shard"] = bool(runtime.get("shard_student"))
    return Trainer.from_spec(load_spec(raw))


def bytes_of(trainer: Trainer) -> dict:
    return {"student": local_bytes(trainer.distiller.student), "teacher": trainer.distiller.teacher.parameter_bytes()}


def main(out: Path, raw_json: str) -> None:
    raw = json.loads(raw_json)
    result = {}
    ddp = trainer_of(raw, out, "ddp")
    result["ddp"] = {"losses": run_steps(ddp, 0, STEPS), "bytes": bytes_of(ddp)}
    sharded = trainer_of(raw, out, "sharded", shard_student=True)
    result["sharded"] = {"losses": run_steps(sharded, 0, STEPS, save_at=SAVE_AT), "bytes": bytes_of(sharded)}
    resumed = trainer_of(raw, out, "sharded", shard_student=True)
    resumed.restore()
    result["resumed"] = {"losses": run_steps(resumed, resumed.global_step, STEPS), "from": resumed.global_step}
    ckpt = trainer_of(raw, out, "ckpt", shard_student=True, activation_checkpointing=True)
    result["ckpt"] = {"losses": run_steps(ckpt, 0, STEPS)}
    result["world_size"] = dist.get_world_size()
    torch.save(result, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


def one_rank(out: Path, raw_json: str) -> None:
    raw = json.loads(raw_json)
    raw["data"]["batch_size"] *= 2  # one step reads the windows of both ranks' steps
    trainer = trainer_of(raw, out, "sharded")
    states = {k: trainer.checkpoints.states[k] for k in ("model", "optimizer", "scheduler", "position")}
    ShardedCheckpoints(trainer.folder, states, str, DistInfo()).restore(True)
    start = trainer.global_step
    torch.save({"losses": run_steps(trainer, start, STEPS), "from": start}, out / "one.pt")


if __name__ == "__main__":
    (one_rank if sys.argv[3:] == ["one"] else main)(Path(sys.argv[1]), sys.argv[2])
