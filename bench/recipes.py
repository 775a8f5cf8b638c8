"""The recipe table: which logit loss, with or without StableKD, at which data budget.

Pair: stablekd_study's, timm ``resnet34`` -> ``resnet18`` (1 channel, 10 classes), k = 5
blocks, Fashion-MNIST padded to 32 px, crop+flip on; on 2 CPU cores every width divided by
``--width-div`` (default 8), full width with ``--device cuda --width-div 1``. The teacher is
stablekd_study's (trained here once, supervised, OneCycle), shared by every cell.

Recipes (batch 128, SGD momentum 0.9, weight decay 5e-4; CE weight 1 unless said):
  supervised        CE only, OneCycle
  kd                CE + KL at T 4 (Hinton), OneCycle
  kd+ls             CE + 9 KL of Z-scored logits at base T 2 (Sun et al.'s CIFAR recipe), OneCycle
  dkd               CE + DKD, alpha 1, beta 8, T 4, warm-up over the first 1/12 of the epochs
                    (mdistiller's CIFAR setting: 20 of 240), OneCycle
  dist              CE + DIST, beta 1, gamma 1, tau 1 (the authors' code's defaults), OneCycle
  stablekd-5/2      StableKD, 2 recompositions, kd's KL (T 4) as head loss, stage_cyclic (StableKD's)
  stablekd-5/2+best the same with the head loss of the best of kd+ls / dkd / dist on 20 % (mean
                    over seeds, chosen when those cells are done; its name says which), at
                    stablekd-5/2's learning rate
  fm                function matching (Beyer et al.): mixup 0.8 / cutmix 1.0 (switch 0.5) on the
                    one batch teacher and student both see, KL only (CE weight 0, T 1), 2x epochs
Budgets: the same number of optimizer steps at both fractions, 3 epochs on 100 % and 15 on
20 % (x1; fm x2). Seeds 0, 1, 2. Learning rates: each recipe's best of a 3-point sweep on
seed 0 at 20 % (the sweep's best cell is then that seed's cell, not run twice).

The loss and mixup fields are kdgraph's spec fields of issue 22 (``loss.logit``,
``loss.standardize``, ``loss.ce_weight``, ``loss.dkd_*``, ``loss.dist_*``, ``data.mixup``),
written in one place, ``RECIPES``; ``--dry-run`` validates every cell's spec.

Every cell appends one JSON line to bench/results/recipes-{wN|full}.jsonl when it finishes;
a finished cell is skipped on a rerun and a killed one resumes from its checkpoint.

    python bench/recipes.py --estimate                 # one short KD cell: seconds per cell, grid total
    python bench/recipes.py --jobs 2                   # the whole grid on 2 CPU cores (resumable)
    python bench/recipes.py --block sweep              # only the learning-rate sweep
    python bench/recipes.py --device cuda --width-div 1 --jobs 8   # full width on a GPU
    python bench/recipes.py --report                   # tables (mean ± std) + plot
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stablekd_study as study  # noqa: E402  (bench/stablekd_study.py: teacher, model, cell runner)

RESULTS = Path("bench/results")
BASE_EPOCHS = {1.0: 3, 0.2: 15}  # x1: the same 1,410 optimizer steps on either fraction
SWEEP_FRACTION = 0.2
ONECYCLE_LRS = (0.05, 0.1, 0.2)
CYCLIC_LRS = (0.25, 0.5, 1.0)  # stage_cyclic peaks halve each stage; StableKD's paper uses 0.5
LOGIT_RECIPES = ("kd+ls", "dkd", "dist")  # candidates for StableKD's head loss
FM_MIXUP = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}

# name -> schedule.method, recompositions, lr schedule, swept lrs, loss fields, data fields, budget x
RECIPES: dict[str, dict] = {
    "supervised": dict(method="supervised", lr_schedule="onecycle", lrs=ONECYCLE_LRS, loss={}),
    "kd": dict(method="kd", lr_schedule="onecycle", lrs=ONECYCLE_LRS, loss={"temperature": 4.0}),
    "kd+ls": dict(method="kd", lr_schedule="onecycle", lrs=ONECYCLE_LRS,
                  loss={"logit": "kl", "standardize": True, "temperature": 2.0, "kl_weight": 9.0}),
    "dkd": dict(method="kd", lr_schedule="onecycle", lrs=ONECYCLE_LRS,
                loss={"logit": "dkd", "temperature": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}),
    "dist": dict(method="kd", lr_schedule="onecycle", lrs=ONECYCLE_LRS,
                 loss={"logit": "dist", "temperature": 1.0, "dist_beta": 1.0, "dist_gamma": 1.0}),
    # kd's KL in the head block: against kd, only the blockwise schedule differs
    "stablekd-5/2": dict(method="stablekd", recompositions=2, lr_schedule="stage_cyclic", lrs=CYCLIC_LRS,
                         loss={"temperature": 4.0}),
    "stablekd-5/2+best": dict(method="stablekd", recompositions=2, lr_schedule="stage_cyclic", lrs=(),
                              loss=None),  # the head loss of the best LOGIT_RECIPES entry
    "fm": dict(method="kd", lr_schedule="onecycle", lrs=ONECYCLE_LRS, mult=2,
               loss={"temperature": 1.0, "ce_weight": 0.0}, data={"mixup": FM_MIXUP}),
}
ORDER = list(RECIPES)


def _tag(args) -> str:
    return study._tag(args)


def recipe_spec(args, method: str, fraction: float, seed: int, lr: float, head: str | None = None,
                sweep: bool = False, tag: str | None = None) -> dict:
    """The kdgraph spec dict of one cell. ``head`` names the logit recipe whose loss fields
    stablekd-5/2+best uses; ``sweep`` and ``tag`` only label the result row (a sweep cell and
    the main cell it stands for share one name, so the grid runs it once)."""
    r = RECIPES[method]
    mult = r.get("mult", 1)
    epochs = (args.base_epochs or BASE_EPOCHS[fraction]) * mult
    loss = copy.deepcopy(RECIPES[head]["loss"] if r["loss"] is None else r["loss"])
    label = method.replace("best", head) if head else method
    name = f"{_tag(args)}-{label}-e{epochs}-f{fraction}-s{seed}-lr{lr}"
    spec = study._spec(args, name, Path(args.work) / name.replace("/", "_").replace("+", "p"))
    spec["seed"] = seed
    spec["data"].update(fraction=fraction, augment="crop+flip", **copy.deepcopy(r.get("data", {})))
    spec["student"] = study._model("resnet18", args.width_div)
    if r["method"] != "supervised":
        spec["teacher"] = {**study._model("resnet34", args.width_div), "checkpoint": str(args.teacher_ckpt)}
    if loss.get("logit") == "dkd":
        loss["dkd_warmup_epochs"] = epochs / 12  # mdistiller: 20 of 240 epochs
    spec["loss"] = {k: v for k, v in spec["loss"].items() if k != "temperature"} | loss
    spec["schedule"] = {"method": r["method"], "epochs": epochs,
                        **({"recompositions": r["recompositions"]} if "recompositions" in r else {})}
    spec["optim"].update(lr=lr, lr_schedule=r["lr_schedule"])
    # evaluate ~3 times a run (and always after the last epoch): 10k test images per evaluation
    # would otherwise cost a third of a 20 % cell on the CPU
    spec["runtime"]["eval_every"] = max(1, epochs // 3)
    return spec


# --- which cells, in which order ---------------------------------------------------------------

def best_lrs(rows: list[dict], tag: str) -> dict[str, float]:
    """Each recipe's best learning rate of its sweep (seed 0, 20 %; ties: the first run)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.get("sweep") and r.get("tag") == tag and (r["method"] not in best or r["top1"] > best[r["method"]][1]):
            best[r["method"]] = (r["lr"], r["top1"])
    return {m: v[0] for m, v in best.items()}


def best_head(results: Path, tag: str) -> str | None:
    """The LOGIT_RECIPES entry with the best mean top-1 on 20 % (main cells), None before any ran."""
    agg = aggregate([r for r in study._done(results).values() if r.get("tag") == tag])
    scores = {m: agg[(SWEEP_FRACTION, m)][0] for m in LOGIT_RECIPES if (SWEEP_FRACTION, m) in agg}
    return max(scores, key=scores.get) if scores else None


def sweep_cells(methods) -> list[dict]:
    return [{"method": m, "fraction": SWEEP_FRACTION, "seed": 0, "lr": lr, "sweep": True}
            for m in methods for lr in RECIPES[m]["lrs"]]


def main_cells(args, methods, lrs: dict[str, float], head: str | None) -> list[dict]:
    cells = []
    for seed in args.seeds:  # seeds outermost: a partial grid still covers every recipe once
        for fraction in args.fractions:
            for m in methods:
                if m == "stablekd-5/2+best":
                    if head is None:
                        continue
                    cells.append({"method": m, "fraction": fraction, "seed": seed, "head": head,
                                  "lr": lrs.get("stablekd-5/2", 0.5)})
                else:
                    cells.append({"method": m, "fraction": fraction, "seed": seed,
                                  "lr": lrs.get(m, RECIPES[m]["lrs"][1])})
    return cells


def run(args, results: Path) -> None:
    tag = _tag(args)
    sweepable = [m for m in args.methods if RECIPES[m]["lrs"]]
    tagged = lambda cells: [{**c, "tag": tag} for c in cells]  # noqa: E731
    study.run_cells(args, results, tagged(sweep_cells(sweepable)), spec_of=recipe_spec)
    if args.block == "sweep":
        return
    lrs = best_lrs(list(study._done(results).values()), tag)
    print("learning rates: " + ", ".join(f"{m} {lr}" for m, lr in lrs.items()), flush=True)
    first = [m for m in args.methods if m != "stablekd-5/2+best"]
    study.run_cells(args, results, tagged(main_cells(args, first, lrs, None)), spec_of=recipe_spec)
    if "stablekd-5/2+best" in args.methods:
        head = best_head(results, tag)
        if head is None:
            print("stablekd-5/2+best: no logit recipe has finished on 20 %; run kd+ls, dkd or dist first", flush=True)
            return
        print(f"stablekd-5/2+best: head loss of {head}", flush=True)
        study.run_cells(args, results, tagged(main_cells(args, ["stablekd-5/2+best"], lrs, head)),
                        spec_of=recipe_spec)


def dry_run(args) -> None:
    """Every cell of the grid (the sweep's best lr and the best head taken as the defaults), each
    spec validated by kdgraph's schema: says which recipes need the proposed spec fields."""
    from kdgraph.errors import SpecError
    from kdgraph.spec import load_spec

    args.teacher_ckpt = Path(args.work) / f"teacher-{_tag(args)}" / "student.safetensors"
    sweepable = [m for m in args.methods if RECIPES[m]["lrs"]]
    cells = sweep_cells(sweepable) + main_cells(args, args.methods, {}, LOGIT_RECIPES[0])
    names, verdicts = set(), defaultdict(set)
    for c in cells:
        spec = recipe_spec(args, **c)
        names.add(spec["name"])
        try:
            load_spec(spec)
            verdicts[c["method"]].add("valid")
        except SpecError as e:
            verdicts[c["method"]].add("; ".join(ln.split(":")[0] for ln in str(e).splitlines()))
    print(f"{len(names)} cells ({grid_units(args)} x1-cell equivalents with the sweep's best reused)")
    for m, v in verdicts.items():
        print(f"  {m}: {'; '.join(sorted(v))}")


# --- cost estimate -----------------------------------------------------------------------------

FASHION_TRAIN = 60_000


def estimate(args) -> None:
    """One KD cell of one epoch on 20 % with an untrained teacher of the pair (the weights do not
    change the cost), extrapolated to an x1 cell and the whole grid at ``--jobs``."""
    spec = recipe_spec(args, "supervised", SWEEP_FRACTION, 0, lr=0.1)
    spec["name"] = f"estimate-{_tag(args)}"
    spec["output"] = str(Path(args.work) / spec["name"])
    spec["teacher"] = study._model("resnet34", args.width_div)
    spec["schedule"] = {"method": "kd", "epochs": 1}
    spec["loss"]["temperature"] = 4.0
    t0 = time.perf_counter()
    summary, _ = study._train(spec)
    print(extrapolate(args, time.perf_counter() - t0, summary["mean_images_per_s"]), flush=True)


def extrapolate(args, wall_s: float, images_per_s: float) -> str:
    """An x1 cell from one measured epoch: BASE_EPOCHS[0.2] epochs of training, plus twice the
    measured rest (setup, one teacher and one student evaluation) for a cell's ~3-5
    evaluations; the teacher as its epochs of 100 % at 1.5x a KD step's cost per image."""
    train_s = SWEEP_FRACTION * FASHION_TRAIN / images_per_s
    rest = max(wall_s - train_s, 0.0)
    cell = BASE_EPOCHS[SWEEP_FRACTION] * train_s + 2 * rest
    teacher = (args.teacher_epochs or study.TEACHER_EPOCHS.get(args.width_div, 8)) * 1.5 * FASHION_TRAIN / images_per_s
    units = grid_units(args)
    total = units * cell / max(args.jobs, 1) + teacher
    return (f"1 epoch of 20 %: {wall_s:.0f} s ({images_per_s:.0f} img/s training, {args.threads or 'default'} "
            f"thread(s)); an x1 cell ~{cell:.0f} s; {units} x1 cells at --jobs {args.jobs} + the teacher "
            f"(~{teacher / 60:.0f} min) ~{total / 3600:.1f} h")


def grid_units(args) -> int:
    """x1-cell equivalents of the whole grid: sweep + main cells, minus the main cells the sweep ran."""
    sweep = sum(len(RECIPES[m]["lrs"]) * RECIPES[m].get("mult", 1) for m in args.methods)
    main = sum(RECIPES[m].get("mult", 1) for m in args.methods) * len(args.seeds) * len(args.fractions)
    reused = sum(RECIPES[m].get("mult", 1) for m in args.methods if RECIPES[m]["lrs"])
    return sweep + main - reused


# --- report ------------------------------------------------------------------------------------

def _label(r: dict) -> str:
    return f"stablekd-5/2+{r['head']}" if r["method"] == "stablekd-5/2+best" else r["method"]


def aggregate(rows: list[dict]) -> dict[tuple[float, str], tuple[float, float, int]]:
    """(fraction, recipe) -> (mean, std, n) of the final top-1 over seeds (main cells only: a
    sweep cell counts where it is the recipe's best lr, as the grid reuses it)."""
    tags = {r.get("tag") for r in rows}
    best = {t: best_lrs(rows, t) for t in tags}
    groups: dict[tuple[float, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("method") == "teacher":
            continue
        if r.get("sweep") and best[r.get("tag")].get(r["method"]) != r["lr"]:
            continue
        groups[(r["fraction"], _label(r))].append(r["top1"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def _labels(agg: dict) -> list[str]:
    """Recipes present, in ORDER, stablekd-5/2+HEAD after stablekd-5/2."""
    present = {k[1] for k in agg}
    named = [m for m in ORDER if m in present]
    heads = sorted(m for m in present if m.startswith("stablekd-5/2+"))
    at = named.index("stablekd-5/2") + 1 if "stablekd-5/2" in named else len(named)
    return named[:at] + heads + named[at:]


def table(agg: dict, title: str) -> str:
    fractions = sorted({k[0] for k in agg})
    labels = _labels(agg)
    kd = {f: agg.get((f, "kd")) for f in fractions}
    out = [f"\n**{title}** (test top-1 %, mean ± std over seeds (n); Δ vs kd)\n",
           "| recipe | " + " | ".join(f"{int(f * 100)} % of train | Δ kd" for f in fractions) + " |",
           "|---|" + "---|---|" * len(fractions)]
    for m in labels:
        cells = []
        for f in fractions:
            v = agg.get((f, m))
            cells.append(f"{v[0]:.2f} ± {v[1]:.2f} ({v[2]})" if v else "–")
            cells.append(f"{v[0] - kd[f][0]:+.2f}" if v and kd[f] and m != "kd" else "")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(agg: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({k[0] for k in agg})
    labels = _labels(agg)
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 3.8), squeeze=False)
    for ax, f in zip(axes[0], fractions):
        ms = [m for m in labels if (f, m) in agg]
        ax.bar(range(len(ms)), [agg[(f, m)][0] for m in ms], yerr=[agg[(f, m)][1] for m in ms], capsize=3)
        ax.set_xticks(range(len(ms)), ms, rotation=40, ha="right", fontsize=8)
        lo = min(agg[(f, m)][0] - agg[(f, m)][1] for m in ms)
        ax.set_ylim(lo - 1.0, max(agg[(f, m)][0] + agg[(f, m)][1] for m in ms) + 0.5)
        if (f, "kd") in agg:
            ax.axhline(agg[(f, "kd")][0], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{int(f * 100)} % of Fashion-MNIST train")
        ax.set_ylabel("test top-1 %")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: Path) -> str:
    rows = list(study._done(results).values())
    if not rows:
        return f"{results}: no results yet"
    parts = []
    for t in (r for r in rows if r.get("method") == "teacher"):
        parts.append(f"teacher ResNet-34 ({t['tag']}): top-1 {t['top1']:.2f}% after {t['epochs']} epochs")
    sweeps = defaultdict(list)
    for r in rows:
        if r.get("sweep"):
            sweeps[_label(r)].append((r["lr"], r["top1"]))
    if sweeps:
        parts.append("\nlr sweep (seed 0, 20 %): " + "; ".join(
            f"{m}: " + ", ".join(f"{lr} → {t:.2f}" for lr, t in sorted(v)) for m, v in sweeps.items()))
    costs = [r["wall_s"] / RECIPES[r["method"]].get("mult", 1) for r in rows if r.get("method") in RECIPES]
    if costs:
        parts.append(f"\nx1 cell wall time: median {statistics.median(costs):.0f} s over {len(costs)} cells")
    agg = aggregate(rows)
    parts.append(table(agg, f"ResNet-34 → ResNet-18 ({results.stem}), Fashion-MNIST 32 px, crop+flip"))
    parts.append(f"\nplot: {plot(agg, results.with_suffix('.png'))}")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", default="all", choices=["all", "sweep"])
    p.add_argument("--methods", nargs="*", default=ORDER, choices=ORDER)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width-div", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: cores / jobs)")
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX files (default Debian's)")
    p.add_argument("--work", default="runs/recipes")
    p.add_argument("--fractions", nargs="*", type=float, default=[0.2, 1.0])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--results", default=None, help="default bench/results/recipes-{full|wN}.jsonl")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override (smoke runs)")
    p.add_argument("--base-epochs", type=int, default=None, help="override the x1 budget (smoke runs)")
    p.add_argument("--estimate", action="store_true", help="time one short cell, extrapolate the grid")
    p.add_argument("--dry-run", action="store_true", help="list the grid's cells and check their specs; train nothing")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    results = Path(args.results or RESULTS / f"recipes-{_tag(args)}.jsonl")
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(results))
        return
    if args.estimate:
        estimate(args)
        return
    if args.dry_run:
        dry_run(args)
        return
    t0 = time.perf_counter()
    args.teacher_ckpt, tsum = study.teacher(args)
    print(f"teacher top-1 {tsum['student_top1']:.2f}%", flush=True)
    teacher_row = {"cell": f"recipes-teacher-{_tag(args)}", "method": "teacher", "tag": _tag(args),
                   "top1": tsum["student_top1"], "epochs": tsum["epochs"], "wall_s": tsum["wall_time_s"]}
    if teacher_row["cell"] not in study._done(results):
        with results.open("a") as f:
            f.write(json.dumps(teacher_row) + "\n")
    run(args, results)
    print(f"finished in {time.perf_counter() - t0:.0f} s; python bench/recipes.py --report", flush=True)


if __name__ == "__main__":
    main()
