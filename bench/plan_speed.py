"""How long planning takes: kdgraph's compiler against a bare fx trace + shape propagation.

For each teacher/student pair both models are built once; then, interleaved and repeated
(median of --repeats), the script times
  (a) kdgraph: compile_spec(spec, models=(teacher, student)) -- every pass, models prebuilt;
  (b) bare:    torch.fx.symbolic_trace + ShapeProp(gm).propagate(batch of 2) of both models;
and once per pair the whole `kdgraph plan SPEC --format json` command in a fresh process
(imports and model building included).

Goal: kdgraph / bare < 1.5 for every pair, swin_base -> swin_tiny planned in < 3 s on 2 cores.

    python bench/plan_speed.py                      # all pairs
    python bench/plan_speed.py --pairs swin_base-swin_tiny,resnet34-resnet18
    python bench/plan_speed.py --profile swin_base-swin_tiny   # cProfile of (a)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import yaml
from torch.fx.passes.shape_prop import ShapeProp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdgraph.compiler import build_models, compile_spec  # noqa: E402
from kdgraph.spec import load_spec  # noqa: E402

# name: (teacher, teacher kwargs, student, student kwargs, input side)
PAIRS = {
    "resnet34-resnet18": ("resnet34", {}, "resnet18", {}, 32),
    "resnet50-resnet18": ("resnet50", {}, "resnet18", {}, 224),
    "swin_small-swin_tiny": ("swin_small_patch4_window7_224", {}, "swin_tiny_patch4_window7_224", {}, 224),
    "swin_base-swin_tiny": ("swin_base_patch4_window7_224", {}, "swin_tiny_patch4_window7_224", {}, 224),
    "vit_small-vit_small_d8": ("vit_small_patch16_224", {}, "vit_small_patch16_224", {"depth": 8}, 224),
    "convnext_tiny-convnext_atto": ("convnext_tiny", {}, "convnext_atto", {}, 224),
    "efficientnet_b2-efficientnet_b0": ("efficientnet_b2", {}, "efficientnet_b0", {}, 224),
}


def spec_dict(name: str) -> dict:
    t, tkw, s, skw, side = PAIRS[name]
    return {
        "name": name,
        "teacher": {"model": f"timm:{t}", "kwargs": {"num_classes": 100, **tkw}},
        "student": {"model": f"timm:{s}", "kwargs": {"num_classes": 100, **skw}},
        "data": {"dataset": "synthetic", "input_size": [3, side, side], "num_classes": 100},
        "decompose": {"blocks": 5},
        "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 60},
    }


def bare(models, side: int) -> None:
    """What any fx-based tool pays: trace and propagate shapes through both models."""
    for m in models:
        was = m.training
        m.eval()
        gm = fx.symbolic_trace(m)
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.randn(2, 3, side, side))
        m.train(was)


def cli_seconds(name: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec_dict(name), f)
    exe = Path(sys.executable).with_name("kdgraph")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "plan", f.name, "--format", "json"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    Path(f.name).unlink()
    return dt


def measure(name: str, repeats: int, e2e: bool) -> dict:
    spec = load_spec(spec_dict(name))
    side = PAIRS[name][4]
    models = build_models(spec)
    compile_spec(spec, models=models)  # warm-up: imports, first-call kernel setup
    ours, theirs, passes = [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both
        t0 = time.perf_counter()
        c = compile_spec(spec, models=models)
        ours.append(time.perf_counter() - t0)
        passes.append(c.timings)
        t0 = time.perf_counter()
        bare([m for m in models if m is not None], side)
        theirs.append(time.perf_counter() - t0)
    a, b = statistics.median(ours), statistics.median(theirs)
    slowest = max((k for k in passes[0] if k != "build"), key=lambda k: statistics.median(p[k] for p in passes))
    return {"pair": name, "kdgraph": a, "bare": b, "ratio": a / b, "e2e": cli_seconds(name) if e2e else None,
            "slowest": f"{slowest} {statistics.median(p[slowest] for p in passes):.2f}s"}


def render(rows: list[dict]) -> None:
    headers = ["pair", "kdgraph s", "bare s", "ratio", "kdgraph plan (e2e) s", "slowest pass"]
    cells = [[r["pair"], f"{r['kdgraph']:.2f}", f"{r['bare']:.2f}", f"{r['ratio']:.2f}",
              f"{r['e2e']:.2f}" if r["e2e"] is not None else "-", r["slowest"]] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"plan speed ({torch.get_num_threads()} threads)")
        for h in headers:
            table.add_column(h, justify="left" if h in ("pair", "slowest pass") else "right", no_wrap=True)
        for row in cells:
            table.add_row(*row)
        Console(width=max(120, Console().width)).print(table)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for row in cells:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", help=f"comma-separated subset of: {', '.join(PAIRS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--no-e2e", action="store_true", help="skip the `kdgraph plan` subprocess timing")
    p.add_argument("--profile", metavar="PAIR", help="cProfile compile_spec on PAIR and print the top entries")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        spec = load_spec(spec_dict(args.profile))
        models = build_models(spec)
        compile_spec(spec, models=models)
        prof = cProfile.Profile()
        prof.runcall(compile_spec, spec, models)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        return
    names = args.pairs.split(",") if args.pairs else list(PAIRS)
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        p.error(f"unknown pairs {unknown}; known: {', '.join(PAIRS)}")
    rows = []
    for name in names:
        rows.append(measure(name, args.repeats, not args.no_e2e))
        print(f"{name}: kdgraph {rows[-1]['kdgraph']:.2f}s, bare {rows[-1]['bare']:.2f}s", file=sys.stderr, flush=True)
    render(rows)
    bad = [r["pair"] for r in rows if r["ratio"] >= 1.5]
    print(f"goal ratio < 1.5: {'met' if not bad else 'missed by ' + ', '.join(bad)}")


if __name__ == "__main__":
    main()
