"""Training throughput: kdgraph's step against a strong hand-written KD loop, side by side in one run.

The loop is what a strong engineer writes without kdgraph, with the same techniques
kdgraph's runtime uses: bf16 autocast on CUDA, channels_last for conv nets, the frozen
teacher in eval mode under ``no_grad``, fused SGD (momentum, weight decay), CE + KL
on the logits, eager or ``torch.compile``d. For each pair it times, eager and compiled:

  loop        the strong hand-written KD loop (no kdgraph code)
  kd          kdgraph's ``kd`` plan (one group, logits only)
  decomposed  kdgraph ``stablekd``, training stage 0 (every block fed the teacher's feature)
  merged      kdgraph ``stablekd``, training stage 1 (neighbouring blocks merged)

and prints images/s (median of interleaved rounds), the ratio to the loop in the same
mode, the aten ops one eager step dispatches (forward, backward and optimizer; a
``TorchDispatchMode`` count), model FLOPs utilisation (teacher forward + 3x student forward per image, counted by
``torch.utils.flop_counter`` at the pair's input size, over the GPU's dense bf16 peak) and
peak GPU memory of each runner's step against the loop's. JSON lines go to ``--out``.

    python bench/throughput.py                                   # CPU-sized: the 32-px pair, eager
    python bench/throughput.py --device cuda                     # all pairs, eager and compiled
    python bench/throughput.py --device cuda --pairs r34-r18@224 --modes compiled
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from kdgraph.runtime.loop import Trainer
from kdgraph.runtime.techniques import RecompileWatch, reset_compile_caches
from kdgraph.spec import load_spec

# label -> (teacher, student, input size, batch on CUDA, blocks)
PAIRS = {
    "r34-r18@224": ("resnet34", "resnet18", (3, 224, 224), 256, 5),
    "swinS-swinT@224": ("swin_small_patch4_window7_224", "swin_tiny_patch4_window7_224", (3, 224, 224), 128, 5),
    "vitS-r18@224": ("vit_small_patch16_224", "resnet18", (3, 224, 224), 256, 5),
    "r34-r18@32": ("resnet34", "resnet18", (3, 32, 32), 256, 5),
    # specs/your-own-data.yaml's pair, at its size and at a CPU-sized one (README, "Your own images")
    "r50-r18@224": ("resnet50", "resnet18", (3, 224, 224), 256, 5),
    "r50-r18@128": ("resnet50", "resnet18", (3, 128, 128), 256, 5),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from NVIDIA's data sheets
NUM_CLASSES = 100


def _conv_net(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def make_spec(teacher, student, size, blocks, method, batch, device, compiled):
    return load_spec({
        "name": f"bench-{method}",
        "teacher": {"model": f"timm:{teacher}", "kwargs": {"num_classes": NUM_CLASSES}},
        "student": {"model": f"timm:{student}", "kwargs": {"num_classes": NUM_CLASSES}},
        "data": {"dataset": "synthetic", "input_size": list(size), "num_classes": NUM_CLASSES,
                 "samples": batch * 2, "batch_size": batch, "augment": "none"},
        "decompose": {"blocks": blocks},
        "schedule": {"method": method, "recompositions": 1 if method == "stablekd" else 0, "epochs": 2},
        # decay_norms_and_biases: the loop's update (one group, every parameter decayed), not timm's
        # two groups (1-d parameters undecayed): both time the same optimisation
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "constant",
                  "decay_norms_and_biases": True},
        "runtime": {"device": device, "compile": compiled, "precision": "auto", "channels_last": "auto"},
        "output": "runs/bench",
    })


class StrongLoop:
    """A strong hand-written KD step: no kdgraph code."""

    def __init__(self, teacher, student, size, batch, device, compiled):
        dev = torch.device(device)
        self.dev = dev
        self.teacher = timm.create_model(teacher, num_classes=NUM_CLASSES).to(dev).eval().requires_grad_(False)
        self.student = timm.create_model(student, num_classes=NUM_CLASSES).to(dev).train()
        cuda = dev.type == "cuda"
        self.cl = cuda and _conv_net(self.student)
        if self.cl:
            self.student.to(memory_format=torch.channels_last)
            if _conv_net(self.teacher):
                self.teacher.to(memory_format=torch.channels_last)
        fast = {"fused": True} if cuda else {"foreach": True}
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **fast)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
        self.x = torch.randn(batch, *size, device=dev)
        if self.cl:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), device=dev)
        self.loss_fn = torch.compile(self._loss) if compiled else self._loss

    def _loss(self, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        log_ps = F.log_softmax(s.float(), 1)
        return F.cross_entropy(s.float(), y) + F.kl_div(log_ps, F.log_softmax(t.float(), 1),
                                                         reduction="batchmean", log_target=True)

    def step(self):
        if self.amp is not None:
            with self.amp:
                loss = self.loss_fn(self.x, self.y)
        else:
            loss = self.loss_fn(self.x, self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


class KDGraphStep:
    def __init__(self, teacher, student, size, blocks, method, stage, batch, device, compiled):
        self.run = Trainer.from_spec(make_spec(teacher, student, size, blocks, method, batch, device, compiled))
        fit = self.run.plan.projection_fit  # projected StableKD (widths differ): its fit stage first
        if fit is not None:
            self.run.distiller.fit_projections(self.run.data.train.epoch(0), fit.batches)
        self.run.distiller.set_stage(self.run.compiled.plan.stages[stage])
        self.run.distiller.train()
        self.xb, self.yb = next(iter(self.run.data.train.epoch(0)))

    def step(self):
        return self.run.train_step(self.xb, self.yb)[1]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class AtenOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active (autograd's backward ops included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(step) -> int:
    """The aten ops of one call of ``step`` (eager only: a compiled step runs its kernels
    below the dispatcher)."""
    with AtenOps() as ops:
        step()
    return ops.count


def model_flops(teacher, student, size) -> float:
    """Teacher forward + 3x student forward (backward ~ 2 forwards), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0.0
    for name, mult in ((teacher, 1), (student, 3)):
        m = timm.create_model(name, num_classes=NUM_CLASSES).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randn(1, *size))
        total += mult * counter.get_total_flops()
    return total


def _allocated(device) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (grows on every recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_pair(label, mode, args) -> list[dict]:
    """Build, warm up and time the four runners of one pair in one mode.

    Compiled, each (pair, mode) starts from an empty compile cache: Dynamo keeps at most 8
    entries per code object, and the runners of earlier pairs would push this pair's past
    that limit into eager (timed as compiled). A recompile-limit hit raises (``--strict``,
    the default) or is reported in the rows; so is any graph compiled during the timed
    rounds (the warm-up should have compiled everything)."""
    reset_compile_caches()
    with RecompileWatch(strict=args.strict) as watch:
        rows = _bench_pair(label, mode, args)
    for row in rows:
        row["recompile_limit_hits"] = watch.hits
    if watch.hits:
        print(f"warning: {label} {mode}: Dynamo hit its recompile limit {watch.hits}x ({watch.functions}); "
              "part of it ran eager", flush=True)
    return rows


def _bench_pair(label, mode, args) -> list[dict]:
    teacher, student, size, cuda_batch, blocks = PAIRS[label]
    batch = args.batch or (cuda_batch if args.device == "cuda" else 16)
    compiled = mode == "compiled"
    builders = {
        "loop": lambda: StrongLoop(teacher, student, size, batch, args.device, compiled),
        "kd": lambda: KDGraphStep(teacher, student, size, blocks, "kd", 0, batch, args.device, compiled),
        "decomposed": lambda: KDGraphStep(teacher, student, size, blocks, "stablekd", 0, batch, args.device, compiled),
        "merged": lambda: KDGraphStep(teacher, student, size, blocks, "stablekd", 1, batch, args.device, compiled),
    }
    runners, memory, ops = {}, {}, {}
    for name, build in builders.items():  # build, warm up (compile) and measure memory one at a time
        sync(args.device)
        base = _allocated(args.device)
        runner = build()
        for _ in range(args.warmup):
            runner.step()
        sync(args.device)
        if args.device == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            runner.step()
            sync(args.device)
            memory[name] = (before - base) + (torch.cuda.max_memory_allocated() - before)
        if not compiled:
            ops[name] = aten_ops(runner.step)
        runners[name] = runner
    times = {k: [] for k in runners}
    graphs_before = compiled_graphs()
    for _ in range(args.rounds):  # interleaved: drift of the machine hits every runner alike
        for name, runner in runners.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                runner.step()
            sync(args.device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    graphs_in_timing = compiled_graphs() - graphs_before
    flops = model_flops(teacher, student, size)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    rows = []
    for name, v in ips.items():
        rows.append({"pair": label, "mode": mode, "method": name, "batch": batch, "images_per_s": round(v, 1),
                     "ratio_to_loop": round(v / ips["loop"], 3), "aten_ops": ops.get(name), "tflops": round(v * flops / 1e12, 2),
                     "peak_mem_gib": round(memory[name] / 2**30, 2) if name in memory else None,
                     "mem_ratio_to_loop": round(memory[name] / memory["loop"], 3) if name in memory else None,
                     "graphs_compiled_while_timed": graphs_in_timing})
    del runners
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="*", default=None, choices=list(PAIRS),
                   help="default: every pair on CUDA, the 32-px pair on CPU")
    p.add_argument("--modes", nargs="*", default=None, choices=["eager", "compiled"],
                   help="default: eager and compiled on CUDA, eager on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: the pair's CUDA batch, 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10 CUDA / 2 CPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append one JSON line per row here")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend of the compiled mode (eager or aot_eager: capture only, a quick check on a CPU)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="report a recompile-limit hit in the rows instead of failing")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend != "inductor":  # the loop's and kdgraph's torch.compile(module) calls alike
        torch.compile = functools.partial(torch.compile, backend=args.backend)
    pairs = args.pairs or (list(PAIRS) if cuda else ["r34-r18@32"])
    modes = args.modes or (["eager", "compiled"] if cuda else ["eager"])
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    warnings.filterwarnings("ignore")
    peak = None
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        print(f"device: {name}, torch {torch.__version__}" + (f", dense bf16 peak {peak:.0f} TFLOP/s" if peak else ""))
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.steps} steps x {args.rounds} interleaved rounds, median per-step time\n")
    head = (f"{'pair':<17}{'mode':<10}{'method':<12}{'batch':>6}{'img/s':>10}{'x loop':>8}{'ops':>6}{'TFLOP/s':>9}"
            + ("  MFU %" if peak else "") + (f"{'mem GiB':>9}{'x loop':>8}" if cuda else ""))
    print(head)
    print("-" * len(head), flush=True)
    for label in pairs:
        for mode in modes:
            for row in bench_pair(label, mode, args):
                line = (f"{row['pair']:<17}{row['mode']:<10}{row['method']:<12}{row['batch']:>6}"
                        f"{row['images_per_s']:>10.1f}{row['ratio_to_loop']:>8.2f}{row['aten_ops'] or '-':>6}"
                        f"{row['tflops']:>9.2f}")
                if peak:
                    row["mfu_pct"] = round(100 * row["tflops"] / peak, 1)
                    line += f"  {row['mfu_pct']:5.1f}"
                if cuda:
                    line += f"{row['peak_mem_gib']:>9.2f}{row['mem_ratio_to_loop']:>8.2f}"
                print(line, flush=True)
                if args.out:
                    with Path(args.out).open("a") as f:
                        f.write(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                            "torch": torch.__version__, **row,
                                            "backend": args.backend if row["mode"] == "compiled" else None}) + "\n")


if __name__ == "__main__":
    main()
