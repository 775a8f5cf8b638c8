"""How large a causal-LM student and teacher fit per device, from kdgraph.lm.memory's model
(arithmetic, no device needed): for 24 / 80 / 141 GiB devices at 1, 2 and 8 ranks, the largest
Qwen2.5-shaped student that trains beside a larger teacher of the family, and the largest such
teacher, with and without activation checkpointing of the student's layers, and the per-rank
budget of one pair. Student: float32 weights, gradients and AdamW, bfloat16 compute (sharded with
runtime.shard_student at 2 and 8 ranks); teacher: bfloat16 (teacher.dtype), sharded at 2 and 8.

    python bench/lm_memory.py                 # 4096 tokens per rank per step
    python bench/lm_memory.py --tokens 8192

``--measure`` checks the model on a device: it builds a pair (``--size``: transformers configs
of the given shapes, random weights) through a kdgraph spec, trains a few kdgraph steps at
``--batch`` x ``--seq`` tokens, with and without runtime.activation_checkpointing, and prints
(and appends to ``--out``, one JSON line each) the measured peak (torch.cuda.max_memory_allocated;
not measured on the CPU: None) beside per_rank's prediction for the same shapes, one rank, and
their ratio. Student float32 with AdamW, teacher bfloat16, precision auto (bf16 autocast on CUDA).
(Qwen2's q, k and v biases, a few thousand parameters a layer, are outside the model.)

    python bench/lm_memory.py --measure --device cuda                 # Qwen2.5 0.5B + 1.5B, 4 x 1024 tokens
    python bench/lm_memory.py --measure --size tiny --batch 2 --seq 32 # CPU: the prediction only
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

from kdgraph.lm.memory import GIB, QWEN25, Decoder, Pair, largest_pair, per_rank

DEVICES = (24, 80, 141)
RANKS = (1, 2, 8)


def cell(device: int, ranks: int, tokens: int, checkpointing: bool) -> str:
    pair = largest_pair(device, ranks, tokens, checkpointing)
    if pair is None:
        return "none"
    total = per_rank(Pair(QWEN25[pair[0]], QWEN25[pair[1]]), ranks, tokens, checkpointing).total
    return f"{pair[0]} + {pair[1]} ({total / GIB:.1f} GiB)"


def budget_rows(student: str, teacher: str, tokens: int) -> list[str]:
    pair = Pair(QWEN25[student], QWEN25[teacher])
    rows = []
    for ranks in RANKS:
        for ckpt in (False, True):
            b = per_rank(pair, ranks, tokens, ckpt)
            parts = [b.student_weights, b.gradients, b.optimizer, b.teacher_weights, b.activations, b.total]
            rows.append(f"| {ranks} | {'yes' if ckpt else 'no'} | " + " | ".join(f"{v / GIB:.1f}" for v in parts) + " |")
    return rows


# --measure's pairs: (student, teacher) shapes; one vocabulary each (the spec pairs them unchanged).
SIZES = {
    "qwen2.5-0.5b+1.5b": (QWEN25["0.5B"], QWEN25["1.5B"]),  # 19.5 / 15.2 GiB predicted at 4 x 1024 tokens
    "tiny": (Decoder(512, 64, 128, 2, 4, 2), Decoder(512, 128, 256, 3, 4, 2)),  # a dry run on the CPU
}


def config_kwargs(shape: Decoder, seq: int) -> dict:
    """transformers config fields of ``shape`` (Llama/Qwen2 names)."""
    return {"vocab_size": shape.vocab, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "tie_word_embeddings": shape.tied,
            "max_position_embeddings": max(seq, 64)}


def decoder_of(config) -> Decoder:
    """The memory model's shape of a built transformers model's config."""
    return Decoder(vocab=config.vocab_size, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads, tied=bool(config.tie_word_embeddings))


def measure_spec(args, checkpointing: bool, root: Path, out: Path):
    from kdgraph.spec import load_spec

    student, teacher = SIZES[args.size]
    return load_spec({
        "name": "bench-lm-memory", "seed": 0, "output": str(out),
        "teacher": {"model": f"transformers:{args.family}", "kwargs": config_kwargs(teacher, args.seq),
                    "dtype": "bfloat16"},
        "student": {"model": f"transformers:{args.family}", "kwargs": config_kwargs(student, args.seq)},
        "data": {"dataset": "text", "root": str(root), "seq_len": args.seq, "batch_size": args.batch},
        "decompose": {"blocks": 1}, "schedule": {"method": "kd", "epochs": 1},
        "loss": {"token": "forward_kl", "kl_weight": 1.0, "ce_weight": 0.5, "temperature": 1.0},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01, "lr_schedule": "constant"},
        "runtime": {"device": args.device, "precision": "auto", "log_every": 1000,
                    "activation_checkpointing": checkpointing}})


def measure(args, checkpointing: bool) -> dict:
    """Train ``args.steps`` kdgraph steps; the peak device memory beside per_rank's prediction."""
    import numpy as np
    import torch

    from kdgraph.runtime.loop import Trainer

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "text"
        root.mkdir()
        size = max(args.batch * (args.seq + 1) * 4, (args.seq + 1) * 50)  # windows in both splits
        text = np.random.default_rng(0).integers(97, 123, size=size)
        (root / "random.txt").write_bytes(bytes(text.astype(np.uint8)))
        run = Trainer.from_spec(measure_spec(args, checkpointing, root, Path(tmp) / "run"))
        run.distiller.set_stage(run.compiled.plan.stages[0])
        run.distiller.train()
        x, y = next(iter(run.data.train.epoch(0)))
        pair = Pair(decoder_of(run.compiled.student.model.config), decoder_of(run.compiled.teacher.model.config),
                    teacher_dtype="bfloat16")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        losses = [run.train_step(x, y)[1].item() for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated() if cuda else None
        del run
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    budget = per_rank(pair, 1, x.numel(), checkpointing)
    return {"size": args.size, "family": args.family, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "batch": args.batch, "seq": args.seq, "tokens": x.numel(), "checkpointing": checkpointing,
            "steps": args.steps, "loss": losses[-1], "predicted_bytes": budget.total,
            "predicted": {k: v for k, v in vars(budget).items()}, "measured_bytes": peak,
            "ratio": round(peak / budget.total, 4) if peak is not None else None}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def measure_main(args) -> list[dict]:
    rows = []
    for checkpointing in (False, True):
        row = measure(args, checkpointing)
        rows.append(row)
        measured = (f"{_gib(row['measured_bytes'])} measured, {row['ratio']:.3f} x the prediction"
                    if row["measured_bytes"] is not None else "peak not measured on the CPU")
        print(f"{args.size} ({args.family}), {row['tokens']} tokens, activation checkpointing "
              f"{'on' if checkpointing else 'off'}: {_gib(row['predicted_bytes'])} predicted, {measured}", flush=True)
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step (batch x sequence)")
    parser.add_argument("--measure", action="store_true", help="train a pair on --device; measured against predicted")
    parser.add_argument("--size", choices=list(SIZES), default="qwen2.5-0.5b+1.5b", help="--measure's pair")
    parser.add_argument("--family", default="qwen2", help="--measure's transformers model type")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="--measure's training steps (the optimizer's state "
                        "appears at the first)")
    parser.add_argument("--out", default=None, help="--measure: append one JSON line per measurement here")
    args = parser.parse_args(argv)
    if args.measure:
        measure_main(args)
        return
    print(f"Largest student + teacher (Qwen2.5 shapes), {args.tokens} tokens per rank, within 90 % of the device:\n")
    print("| device | ranks | without checkpointing | with checkpointing |")
    print("|---|---|---|---|")
    for device in DEVICES:
        for ranks in RANKS:
            print(f"| {device} GiB | {ranks} | {cell(device, ranks, args.tokens, False)} | "
                  f"{cell(device, ranks, args.tokens, True)} |")
    print(f"\nPer-rank GiB of one pair, 1.5B student + 7B teacher, {args.tokens} tokens per rank:\n")
    print("| ranks | checkpointing | student weights | gradients | AdamW | teacher weights | activations | total |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(budget_rows("1.5B", "7B", args.tokens)))


if __name__ == "__main__":
    main()
