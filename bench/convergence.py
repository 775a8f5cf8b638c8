"""The StableKD evidence study: accuracy vs epoch budget, data fraction and method.

Runs kdgraph's own runtime (`kdgraph.runtime.loop.train`) over a grid of cells
(pair x method x budget x fraction x seed) and appends one JSON line per finished cell
to the results file, so an interrupted study resumes where it stopped (finished cells
are skipped). Then `--report` draws the plots and prints the tables for BENCHMARKS.md.

Pairs (kdgraph.zoo, 4 blocks: layer1, layer2, layer3, head):
  same      teacher resnet_tiny_teacher (32/64/128, 2 blocks per stage)
            -> resnet_tiny_student_same (32/64/128, 1 block per stage): no adapters
  narrow    the same teacher -> resnet_tiny_student (16/32/64): 1x1 lift/lower at every cut
Methods: supervised (no teacher), kd, kd+mse, stablekd-4/0, stablekd-4/1, stablekd-4/2
(4 blocks reach one after two recompositions, so 4/2 ends end-to-end: the n = k-1 case
of the issue becomes n = ceil(log2 k) here).

    python bench/convergence.py --dataset digits --sweep          # per-method learning rates
    python bench/convergence.py --dataset digits                  # the grid (resumable)
    python bench/convergence.py --dataset digits --quick          # a CI-sized subset
    python bench/convergence.py --dataset digits --report         # plots + markdown tables
Fashion-MNIST needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)
or --root pointing at its IDX files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

RESULTS = Path("bench/results")
PAIRS = {
    "same": ("resnet_tiny_teacher", "resnet_tiny_student_same"),
    "narrow": ("resnet_tiny_teacher", "resnet_tiny_student"),
}
METHODS = {  # name -> (schedule.method, recompositions)
    "supervised": ("supervised", 0),
    "kd": ("kd", 0),
    "kd+mse": ("kd+mse", 0),
    "stablekd-4/0": ("stablekd", 0),
    "stablekd-4/1": ("stablekd", 1),
    "stablekd-4/2": ("stablekd", 2),
}
DATASETS = {  # input size, batch size, epoch budgets (1x .. 10x), teacher epochs
    # digits has 22 steps per epoch: budgets are larger so that a 3-stage StableKD gets a
    # few dozen steps per stage at the smallest one.
    "digits": {"input_size": [1, 8, 8], "batch_size": 64, "budgets": [5, 10, 25, 50], "teacher_epochs": 30},
    # CPU-sized: 16x16 inputs; E = 3 and 5E = 15 epochs (3 is the least a 3-stage StableKD can split).
    "fashion-mnist": {"input_size": [1, 16, 16], "batch_size": 128, "budgets": [3, 15], "teacher_epochs": 6},
}
SWEEP_LRS = [0.05, 0.1, 0.2, 0.5]
DEFAULT_LR = 0.1


def _base_spec(args, name: str, output: Path) -> dict:
    d = DATASETS[args.dataset]
    data = {"dataset": args.dataset, "input_size": d["input_size"], "batch_size": d["batch_size"]}
    if args.root:
        data["root"] = args.root
    return {"name": name, "data": data, "output": str(output),
            "decompose": {"blocks": 4, "adapters": "in_path"},  # as the committed results were run
            "optim": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                      "decay_norms_and_biases": True},  # as the committed results were run
            "runtime": {"device": args.device, "log_every": 1000, "num_threads": args.threads}}


def train_once(spec_dict: dict) -> tuple[dict, list[dict]]:
    from kdgraph.runtime.loop import train
    from kdgraph.spec import load_spec

    spec = load_spec(spec_dict)
    # a run the study was killed in continues from its last checkpoint
    resume = (spec.output_dir / "checkpoints" / "last.pt").exists() and not (spec.output_dir / "summary.json").exists()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(spec, resume=resume, quiet=True, force=not resume)
    records = [json.loads(ln) for ln in (spec.output_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return summary, records


def teacher_checkpoint(args) -> tuple[Path, float]:
    """Train the teacher once (supervised kdgraph run) and cache it."""
    out = Path(args.work) / f"teacher-{args.dataset}"
    ckpt = out / "student.safetensors"
    if not (out / "summary.json").exists():
        spec = _base_spec(args, f"teacher-{args.dataset}", out)
        spec["student"] = {"model": f"module:kdgraph.zoo:{PAIRS['same'][0]}", "kwargs": {"num_classes": 10, "in_chans": 1}}
        spec["schedule"] = {"method": "supervised", "epochs": DATASETS[args.dataset]["teacher_epochs"]}
        spec["optim"].update(lr=0.1, lr_schedule="onecycle")
        spec["decompose"] = {"blocks": 1}
        print(f"training the {args.dataset} teacher ...", flush=True)
        train_once(spec)
    return ckpt, json.loads((out / "summary.json").read_text())["student_top1"]


def cell_spec(args, pair: str, method: str, budget: int, fraction: float, seed: int, lr: float,
              track: bool = False) -> dict:
    teacher, student = PAIRS[pair]
    kind, n = METHODS[method]
    name = f"{args.dataset}-{pair}-{method}-e{budget}-f{fraction}-s{seed}-lr{lr}" + ("-track" if track else "")
    out = Path(args.work) / name.replace("/", "_")
    spec = _base_spec(args, name, out)
    spec["seed"] = seed
    spec["data"]["fraction"] = fraction
    spec["student"] = {"model": f"module:kdgraph.zoo:{student}", "kwargs": {"num_classes": 10, "in_chans": 1}}
    if kind != "supervised":
        ckpt, _ = teacher_checkpoint(args)
        spec["teacher"] = {"model": f"module:kdgraph.zoo:{teacher}", "kwargs": {"num_classes": 10, "in_chans": 1},
                           "checkpoint": str(ckpt)}
    spec["schedule"] = {"method": kind, "recompositions": n, "epochs": budget}
    # stage_cyclic is the paper's schedule for StableKD; with one stage it is a one-cycle
    # triangle, so every method gets the same shape of schedule.
    spec["optim"].update(lr=lr, lr_schedule="stage_cyclic")
    spec["runtime"]["track_stability"] = track
    return spec


def done_cells(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {r["cell"]: r for r in rows}


def run_cell(args, results: Path, done: dict, **cell) -> dict:
    spec = cell_spec(args, **cell)
    key = spec["name"]
    if key in done:
        return done[key]
    t0 = time.perf_counter()
    summary, records = train_once(spec)
    row = {"cell": key, "dataset": args.dataset, **cell,
           "top1": summary["student_top1"], "teacher_top1": summary["teacher_top1"],
           "curve": [r["student_top1"] for r in records if r["kind"] == "epoch"],
           "wall_s": round(time.perf_counter() - t0, 2)}
    if cell.get("track"):
        row["stability"] = [r["dtheta_block4"] for r in records if r["kind"] == "stability"]
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    done[key] = row
    print(f"{key}: top-1 {row['top1']:.2f}%  ({row['wall_s']:.1f} s)", flush=True)
    return row


def sweep(args, results: Path) -> dict[str, float]:
    """Best learning rate per method: smallest budget, seed 0, pair 'narrow' (--sweep-fraction of the data)."""
    done = done_cells(results)
    budget = DATASETS[args.dataset]["budgets"][0]
    best = {}
    for method in args.methods:
        scores = {lr: run_cell(args, results, done, pair="narrow", method=method, budget=budget,
                               fraction=args.sweep_fraction, seed=0, lr=lr)["top1"] for lr in args.sweep_lrs}
        best[method] = max(scores, key=scores.get)
        print(f"sweep {method}: " + ", ".join(f"lr {k}: {v:.2f}" for k, v in scores.items())
              + f" -> {best[method]}", flush=True)
    return best


def tuned_lrs(results_sweep: Path, methods, budget: int) -> dict[str, float]:
    done = done_cells(results_sweep)
    best = {}
    for method in methods:
        rows = [r for r in done.values() if r["method"] == method and r["budget"] == budget]
        best[method] = max(rows, key=lambda r: r["top1"])["lr"] if rows else DEFAULT_LR
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
    p.add_argument("--root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/convergence")
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budgets", nargs="*", type=int, default=None)
    p.add_argument("--fractions", nargs="*", type=float, default=[0.2, 1.0])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="a CI-sized subset: narrow pair, smallest budget, seed 0")
    p.add_argument("--sweep", action="store_true", help="only the learning-rate sweep")
    p.add_argument("--stability", action="store_true", help="only the stability runs (kd vs stablekd-4/0)")
    p.add_argument("--sweep-lrs", nargs="*", type=float, default=SWEEP_LRS)
    p.add_argument("--sweep-fraction", type=float, default=1.0)
    p.add_argument("--lrs-from", default=None, choices=list(DATASETS),
                   help="use the learning rates tuned on another dataset's sweep")
    p.add_argument("--report", action="store_true", help="plots and markdown from the results")
    p.add_argument("--results", default=None, help="results file (default bench/results/convergence-DATASET.jsonl)")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or RESULTS / f"convergence-{args.dataset}.jsonl")
    results_sweep = RESULTS / f"sweep-{args.dataset}.jsonl"
    if args.report:
        from report import write_report  # bench/report.py

        print(write_report(results, results_sweep, RESULTS, args.dataset))
        return
    if args.sweep:
        sweep(args, results_sweep)
        return
    budgets = args.budgets or DATASETS[args.dataset]["budgets"]
    if args.quick:
        args.pairs, args.seeds, args.fractions, budgets = ["narrow"], [0], [0.2], budgets[:1]
    sweep_of = args.lrs_from or args.dataset
    lrs = tuned_lrs(RESULTS / f"sweep-{sweep_of}.jsonl", args.methods, DATASETS[sweep_of]["budgets"][0])
    _, teacher_top1 = teacher_checkpoint(args)
    print(f"teacher top-1 {teacher_top1:.2f}%; learning rates {lrs}", flush=True)
    done = done_cells(results)
    if args.stability:
        for method in ("kd", "stablekd-4/0"):
            run_cell(args, results, done, pair="narrow", method=method, budget=budgets[1] if len(budgets) > 1
                     else budgets[0], fraction=1.0, seed=0, lr=lrs.get(method, DEFAULT_LR), track=True)
        return
    for seed in args.seeds:  # seeds outermost: a partial study still covers every cell once
        for fraction in args.fractions:
            for budget in budgets:
                for pair in args.pairs:
                    for method in args.methods:
                        run_cell(args, results, done, pair=pair, method=method, budget=budget,
                                 fraction=fraction, seed=seed, lr=lrs[method])


if __name__ == "__main__":
    main()
