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

``--count-ops`` times nothing: it counts what one step of each runner does (after a first,
warm-up step), with a ``TorchDispatchMode`` below autograd (forward, backward and optimizer):
aten ops, the host reads of a tensor's value (``.item()``, ``int``/``float``/``bool`` of a
tensor, ``nonzero``, a copy from the device to the host: each a device sync on a GPU; the CPU
step counters that foreach AdamW reads, alike in both, left out), the tensor elements written (view ops write none), those of
vocabulary-wide tensors apart, the teacher's and the student's forward passes, and the Python
function calls; then the aten ops whose counts differ. Deterministic: the same on every run.

    python bench/lm_throughput.py                         # CPU-sized
    python bench/lm_throughput.py --count-ops             # op and sync counts, no timing
    python bench/lm_throughput.py --device cuda --width 1024 --teacher-layers 16 --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import operator
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from torch.utils._python_dispatch import TorchDispatchMode

from kdgraph.runtime.loop import Trainer
from kdgraph.spec import load_spec

HOST_READS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                        "unique_consecutive"})  # aten ops that wait for a device's result
COPIES = frozenset({"_to_copy", "copy_"})
ALLOCATIONS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})  # write nothing
SCATTERS = frozenset({"scatter_", "scatter_add_", "scatter_reduce_"})  # (self, dim, index, src): index.numel() written


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
        "loss": {"token": "forward_kl", "kl_weight": 1.0, "ce_weight": args.ce_weight, "temperature": 1.0,
                 **({"token_chunk": args.chunk} if getattr(args, "chunk", None) else {})},
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
        return self.token_loss(s, t, y)

    def token_loss(self, s, t, y):
        """Forward KL of the student's (B, T, V) logits ``s`` to the teacher's ``t``, plus
        ``ce_weight`` × the next-token CE of targets ``y``."""
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


class StepCounter(TorchDispatchMode):
    """What the steps run while it is active dispatch (autograd's backward ops included): aten
    ops by name, host reads (``HOST_READS``; those of the tensors in ``skip``, by data pointer,
    left out), the elements written (their outputs' by ops that are neither views nor bare
    allocations; an in-place scatter's, its index's), and those of the passes over tensors whose
    last dimension is ``vocab`` apart."""

    def __init__(self, vocab: int, skip: frozenset[int] = frozenset()):
        super().__init__()
        self.vocab, self.skip = vocab, skip
        self.ops: collections.Counter[str] = collections.Counter()
        self.reads = self.elements = self.vocab_elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in HOST_READS and not (first is not None and first.data_ptr() in self.skip):
            self.reads += 1
        elif name in COPIES and isinstance(out, torch.Tensor) and out.device.type == "cpu" and any(
                isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
            self.reads += 1  # a copy from the device to the host waits for it
        if func.is_view or name in ALLOCATIONS:
            return out
        if name in SCATTERS:  # in place at the index's positions: those elements, no pass over the tensor
            n, wide = args[2].numel(), False
        else:
            outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
            n = sum(t.numel() for t in outs)
            wide = any(t.dim() and t.shape[-1] == self.vocab for t in outs)
        self.elements += n
        self.vocab_elements += n if wide else 0
        return out


def step_counts(step, teacher: torch.nn.Module, student: torch.nn.Module, vocab: int,
                optimizer: torch.optim.Optimizer) -> dict:
    """The counts of one call of ``step`` (``StepCounter``'s and the forward passes of the
    transformers ``teacher`` and ``student``), and the Python function calls of the next. The step counters
    of ``optimizer`` (CPU tensors that foreach AdamW reads per parameter: no device sync) are
    not host reads."""
    skip = frozenset(s["step"].data_ptr() for s in optimizer.state.values()
                     if isinstance(s.get("step"), torch.Tensor) and s["step"].device.type == "cpu")
    passes = collections.Counter()
    hooks = [m.register_forward_pre_hook(lambda *_, who=who: passes.update([who]))
             for who, m in (("teacher", teacher), ("student", student))]
    try:
        with StepCounter(vocab, skip) as counter:
            step()
    finally:
        for h in hooks:
            h.remove()
    calls = [0]  # in a second step, apart: the counter's own Python would count too

    def profiler(frame, event, arg):
        if event == "call":
            calls[0] += 1

    sys.setprofile(profiler)
    try:
        step()
    finally:
        sys.setprofile(None)
    return {"aten_ops": sum(counter.ops.values()), "host_reads": counter.reads, "elements": counter.elements,
            "vocab_elements": counter.vocab_elements, "teacher_forwards": passes["teacher"],
            "student_forwards": passes["student"], "python_calls": calls[0], "ops": dict(counter.ops)}


def loss_counts(loss, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, vocab: int, amp) -> dict:
    """``StepCounter``'s counts of ``loss(s, t, y)`` and its backward to ``s`` (a leaf), under
    ``amp`` (an autocast context, or None)."""
    s = s.detach().requires_grad_(True)
    with StepCounter(vocab) as counter:
        with amp if amp is not None else contextlib.nullcontext():
            value = loss(s, t, y)
        value.backward()
    return {"aten_ops": sum(counter.ops.values()), "host_reads": counter.reads, "elements": counter.elements,
            "vocab_elements": counter.vocab_elements}


def compare_counts(run: Trainer, loop: HandLoop, x: torch.Tensor, y: torch.Tensor, vocab: int) -> dict[str, dict]:
    """``step_counts`` of one step of each runner on (x, y), after one uncounted step of each
    (lazy state: the optimizers' moments, caches filled on first use); under "loss", the
    counts of each runner's token loss alone (``loss_counts``, on (B, T, V) logits of x's
    shape): what the step spends outside its loss is the difference."""
    run.train_step(x, y)
    loop.step(x, y)
    head = next(run.distiller.losses[op.node] for op in run.distiller.program.ops if op.kind == "loss")
    g = torch.Generator(device=x.device).manual_seed(0)
    s, t = (torch.randn(*x.shape, vocab, generator=g, device=x.device) for _ in range(2))
    counts = {"loop": step_counts(lambda: loop.step(x, y), loop.teacher, loop.student, vocab, loop.opt),
              "kdgraph": step_counts(lambda: run.train_step(x, y), run.compiled.teacher.model.lm,
                                     run.compiled.student.model.lm, vocab, run.optimizer)}
    counts["loop"]["loss"] = loss_counts(loop.token_loss, s, t, y, vocab, loop.amp)
    counts["kdgraph"]["loss"] = loss_counts(lambda s, t, y: functools.reduce(operator.add, head(s, y, t).values()),
                                            s, t, y, vocab, loop.amp)
    return counts


def print_counts(counts: dict[str, dict]) -> None:
    loop, kd = counts["loop"], counts["kdgraph"]
    print(f"{'per step':34s} {'loop':>14s} {'kdgraph':>14s}")
    for key in ("aten_ops", "host_reads", "elements", "vocab_elements", "teacher_forwards", "student_forwards",
                "python_calls"):
        print(f"{key:34s} {loop[key]:14,d} {kd[key]:14,d}")
    for key in ("aten_ops", "host_reads", "elements", "vocab_elements"):
        print(f"{'the token loss alone: ' + key:34s} {loop['loss'][key]:14,d} {kd['loss'][key]:14,d}")
    print(f"{'outside the loss: aten_ops':34s} {loop['aten_ops'] - loop['loss']['aten_ops']:14,d} "
          f"{kd['aten_ops'] - kd['loss']['aten_ops']:14,d}")
    names = sorted(set(loop["ops"]) | set(kd["ops"]), key=lambda n: (kd["ops"].get(n, 0) - loop["ops"].get(n, 0), n))
    print("aten ops of the step whose counts differ:")
    for name in names:
        a, b = loop["ops"].get(name, 0), kd["ops"].get(name, 0)
        if a != b:
            print(f"  {name:32s} {a:14d} {b:14d}")


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
    p.add_argument("--chunk", type=int, default=None, help="loss.token_chunk (default: the spec's default)")
    p.add_argument("--count-ops", action="store_true", help="count one step's ops, syncs and elements; no timing")
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
        if args.count_ops:
            counts = compare_counts(run, loop, x, y, args.vocab)
            print(f"{args.family} teacher {args.teacher_layers}×{args.width}, student "
                  f"{max(args.teacher_layers // 2, 1)}×{args.width // 2}, vocab {args.vocab}, batch {args.batch} × "
                  f"{args.seq} tokens, loss.token_chunk {run.distiller.losses['head_loss'].chunk}, {args.device}; "
                  f"torch {torch.__version__}, transformers {transformers.__version__}")
            print_counts(counts)
            return
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
