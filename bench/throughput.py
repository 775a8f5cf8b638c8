"""Training throughput: kdgraph's step next to a plain PyTorch KD loop, side by side in one run.

For each pair, on synthetic data of the pair's input size, it times (images/s):
  plain      a vanilla-KD loop written the way a user would: eager, teacher in no_grad,
             CE + KL, the same optimizer (SGD, momentum) — no kdgraph code at all
  kd         kdgraph's `kd` plan (one group, logits only)
  decomposed kdgraph `stablekd`, training stage 0 (every block fed the teacher's feature)
  merged     kdgraph `stablekd`, training stage 1 (neighbouring blocks merged)
Methods are interleaved round by round and the median per-step time is reported, with
each kdgraph variant's ratio to `plain`. On CUDA the kdgraph runs use the spec's runtime
(bf16 autocast, channels_last, optional torch.compile) while `plain` stays fp32 eager, as
a user's loop would; the achieved FLOP rate counts teacher forward + 3x student forward.

    python bench/throughput.py                       # CPU-sized defaults
    python bench/throughput.py --device cuda --batch 256 --steps 30 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from kdgraph.runtime.loop import build_run, train_step
from kdgraph.spec import load_spec

PAIRS = {
    "r34-r18@32": ("resnet34", "resnet18", (3, 32, 32), {}),
    "r34-r18@224": ("resnet34", "resnet18", (3, 224, 224), {}),
    "swinS-swinT@224": ("swin_small_patch4_window7_224", "swin_tiny_patch4_window7_224", (3, 224, 224), {}),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from NVIDIA's data sheets


def make_spec(teacher, student, size, method, args, stage_epochs=None):
    return load_spec({
        "name": f"bench-{method}",
        "teacher": {"model": f"timm:{teacher}", "kwargs": {"num_classes": 100}},
        "student": {"model": f"timm:{student}", "kwargs": {"num_classes": 100}},
        "data": {"dataset": "synthetic", "input_size": list(size), "num_classes": 100,
                 "samples": args.batch * 2, "batch_size": args.batch},
        "decompose": {"blocks": 5},
        "schedule": {"method": method, "recompositions": 1 if method == "stablekd" else 0, "epochs": 2},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "lr_schedule": "constant"},
        "runtime": {"device": args.device, "compile": args.compile, "precision": "auto"},
        "output": "runs/bench",
    })


class PlainKD:
    """A user's plain vanilla-KD loop, eager fp32."""

    def __init__(self, teacher, student, size, args):
        dev = torch.device(args.device)
        self.teacher = timm.create_model(teacher, num_classes=100).to(dev).eval()
        self.student = timm.create_model(student, num_classes=100).to(dev).train()
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.x = torch.randn(args.batch, *size, device=dev)
        self.y = torch.randint(0, 100, (args.batch,), device=dev)

    def step(self):
        with torch.no_grad():
            t = self.teacher(self.x)
        s = self.student(self.x)
        loss = F.cross_entropy(s, self.y) + F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1),
                                                      reduction="batchmean", log_target=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


class KDGraphStep:
    def __init__(self, teacher, student, size, method, stage, args):
        self.run = build_run(make_spec(teacher, student, size, method, args))
        self.run.distiller.set_stage(self.run.compiled.plan.stages[stage])
        self.run.distiller.train()
        self.xb, self.yb = next(self.run.train_loader.epoch(0))

    def step(self):
        return train_step(self.run, self.xb, self.yb)[1]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def model_flops(teacher, student, size) -> float:
    """Teacher forward + 3x student forward (forward + backward ~ 3 forwards), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0.0
    for name, mult in ((teacher, 1), (student, 3)):
        m = timm.create_model(name, num_classes=100).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randn(1, *size))
        total += mult * counter.get_total_flops()
    return total


def bench_pair(label, args):
    teacher, student, size, _ = PAIRS[label]
    runners = {
        "plain": PlainKD(teacher, student, size, args),
        "kd": KDGraphStep(teacher, student, size, "kd", 0, args),
        "decomposed": KDGraphStep(teacher, student, size, "stablekd", 0, args),
        "merged": KDGraphStep(teacher, student, size, "stablekd", 1, args),
    }
    for r in runners.values():  # warm-up (and compilation)
        for _ in range(args.warmup):
            r.step()
        sync(args.device)
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, r in runners.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r.step()
            sync(args.device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    return ips, model_flops(teacher, student, size)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 CUDA / 2 CPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the kdgraph step")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.batch = args.batch or (256 if cuda else 32)
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    peak = None
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        print(f"device: {name}, peak bf16 {peak} TFLOP/s" if peak else f"device: {name}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads")
    print(f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, median per-step time\n")
    head = f"{'pair':<18}{'method':<12}{'img/s':>10}{'ratio':>8}{'TFLOP/s':>10}" + ("  % peak" if peak else "")
    print(head)
    print("-" * len(head))
    for label in args.pairs:
        ips, flops = bench_pair(label, args)
        for name, v in ips.items():
            tflops = v * flops / 1e12
            line = f"{label:<18}{name:<12}{v:>10.1f}{v / ips['plain']:>8.2f}{tflops:>10.3f}"
            if peak:
                line += f"  {100 * tflops / peak:6.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
