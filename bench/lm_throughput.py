"""Causal-LM training throughput: kdgraph's step against a hand-written transformers KD loop, side by side.

Both train the same pair (a transformers teacher and a smaller student of one family, built
from the same configs and starting from the same weights: the loop's models are loaded with
kdgraph's) on the same batch of (B, T) token windows, with per-token forward KL plus
``--ce-weight`` × next-token cross-entropy, AdamW (one parameter group, the same lr and weight
decay; fused on CUDA, foreach on CPU) and bf16 autocast on CUDA (kdgraph: ``precision: auto``).
The loop is what one writes with plain transformers: the frozen teacher in eval mode under
``no_grad``, ``model(input_ids=x, use_cache=False).logits``, the full (B, T, V) log-softmaxes,
``F.kl_div(..., log_target=True)``. kdgraph's is ``Trainer.train_step`` of the spec's plan
(``decompose.blocks: 1``: logits only; the token loss in chunks of ``loss.token_chunk``).

The first step's losses are printed side by side (they agree to float32 rounding: the same
models and batch), then tokens/s (B·T over the median step time of interleaved rounds) and
the ratio kdgraph / loop. JSON lines go to ``--out``.

    python bench/lm_throughput.py                         # CPU-sized
    python bench/lm_throughput.py --device cuda --width 1024 --teacher-layers 16 --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from kdgraph.runtime.loop import Trainer
from kdgraph.spec import load_spec


def config_kwargs(args, width: int, layers: int) -> dict:
    heads = max(width // 64, 2)
    return {"vocab_size": args.vocab, "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": max(args.seq, 64)}


def make_spec(args, root: Path, out: Path):
    teacher = config_kwargs(args, args.width, args.teacher_layers)
    student = config_kwargs(args, args.width // 2, max(args.teacher_layers // 2, 1))
    return load_spec({
        "name": "bench-lm", "seed": 0, "output": str(out),
        "teacher": {"model": f"transformers:{args.family}", "kwargs": teacher},
        "student": {"model": f"transformers:{args.family}", "kwargs": student},
        "data": {"dataset": "text", "root": str(root), "seq_len": args.seq, "batch_size": args.batch},
        "decompose": {"blocks": 1}, "schedule": {"method": "kd", "epochs": 1},
        "loss": {"token": "forward_kl", "kl_weight": 1.0, "ce_weight": args.ce_weight, "temperature": 1.0},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "lr_schedule": "constant",
                  "decay_norms_and_biases": True},
        "runtime": {"device": args.device, "precision": "auto", "log_every": 1000}})


class HandLoop:
    """A transformers KD step without kdgraph code, on the models kdgraph built (their weights copied)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, device: str, ce_weight: float):
        def twin(model):  # the transformers model inside kdgraph's CausalLM, rebuilt and loaded
            lm = transformers.AutoModelForCausalLM.from_config(model.lm.config)
            lm.load_state_dict(model.lm.state_dict())
            return lm.to(device)

        self.teacher = twin(teacher).eval().requires_grad_(False)
        self.student = twin(student).train()
        cuda = device.startswith("cuda")
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-3, weight_decay=0.01,
                                     **({"fused": True} if cuda else {"foreach": True}))
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
        self.ce_weight = ce_weight

    def loss(self, x, y):
        with torch.no_grad():
            t = self.teacher(input_ids=x, use_cache=False).logits
        s = self.student(input_ids=x, use_cache=False).logits
        log_q = F.log_softmax(s.float(), -1).flatten(0, 1)
        log_p = F.log_softmax(t.float(), -1).flatten(0, 1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        return kl + self.ce_weight * F.cross_entropy(s.float().flatten(0, 1), y.flatten())

    def step(self, x, y):
        if self.amp is not None:
            with self.amp:
                loss = self.loss(x, y)
        else:
            loss = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--family", default="llama")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256, help="the teacher's; the student has half the width and depth")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10 CUDA / 2 CPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append one JSON line per runner here")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    steps = args.steps or (10 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "text"
        root.mkdir()
        words = np.random.default_rng(0).integers(97, 123, size=max(args.batch * (args.seq + 1) * 4, (args.seq + 1) * 50))
        (root / "random.txt").write_bytes(bytes(words.astype(np.uint8)))
        run = Trainer.from_spec(make_spec(args, root, Path(tmp) / "run"))
        run.distiller.set_stage(run.compiled.plan.stages[0])
        run.distiller.train()
        x, y = next(iter(run.data.train.epoch(0)))
        loop = HandLoop(run.compiled.teacher.model, run.compiled.student.model, args.device, args.ce_weight)
        first = {"kdgraph": run.train_step(x, y)[1].item(), "loop": loop.step(x, y).item()}
        runners = {"loop": lambda: loop.step(x, y), "kdgraph": lambda: run.train_step(x, y)}
        for runner in runners.values():
            for _ in range(args.warmup):
                runner()
        times = {k: [] for k in runners}
        for _ in range(args.rounds):  # interleaved: drift of the machine hits both alike
            for name, runner in runners.items():
                sync(args.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    runner()
                sync(args.device)
                times[name].append((time.perf_counter() - t0) / steps)
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {device}, torch {torch.__version__}, transformers {transformers.__version__}; {args.family} "
          f"teacher {args.teacher_layers}×{args.width}, student {max(args.teacher_layers // 2, 1)}×{args.width // 2}, "
          f"vocab {args.vocab}, batch {args.batch} × {args.seq} tokens")
    print(f"first step's loss (same models, same batch): kdgraph {first['kdgraph']:.6f}, loop {first['loop']:.6f}")
    tps = {k: args.batch * args.seq / statistics.median(v) for k, v in times.items()}
    for name, v in tps.items():
        row = {"device": device, "family": args.family, "runner": name, "tokens_per_s": round(v, 1),
               "ratio_to_loop": round(v / tps["loop"], 3), "batch": args.batch, "seq": args.seq,
               "width": args.width, "teacher_layers": args.teacher_layers, "vocab": args.vocab,
               "first_loss": first[name], "steps": steps, "rounds": args.rounds}
        print(f"{name:8s} {v:12.1f} tokens/s  {row['ratio_to_loop']:.3f}× the loop (median of {args.rounds} rounds "
              f"of {steps} steps)")
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
