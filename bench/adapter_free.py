"""Adapter-free StableKD (issue 28): a width-mismatched pair, adapters in the path vs projected.

Pair: a ResNet-50-shaped teacher (timm ``resnet50``: bottleneck blocks, every stage's output
4x wider than its ``channels``) -> timm ``resnet18``, both at every width divided by
``--width-div`` (default 8: teacher block ends 32/64/128/256 channels, student 8/16/32/64),
1-channel input, 10 classes, Fashion-MNIST padded to 32 px. k = 5 blocks. Every block end
has a width mismatch and the student's residual stages read each cut (3x3 padded convs,
identity shortcuts), so today's lower∘lift adapters cannot fold and the in_path student
ships as a torch.export program; the projected one ships as plain timm weights.

Methods (batch 128, SGD momentum 0.9, weight decay 5e-4, KL at T 1):
  kd                    CE + KL, OneCycle at 0.1 (no feature loss, no adapter)
  stablekd-5/2          StableKD-5/2, decompose.adapters: in_path (lift/lower 1x1 conv + BN at
                        each block end, lower∘lift kept in the student), stage_cyclic at 0.5
  stablekd-5/2-proj     StableKD-5/2, decompose.adapters: projected (frozen PCA of the teacher's
                        features, 20 batches; no adapter), stage_cyclic at 0.5
The teacher is trained here once (supervised, OneCycle at 0.1, ``--teacher-epochs`` 2 on
``--teacher-fraction`` 0.5 of the training split: a CPU budget). Cells: ``--fraction`` of the training split, ``--epochs`` in all,
seeds in order (every method of seed 0 first, so partial results compare like with like).

Every cell appends one JSON line to bench/results/adapter-free-wN.jsonl when it finishes; a
finished cell is skipped on a rerun and a killed one resumes from its checkpoint.

    nice -n 10 python bench/adapter_free.py --threads 1           # the grid (resumable)
    python bench/adapter_free.py --report                         # mean ± std per method
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stablekd_study as study  # noqa: E402  (bench/stablekd_study.py: spec base, cell runner)

RESULTS = Path("bench/results")
# name -> (schedule.method, recompositions, decompose.adapters, lr schedule, peak lr)
METHODS = {
    "kd": ("kd", 0, "in_path", "onecycle", 0.1),
    "stablekd-5/2": ("stablekd", 2, "in_path", "stage_cyclic", 0.5),
    "stablekd-5/2-proj": ("stablekd", 2, "projected", "stage_cyclic", 0.5),
}


def _tag(args) -> str:
    return "full" if args.width_div == 1 else f"w{args.width_div}"


def _model(name: str, width_div: int) -> dict:
    # timm's resnet50 at channels c has stage outputs 4c: the ResNet-50 -> ResNet-18 width gap
    return study._model(name, width_div)


def teacher(args) -> tuple[Path, dict]:
    """Train the ResNet-50-shaped teacher once per work folder."""
    out = Path(args.work) / f"teacher-r50-{_tag(args)}"
    if not (out / "summary.json").exists():
        spec = study._spec(args, f"teacher-resnet50-{_tag(args)}", out)
        spec["student"] = _model("resnet50", args.width_div)
        spec["decompose"] = {"blocks": 1}
        spec["data"]["fraction"] = args.teacher_fraction
        spec["schedule"] = {"method": "supervised", "epochs": args.teacher_epochs}
        spec["optim"].update(lr=0.1, lr_schedule="onecycle")
        print("training the teacher ...", flush=True)
        study._train(spec)
    return out / "student.safetensors", json.loads((out / "summary.json").read_text())


def cell_spec(args, method: str, seed: int) -> dict:
    kind, n, adapters, schedule, lr = METHODS[method]
    name = f"af-{_tag(args)}-{method}-e{args.epochs}-f{args.fraction}-s{seed}"
    spec = study._spec(args, name, Path(args.work) / name.replace("/", "_"))
    spec["seed"] = seed
    spec["data"]["fraction"] = args.fraction
    spec["student"] = _model("resnet18", args.width_div)
    ckpt, _ = teacher(args)
    spec["teacher"] = {**_model("resnet50", args.width_div), "checkpoint": str(ckpt)}
    spec["decompose"] = {"blocks": 5, "adapters": adapters}
    spec["schedule"] = {"method": kind, "epochs": args.epochs, **({"recompositions": n} if kind == "stablekd" else {})}
    spec["optim"].update(lr=lr, lr_schedule=schedule)
    spec["runtime"]["eval_every"] = args.epochs  # the final student only: evaluation is most of a short cell
    return spec


def report(results: Path) -> str:
    rows = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()] if results.exists() else []
    groups: dict[tuple, list[float]] = defaultdict(list)
    teacher_top1 = None
    for r in rows:
        if r["method"] == "teacher":
            teacher_top1 = r["top1"]
            continue
        groups[(r["fraction"], r["epochs"], r["method"])].append(r["top1"])
    out = [f"ResNet-50-shaped teacher -> ResNet-18, widths / {rows[0]['width_div'] if rows else '?'}, Fashion-MNIST "
           f"32 px; teacher top-1 {teacher_top1 if teacher_top1 is None else f'{teacher_top1:.2f} %'}",
           "", "| method | fraction | epochs | test top-1 % (mean ± std) | seeds | exports as |", "|---|---|---|---|---|---|"]
    for (fraction, epochs, method), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                list(METHODS).index(kv[0][2]))):
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        ships = "torch.export program" if METHODS[method][2] == "in_path" and METHODS[method][0] == "stablekd" \
            else "plain timm state_dict"
        out.append(f"| {method} | {fraction} | {epochs} | {statistics.fmean(v):.2f} ± {std:.2f} | {len(v)} | {ships} |")
    return "\n".join(out + ["", *contrasts(groups)])


def contrasts(groups: dict[tuple, list[float]]) -> list[str]:
    """Welch's t test (two-sided; kdgraph.sweep.welch) of each pair of methods, per fraction and budget."""
    from kdgraph.sweep import welch

    out = ["| fraction | epochs | a − b | Δ | p (Welch) |", "|---|---|---|---|---|"]
    for fraction, epochs in sorted({k[:2] for k in groups}):
        for a, b in (("kd", "stablekd-5/2"), ("kd", "stablekd-5/2-proj"), ("stablekd-5/2-proj", "stablekd-5/2")):
            w = welch(groups.get((fraction, epochs, a), []), groups.get((fraction, epochs, b), []))
            if w is not None:
                out.append(f"| {fraction} | {epochs} | {a} − {b} | {w['diff']:+.2f} | {w['p']:.2g} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--width-div", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX files (default Debian's)")
    p.add_argument("--work", default="runs/adapter-free")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=3, help="in all (StableKD-5/2: one per training stage at 3)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher-fraction", type=float, default=0.5)
    p.add_argument("--results", default=None, help="default bench/results/adapter-free-{full|wN}.jsonl")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    args.jobs = 1  # study.run_cells: one cell at a time, in order
    results = Path(args.results or RESULTS / f"adapter-free-{_tag(args)}.jsonl")
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(results))
        return
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    _, tsum = teacher(args)
    row = {"cell": f"af-teacher-r50-{_tag(args)}", "method": "teacher", "width_div": args.width_div,
           "top1": tsum["student_top1"], "epochs": tsum["epochs"], "wall_s": tsum["wall_time_s"]}
    if row["cell"] not in study._done(results):
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"teacher top-1 {tsum['student_top1']:.2f}%", flush=True)
    cells = [{"method": m, "seed": s, "fraction": args.fraction} for s in args.seeds for m in args.methods]
    study.run_cells(args, results, cells, spec_of=lambda a, method, seed, fraction: cell_spec(a, method, seed))
    print(f"finished in {time.perf_counter() - t0:.0f} s", flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
