"""StableKD evidence at the paper's shape: ResNet-34 -> ResNet-18, k = 5, Fashion-MNIST at 32 px.

Pair: timm ``resnet34`` -> ``resnet18`` (1-channel input, 10 classes), decomposed into
k = 5 blocks (stem + layer1, layer2, layer3, layer4, head). Full width on a GPU; with
``--width-div 4`` every width is divided by 4 (timm's ``channels`` and ``stem_width``), the
size a 2-core CPU can run. Data: Fashion-MNIST padded to 32 px, 100 % or 20 % of the
training split, the test split for evaluation. The teacher is trained here by kdgraph
(supervised, OneCycle); its summary is a result, its weights are not committed.

Methods, as the paper runs them (batch 128, SGD momentum 0.9, weight decay 5e-4, T = 1):
  supervised           CE only, OneCycle at lr 0.1
  kd                   CE + KL, OneCycle at lr 0.1 (the paper's baseline)
  kd-best              CE + KL, OneCycle at the best lr of a small sweep (--block sweep)
  kd+mse               CE + KL + MSE at every block end (1x1 projectors), OneCycle at 0.1
  stablekd-5/0, 5/2, 5/3   triangular2 cycles per stage (stage_cyclic), peak lr 0.5, no BN
                       re-estimation (as in the paper)
  stablekd-5/N+bn      the same with kdgraph's BatchNorm re-estimation before evaluation
Budgets: E epochs in all, E = 3 on 100 % and 15 on 20 % at x1 (every decomposition
stage of 5/2 gets >= 450 optimizer steps), then x2, x4, x8.

Every cell appends one JSON line to the results file when it finishes; finished cells are
skipped, and a cell killed mid-run resumes from its checkpoint. Cells run side by side
(--jobs; several on one GPU, two on 2 CPU cores).

    python bench/stablekd_study.py --device cuda --jobs 8 --block main   # the main comparison
    python bench/stablekd_study.py --device cuda --jobs 8 --block sweep  # KD lr sweep -> kd-best
    python bench/stablekd_study.py --device cuda --jobs 8 --block full   # every cell
    python bench/stablekd_study.py --device cuda --block stability       # Fig. 1 diagnostic
    python bench/stablekd_study.py --device cuda --jobs 10 --block h100-open  # issue 38's open cells
    python bench/stablekd_study.py --width-div 4 --jobs 2 --block main   # CPU-sized
    python bench/stablekd_study.py --report                              # tables + plots
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path("bench/results")
BASE_EPOCHS = {1.0: 3, 0.2: 15}  # x1 budget per fraction: >= 450 steps per decomposition stage
MULTS = (1, 2, 4, 8)
SWEEP_LRS = (0.05, 0.1, 0.2, 0.4)
TEACHER_EPOCHS = {1: 15, 4: 8}  # by width divisor

# name -> (schedule.method, recompositions, lr schedule, peak lr, bn re-estimation)
METHODS = {
    "supervised": ("supervised", 0, "onecycle", 0.1, False),
    "kd": ("kd", 0, "onecycle", 0.1, False),
    "kd-best": ("kd", 0, "onecycle", None, False),
    "kd+mse": ("kd+mse", 0, "onecycle", 0.1, False),
    "stablekd-5/0": ("stablekd", 0, "stage_cyclic", 0.5, False),
    "stablekd-5/2": ("stablekd", 2, "stage_cyclic", 0.5, False),
    "stablekd-5/3": ("stablekd", 3, "stage_cyclic", 0.5, False),
    "stablekd-5/0+bn": ("stablekd", 0, "stage_cyclic", 0.5, True),
    "stablekd-5/2+bn": ("stablekd", 2, "stage_cyclic", 0.5, True),
    "stablekd-5/3+bn": ("stablekd", 3, "stage_cyclic", 0.5, True),
}
BLOCKS = {  # block -> (methods, budget multipliers); fractions and seeds from the command line
    "main": (("kd", "kd+mse", "stablekd-5/2"), (1, 2)),
    "wide": (("supervised", "kd", "kd-best", "kd+mse", "stablekd-5/0", "stablekd-5/2", "stablekd-5/3",
              "stablekd-5/2+bn"), (1, 2)),
    "full": (tuple(METHODS), (1, 2, 4)),
    "x8": (("kd", "kd-best", "kd+mse", "stablekd-5/2"), (8,)),
}
# --block h100-open: the full-width cells the audit left open (issue 38 item 4), x1 on 20 % of the
# data, every --seeds: (method, peak lr, runtime.bn_recalibrate). Their rows carry "block"; the
# report's tables leave them out (an lr or a re-estimation other than their method's).
H100_OPEN = (("stablekd-5/0", 0.5, "auto"), ("stablekd-5/0", 1.0, "auto"), ("stablekd-5/2", 0.5, "auto"),
             ("stablekd-5/2", 1.0, "auto"), ("kd", 0.2, None))


def _model(name: str, width_div: int) -> dict:
    kwargs = {"num_classes": 10, "in_chans": 1}
    if width_div > 1:
        kwargs.update(channels=[64 // width_div, 128 // width_div, 256 // width_div, 512 // width_div],
                      stem_width=64 // width_div)
    return {"model": f"timm:{name}", "kwargs": kwargs}


def _spec(args, name: str, out: Path) -> dict:
    data = {"dataset": "fashion-mnist", "input_size": [1, 32, 32], "resize": "pad", "batch_size": 128,
            "test_batch_size": 1000, "augment": "none"}
    if args.root:
        data["root"] = args.root
    return {"name": name, "data": data, "output": str(out), "decompose": {"blocks": 5},
            "optim": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                      "decay_norms_and_biases": True},  # as the committed results were run
            "loss": {"kl_weight": 1.0, "temperature": 1.0, "feature": "mse"},
            "runtime": {"device": args.device, "log_every": 100000, "num_threads": args.threads,
                        "eval_every": 1}}


def _tag(args) -> str:
    return "full" if args.width_div == 1 else f"w{args.width_div}"


def teacher(args) -> tuple[Path, dict]:
    """Train the ResNet-34 teacher once per work folder (supervised, OneCycle at 0.1)."""
    from kdgraph.runtime.runs import RunFolder

    out = RunFolder(Path(args.work) / f"teacher-{_tag(args)}")
    if not out.summary.exists():
        spec = _spec(args, f"teacher-resnet34-{_tag(args)}", out.root)
        spec["student"] = _model("resnet34", args.width_div)
        spec["decompose"] = {"blocks": 1}
        spec["schedule"] = {"method": "supervised",
                            "epochs": args.teacher_epochs or TEACHER_EPOCHS.get(args.width_div, 8)}
        spec["optim"].update(lr=0.1, lr_schedule="onecycle")
        print("training the teacher ...", flush=True)
        _train(spec)
    return out.student, json.loads(out.summary.read_text())


def cell_spec(args, method: str, mult: int, fraction: float, seed: int, lr: float | None = None,
              track: bool = False, sweep: bool = False, bn: bool | str | None = None, block: str | None = None) -> dict:
    """A cell's spec; ``bn`` (runtime.bn_recalibrate) overrides the method's and names the cell."""
    kind, n, schedule, peak, method_bn = METHODS[method]
    lr = lr if lr is not None else peak
    epochs = (args.base_epochs or BASE_EPOCHS[fraction]) * mult
    name = (f"{_tag(args)}-{method}-x{mult}-f{fraction}-s{seed}-lr{lr}" + (f"-bn{bn}" if bn is not None else "")
            + ("-track" if track else ""))
    bn = method_bn if bn is None else bn
    spec = _spec(args, name, Path(args.work) / name.replace("/", "_").replace("+", "p"))
    spec["seed"] = seed
    spec["data"]["fraction"] = fraction
    spec["student"] = _model("resnet18", args.width_div)
    if kind != "supervised":
        ckpt, _ = teacher(args)
        spec["teacher"] = {**_model("resnet34", args.width_div), "checkpoint": str(ckpt)}
    spec["schedule"] = {"method": kind, "epochs": epochs, **({"recompositions": n} if kind == "stablekd" else {})}
    spec["optim"].update(lr=lr, lr_schedule=schedule)
    spec["runtime"]["bn_recalibrate"] = bn
    spec["runtime"]["track_stability"] = track
    return spec


def _train(spec_dict: dict) -> tuple[dict, list[dict]]:
    from kdgraph.runtime.loop import train
    from kdgraph.runtime.runs import RunFolder
    from kdgraph.spec import load_spec

    spec = load_spec(spec_dict)
    folder = RunFolder(spec.output_dir)
    resume = folder.last_checkpoint.exists() and not folder.summary.exists()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(spec, resume=resume, quiet=True, force=not resume)
    records = [json.loads(ln) for ln in folder.metrics.read_text().splitlines() if ln.strip()]
    return summary, records


def _run_cell(job: tuple[dict, dict]) -> dict:
    cell, spec = job
    t0 = time.perf_counter()
    summary, records = _train(spec)
    row = {"cell": spec["name"], **cell, "epochs": spec["schedule"]["epochs"],
           "top1": summary["student_top1"], "teacher_top1": summary["teacher_top1"],
           "curve": [r["student_top1"] for r in records if r["kind"] == "epoch"],
           "images_per_s": summary["mean_images_per_s"], "wall_s": round(time.perf_counter() - t0, 2)}
    if cell.get("track"):
        row["stability"] = [{k: v for k, v in r.items() if k != "kind"} for r in records if r["kind"] == "stability"]
    return row


def _done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["cell"]: r for r in (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_cells(args, results: Path, cells: list[dict], spec_of=None) -> list[dict]:
    """Run the cells not yet in ``results``, ``args.jobs`` at a time; append each as it ends.
    ``spec_of(args, **cell)`` builds a cell's spec dict (default: this study's ``cell_spec``)."""
    spec_of = spec_of or cell_spec
    done = _done(results)
    jobs = []
    for cell in cells:
        spec = spec_of(args, **cell)
        if spec["name"] not in done:
            jobs.append(({"width_div": args.width_div, **cell}, spec))
    print(f"{len(cells) - len(jobs)} of {len(cells)} cells done; running {len(jobs)}", flush=True)
    rows = [done[spec_of(args, **c)["name"]] for c in cells if spec_of(args, **c)["name"] in done]

    def finish(row: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{row['cell']}: top-1 {row['top1']:.2f}%  ({row['wall_s']:.0f} s, "
              f"{row['images_per_s']:.0f} img/s)", flush=True)

    if args.jobs <= 1:
        for job in jobs:
            finish(_run_cell(job))
        return rows
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 2) // args.jobs) if args.threads is None else args.threads
    with mp.get_context("spawn").Pool(args.jobs, initializer=_worker_init, initargs=(threads,)) as pool:
        for row in pool.imap_unordered(_run_cell, jobs):
            finish(row)
    return rows


def best_kd_lr(args, results: Path) -> float:
    rows = [r for r in _done(results).values() if r["method"] == "kd" and r.get("sweep")
            and r["width_div"] == args.width_div]
    if not rows:
        return 0.1
    return max(rows, key=lambda r: r["top1"])["lr"]


def cells_of(args, block: str, results: Path) -> list[dict]:
    if block == "sweep":  # KD at the smallest budget on all the data, seed 0
        return [{"method": "kd", "mult": 1, "fraction": 1.0, "seed": 0, "lr": lr, "sweep": True}
                for lr in SWEEP_LRS]
    if block == "stability":  # Fig. 1: same lr for both methods, x2 budget, all the data
        return [{"method": m, "mult": 2, "fraction": 1.0, "seed": 0, "lr": 0.1, "track": True}
                for m in ("kd", "stablekd-5/0")]
    if block == "h100-open":
        return [{"method": m, "mult": 1, "fraction": 0.2, "seed": seed, "lr": lr, "block": block,
                 **({"bn": bn} if bn is not None else {})} for seed in args.seeds for m, lr, bn in H100_OPEN]
    methods, mults = BLOCKS[block]
    if args.mults:
        mults = tuple(args.mults)
    kd_best = best_kd_lr(args, results)
    cells = []
    for seed, mult, fraction, method in itertools.product(args.seeds, mults, args.fractions, methods):
        cell = {"method": method, "mult": mult, "fraction": fraction, "seed": seed}
        if method == "kd-best":
            cell["lr"] = kd_best
        cells.append(cell)
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", default="main", choices=[*BLOCKS, "sweep", "stability", "h100-open"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width-div", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX files (default Debian's)")
    p.add_argument("--work", default="runs/stablekd-study")
    p.add_argument("--fractions", nargs="*", type=float, default=[1.0, 0.2])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--mults", nargs="*", type=int, default=None)
    p.add_argument("--results", default=None, help="default bench/results/stablekd-study-{full|wN}.jsonl")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override (smoke runs)")
    p.add_argument("--base-epochs", type=int, default=None, help="override the x1 budget (smoke runs)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    results = Path(args.results or RESULTS / f"stablekd-study-{_tag(args)}.jsonl")
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(results, RESULTS))
        return
    t0 = time.perf_counter()
    _, tsum = teacher(args)
    teacher_row = {"cell": f"teacher-{_tag(args)}", "method": "teacher", "width_div": args.width_div,
                   "top1": tsum["student_top1"], "epochs": tsum["epochs"], "wall_s": tsum["wall_time_s"]}
    if teacher_row["cell"] not in _done(results):
        with results.open("a") as f:
            f.write(json.dumps(teacher_row) + "\n")
    print(f"teacher top-1 {tsum['student_top1']:.2f}%", flush=True)
    run_cells(args, results, cells_of(args, args.block, results))
    print(f"block {args.block} finished in {time.perf_counter() - t0:.0f} s", flush=True)


# --- report ---------------------------------------------------------------------------------

ORDER = list(METHODS)


def aggregate(rows: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(width_div, fraction, method, mult) -> (mean, std, n) of final top-1 over seeds."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("track") or r.get("sweep") or r.get("block") or r["method"] == "teacher":
            continue
        groups[(r["width_div"], r["fraction"], r["method"], r["mult"])].append(r["top1"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def table(agg: dict) -> str:
    out = []
    for wd, fraction in sorted({k[:2] for k in agg}, key=lambda t: (t[0], -t[1])):
        mults = sorted({k[3] for k in agg if k[:2] == (wd, fraction)})
        width = "full width" if wd == 1 else f"every width / {wd}"
        base = BASE_EPOCHS[fraction]
        out.append(f"\n**ResNet-34 -> ResNet-18 ({width}), {int(fraction * 100)} % of Fashion-MNIST at 32 px** "
                   "(test top-1 %, mean ± std (seeds))\n")
        out.append("| method | " + " | ".join(f"x{m} ({base * m} ep)" for m in mults) + " |")
        out.append("|---|" + "---|" * len(mults))
        for m in [m for m in ORDER if any(k[2] == m and k[:2] == (wd, fraction) for k in agg)]:
            cells = []
            for mult in mults:
                v = agg.get((wd, fraction, m, mult))
                cells.append(f"{v[0]:.2f} ± {v[1]:.2f} ({v[2]})" if v else "–")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(agg: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({k[:2] for k in agg}, key=lambda t: (t[0], -t[1]))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.6 * max(len(panels), 1), 3.8), squeeze=False)
    for ax, (wd, fraction) in zip(axes[0], panels):
        for m in [m for m in ORDER if any(k[2] == m and k[:2] == (wd, fraction) for k in agg)]:
            pts = sorted((k[3], v) for k, v in agg.items() if k[:3] == (wd, fraction, m))
            ax.errorbar([BASE_EPOCHS[fraction] * b for b, _ in pts], [v[0] for _, v in pts],
                        yerr=[v[1] for _, v in pts], marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epochs (budget)")
        ax.set_ylabel("test top-1 %")
        ax.set_title(f"{'full width' if wd == 1 else f'width/{wd}'}, {int(fraction * 100)} % data")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stability_table(tracked: dict[str, dict]) -> str:
    """Median per-step parameter distance ||θ_t − θ_{t−1}|| per student block (Fig. 1's quantity)."""
    out = ["\n**Stability diagnostic (Fig. 1)**: median per-step ||Δθ|| per student block, x2 budget, "
           "100 % data, lr 0.1 for both\n", "| method | window | " + " | ".join(f"block {b}" for b in range(1, 6)) + " |",
           "|---|---|" + "---|" * 5]
    for method, r in tracked.items():
        steps = r["stability"]
        per_epoch = len(steps) // r["epochs"]
        for name, window in (("first 50 steps", steps[:50]), ("epoch 1", steps[:per_epoch]), ("whole run", steps)):
            meds = [statistics.median(s[f"dtheta_block{b}"] for s in window) for b in range(1, 6)]
            out.append(f"| {method} | {name} | " + " | ".join(f"{m:.4f}" for m in meds) + " |")
    return "\n".join(out)


def plot_stability(tracked: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(18, 3.4), sharey=True)
    for method, r in tracked.items():
        steps = r["stability"]
        xs = [s["global_step"] for s in steps]
        for b, ax in enumerate(axes, start=1):
            ax.plot(xs, [s[f"dtheta_block{b}"] for s in steps], lw=0.6, label=method)
    for b, ax in enumerate(axes, start=1):
        ax.set_title("head (block 5)" if b == 5 else f"block {b}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("||θ_t − θ_{t−1}||")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(results: Path, folder: Path) -> str:
    rows = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()] if results.exists() else []
    agg = aggregate(rows)
    parts = []
    teachers = [r for r in rows if r["method"] == "teacher"]
    for t in teachers:
        parts.append(f"teacher ResNet-34 (width/{t['width_div']}): top-1 {t['top1']:.2f}% after {t['epochs']} epochs")
    sweep = sorted((r["lr"], r["top1"]) for r in rows if r.get("sweep"))
    if sweep:
        parts.append("KD lr sweep (x1, 100 %, seed 0): " + ", ".join(f"lr {lr}: {t:.2f}" for lr, t in sweep))
    parts.append(table(agg))
    tracked = {r["method"]: r for r in rows if r.get("track")}
    if tracked:
        parts.append(stability_table(tracked))
        parts.append(f"\nstability plot: {plot_stability(tracked, folder / f'{results.stem}-stability.png')}")
    if agg:
        png = plot(agg, folder / f"{results.stem}.png")
        parts.append(f"\nplot: {png}")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
