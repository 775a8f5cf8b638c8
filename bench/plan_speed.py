"""How long `kdgraph plan` takes, and how much memory, as whole processes.

Every measurement is a fresh child process, timed from spawn to exit, its peak resident
memory read from ``os.wait4``'s rusage (that child alone). For each teacher/student pair,
interleaved per round (so drift in machine load hits all three) and repeated (medians of
--repeats):
  import: python -c "import torch, timm, networkx, pydantic, typer, rich" -- what any
          tool built on these pays before it does anything (the baseline);
  bare:   the same imports, then build both models (timm, real initialised weights),
          torch.fx.symbolic_trace and ShapeProp(gm).propagate(batch of 2) -- what planning
          cost before kdgraph built its models on the meta device;
  plan:   python -m kdgraph plan SPEC --format json (this checkout);
and once per round `python -m kdgraph --help`, which must stay light.

Goals (2 CPU cores): beyond the import baseline, vit_giant -> resnet50 plans in <= 3 s and
<= 300 MB and swin_base -> swin_tiny in <= 1.5 s; plan / bare <= 0.6 for both.

    python bench/plan_speed.py                                   # the default pairs, 3 rounds
    python bench/plan_speed.py --pairs swin_base-swin_tiny --repeats 5
    python bench/plan_speed.py --profile vit_giant-resnet50      # cProfile of compile_spec, in process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "plan_speed.jsonl"

# name: (teacher, student, input side); all timm, num_classes 100
PAIRS = {
    "swin_base-swin_tiny": ("swin_base_patch4_window7_224", "swin_tiny_patch4_window7_224", 224),
    "vit_giant-resnet50": ("vit_giant_patch14_224", "resnet50", 224),
    "vit_small-resnet18": ("vit_small_patch16_224", "resnet18", 224),
    "resnet34-resnet18": ("resnet34", "resnet18", 32),
    "convnext_tiny-convnext_atto": ("convnext_tiny", "convnext_atto", 224),
}
DEFAULT_PAIRS = ("swin_base-swin_tiny", "vit_giant-resnet50", "vit_small-resnet18")
GOALS = {  # pair: (seconds beyond import, MB beyond import, plan / bare)
    "swin_base-swin_tiny": (1.5, None, 0.6),
    "vit_giant-resnet50": (3.0, 300, 0.6),
}

IMPORTS = "import torch, timm, networkx, pydantic, typer, rich"
BARE = IMPORTS + """
import sys, warnings
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
warnings.filterwarnings("ignore")
side = int(sys.argv[3])
for name in sys.argv[1:3]:
    model = timm.create_model(name, num_classes=100).eval()
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.randn(2, 3, side, side))
"""


def spec_dict(name: str) -> dict:
    teacher, student, side = PAIRS[name]
    return {
        "name": name,
        "teacher": {"model": f"timm:{teacher}", "kwargs": {"num_classes": 100}},
        "student": {"model": f"timm:{student}", "kwargs": {"num_classes": 100}},
        "data": {"dataset": "synthetic", "input_size": [3, side, side], "num_classes": 100},
        "decompose": {"blocks": 5},
        "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 60},
    }


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd`` run as a fresh child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's maximum
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def med(samples: list[tuple[float, float]], i: int) -> float:
    return statistics.median(s[i] for s in samples)


def run(names: list[str], repeats: int) -> list[dict]:
    py = sys.executable
    specs = {}
    tmp = Path(tempfile.mkdtemp(prefix="plan_speed_"))
    for name in names:
        specs[name] = tmp / f"{name}.yaml"
        specs[name].write_text(json.dumps(spec_dict(name)))  # JSON is YAML
    base, helps = [], []
    plan = {n: [] for n in names}
    bare = {n: [] for n in names}
    for r in range(repeats):
        base.append(measure([py, "-c", IMPORTS]))
        helps.append(measure([py, "-m", "kdgraph", "--help"]))
        for name in names:
            teacher, student, side = PAIRS[name]
            plan[name].append(measure([py, "-m", "kdgraph", "plan", str(specs[name]), "--format", "json"]))
            bare[name].append(measure([py, "-c", BARE, teacher, student, str(side)]))
            print(f"round {r + 1}/{repeats} {name}: plan {plan[name][-1][0]:.2f}s {plan[name][-1][1]:.0f}MB, "
                  f"bare {bare[name][-1][0]:.2f}s {bare[name][-1][1]:.0f}MB, import {base[-1][0]:.2f}s "
                  f"{base[-1][1]:.0f}MB", file=sys.stderr, flush=True)
    b_s, b_mb = med(base, 0), med(base, 1)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "when": when, "repeats": repeats}
    rows = [{"what": "import", "s": round(b_s, 3), "mb": round(b_mb, 1), "samples": base, **machine},
            {"what": "kdgraph --help", "s": round(med(helps, 0), 3), "mb": round(med(helps, 1), 1),
             "beyond_import_s": round(med(helps, 0) - b_s, 3), "beyond_import_mb": round(med(helps, 1) - b_mb, 1),
             "samples": helps, **machine}]
    for name in names:
        p_s, p_mb, r_s, r_mb = med(plan[name], 0), med(plan[name], 1), med(bare[name], 0), med(bare[name], 1)
        rows.append({"what": "pair", "pair": name, "teacher": PAIRS[name][0], "student": PAIRS[name][1],
                     "side": PAIRS[name][2], "plan_s": round(p_s, 3), "plan_mb": round(p_mb, 1),
                     "bare_s": round(r_s, 3), "bare_mb": round(r_mb, 1),
                     "plan_beyond_import_s": round(p_s - b_s, 3), "plan_beyond_import_mb": round(p_mb - b_mb, 1),
                     "bare_beyond_import_s": round(r_s - b_s, 3), "bare_beyond_import_mb": round(r_mb - b_mb, 1),
                     "ratio_plan_bare": round(p_s / r_s, 3),
                     # the ratio a plan would have if it did nothing beyond the imports
                     "ratio_import_bare": round(b_s / r_s, 3),
                     "ratio_plan_bare_beyond_import": round((p_s - b_s) / (r_s - b_s), 3), "plan_samples": plan[name], "bare_samples": bare[name],
                     **machine})
    return rows


def render(rows: list[dict]) -> str:
    base, helps = rows[0], rows[1]
    lines = [f"import-only baseline: {base['s']:.2f} s, {base['mb']:.0f} MB; `kdgraph --help`: {helps['s']:.2f} s, "
             f"{helps['mb']:.0f} MB (+{helps['beyond_import_s']:.2f} s, {helps['beyond_import_mb']:+.0f} MB)",
             "", "| pair | kdgraph plan s (beyond import) | peak MB beyond import | bare build+trace+ShapeProp s "
             "(beyond import) | bare MB beyond import | plan / bare | import only / bare (the floor) | "
             "plan / bare beyond import |", "|---|---|---|---|---|---|---|---|"]
    for r in rows[2:]:
        lines.append(f"| {r['teacher']}→{r['student']} @{r['side']} | {r['plan_s']:.2f} ({r['plan_beyond_import_s']:.2f})"
                     f" | {r['plan_beyond_import_mb']:.0f} | {r['bare_s']:.2f} ({r['bare_beyond_import_s']:.2f}) | "
                     f"{r['bare_beyond_import_mb']:.0f} | {r['ratio_plan_bare']:.2f} | {r['ratio_import_bare']:.2f} | "
                     f"{r['ratio_plan_bare_beyond_import']:.2f} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    missed = []
    for r in rows[2:]:
        if r["pair"] not in GOALS:
            continue
        s, mb, ratio = GOALS[r["pair"]]
        if r["plan_beyond_import_s"] > s:
            missed.append(f"{r['pair']}: {r['plan_beyond_import_s']:.2f} s > {s} s beyond import")
        if mb is not None and r["plan_beyond_import_mb"] > mb:
            missed.append(f"{r['pair']}: {r['plan_beyond_import_mb']:.0f} MB > {mb} MB beyond import")
        if r["ratio_plan_bare"] > ratio:
            why = (f" (out of reach: a process that only imports is already {r['ratio_import_bare']:.2f} of bare; "
                   f"beyond the imports plan / bare is {r['ratio_plan_bare_beyond_import']:.2f})"
                   if r["ratio_import_bare"] > ratio else "")
            missed.append(f"{r['pair']}: plan / bare {r['ratio_plan_bare']:.2f} > {ratio}{why}")
    return missed


def profile(name: str) -> None:
    import cProfile
    import pstats
    import warnings

    sys.path.insert(0, str(ROOT))
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    warnings.filterwarnings("ignore")
    prof = cProfile.Profile()
    prof.runcall(compile_spec, load_spec(spec_dict(name)), materialize=False)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", help=f"comma-separated subset of: {', '.join(PAIRS)} (default: {', '.join(DEFAULT_PAIRS)})")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON lines written here (default {RESULTS})")
    p.add_argument("--profile", metavar="PAIR", help="cProfile compile_spec(materialize=False) on PAIR and exit")
    args = p.parse_args()
    if args.profile:
        profile(args.profile)
        return
    names = args.pairs.split(",") if args.pairs else list(DEFAULT_PAIRS)
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        p.error(f"unknown pairs {unknown}; known: {', '.join(PAIRS)}")
    rows = run(names, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(render(rows))
    missed = goals(rows)
    print("goals: " + ("met" if not missed else "missed: " + "; ".join(missed)))


if __name__ == "__main__":
    main()
