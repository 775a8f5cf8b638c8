"""Diffusion evidence (issue 26, item 7): class-conditional DDPM students on Fashion-MNIST (28 px),
trained from scratch, by output KD, by BK-SDM's output + feature KD and by StableKD-4/2, at equal
training images, judged by the Fréchet distance in a classifier's feature space.

Runs, in order (each once per --work folder; every result is one JSON line in --results):
  judge      the zoo's ``resnet_tiny`` classifier of specs/fashion-classifier.yaml, on --judge-fraction
             of the training split for --judge-epochs (its test top-1 is recorded): the Fréchet
             distance is measured in its features (the input of its last linear layer), and its
             accuracy on the samples' classes is the class accuracy. Not Inception's FID.
  teacher    specs/fashion-ddpm-teacher.yaml's ``diffusion_unet_teacher`` (16/32/64, two residual
             blocks per level), trained plainly (ε-prediction) on --teacher-images images.
  cells      student x method x seed, every cell --student-images training images (3 epochs over
             the fraction of the training split that makes them: the same optimizer steps at batch 64).
Students: ``small`` = diffusion_unet_small, half the residual blocks removed (BK-SDM's block
removal; the distilled ones start from the teacher's weights, ``student.from_teacher``, as BK-SDM
does); ``half`` = diffusion_unet_half, the teacher's blocks at half width (random init: no tensor
of the teacher fits it).
Methods (AdamW 2e-3, no weight decay, batch 64; task = MSE(ε̂, ε), output = MSE(ε̂, ε̂_teacher)):
  scratch        task loss only, random init (OneCycle)            schedule.method supervised
  kd             task + output, from the teacher (OneCycle)        kd
  bk-sdm         task + output + feature MSE at the 3 block ends
                 (4 blocks), end to end, from the teacher (OneCycle) kd+mse
  stablekd-4/2   the same losses, StableKD-4/2 (one epoch per stage, stage_cyclic), from the teacher
  teacher-init   (not in the default grid) task loss only from the teacher's weights: init alone
Every sample is a DDIM grid (η = 0, --sample-steps steps, seed = the cell's seed); the judged
samples are the first --judge-samples of it, against as many test images. A KD cell also samples
its teacher with the cell's seed (``teacher_fd`` in the row: the paired ratio).

Order (a stop loses least): seed 0 of every method on ``small``, then seed 0 on ``half``, then
seeds 1 and 2 on ``small``, then seeds 1 and 2 on ``half``. A finished cell is skipped on a rerun,
a killed one resumes from its last checkpoint (every --checkpoint-every steps).

Cost on ONE CPU thread (nice 10, both cores busy with other runs), measured with --estimate
(3,000 images per run, the defaults' sampling and judging) and the judge's real run:
  judge (180,000 images, 3 epochs)  183 s, 1,010 img/s, 89.13 % test top-1
  teacher (480,000 images)          ~29 min: 279 img/s + ~50 s to evaluate, sample and judge
  cell (90,000 images)              small: scratch 3.7 min (484 img/s), kd 6.0 (324), bk-sdm 6.2 (315),
                                    stablekd-4/2 6.3 (320); half: 3.1 (558), 5.5 (356), 6.5 (288), 7.1 (272)
  (a KD cell's fixed ~85-95 s: the teacher's and the student's test MSE and 500 DDIM samples of 50
  steps of each; scratch's ~35 s)
  seed 0 on small (judge + teacher + 4 cells) ~55 min; + seed 0 on half ~77 min; the whole
  default grid (24 cells) ~2.8 h.

    nice -n 10 python bench/diffusion.py --threads 1 --work /work/ddpm-grid/runs   # the grid (resumable)
    python bench/diffusion.py --estimate       # measured rates -> seconds per run, the grid's total
    python bench/diffusion.py --dry-run        # every spec validated; trains nothing
    python bench/diffusion.py --report         # markdown table (mean ± std) + plot
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

RESULTS = Path("bench/results/diffusion-fashion.jsonl")
SPECS = Path(__file__).resolve().parents[1] / "specs"
FASHION_TRAIN = 60_000
STUDENT_EPOCHS = 3  # StableKD-4/2: one epoch per training stage
STUDENTS = {"small": ("diffusion_unet_small", True), "half": ("diffusion_unet_half", False)}  # zoo name, from_teacher
STUDENT_TITLES = {"small": "blocks removed (16/32/64, 1 block/level)", "half": "half width (8/16/32, 2 blocks/level)"}
TASK = {"task_weight": 1.0}
KD = {"task_weight": 1.0, "output_weight": 1.0}
BKSDM = {**KD, "feature": "mse", "feature_weight": 1.0}
# name -> schedule.method, recompositions, decompose.blocks, lr schedule, loss fields, starts from the teacher
METHODS: dict[str, dict] = {
    "scratch": dict(method="supervised", blocks=1, lr_schedule="onecycle", loss=TASK, init=False),
    "kd": dict(method="kd", blocks=1, lr_schedule="onecycle", loss=KD, init=True),
    "bk-sdm": dict(method="kd+mse", blocks=4, lr_schedule="onecycle", loss=BKSDM, init=True),
    "stablekd-4/2": dict(method="stablekd", recompositions=2, blocks=4, lr_schedule="stage_cyclic", loss=BKSDM,
                         init=True),
    "teacher-init": dict(method="kd", blocks=1, lr_schedule="onecycle", loss={"task_weight": 1.0, "output_weight": 0.0},
                         init=True),
}
DEFAULT_METHODS = ["scratch", "kd", "bk-sdm", "stablekd-4/2"]
DISTILLED = ("kd", "bk-sdm", "stablekd-4/2")


# --- specs -------------------------------------------------------------------------------------

def _yaml(name: str) -> dict:
    return yaml.safe_load((SPECS / name).read_text())


def _runtime(args, spec: dict) -> None:
    spec["runtime"] = {"device": args.device, "num_threads": args.threads, "log_every": 100000,
                       "checkpoint_every": args.checkpoint_every, "eval_every": 1000}  # evaluate at the end only
    if args.root:
        spec["data"]["root"] = args.root


def _budget(images: int, epochs: int) -> dict:
    """data.fraction and schedule.epochs that make ``images`` training images (more epochs past 100 %)."""
    while images / (FASHION_TRAIN * epochs) > 1.0:
        epochs += 1
    return {"fraction": round(images / (FASHION_TRAIN * epochs), 6), "epochs": epochs}


def judge_spec(args) -> dict:
    spec = _yaml("fashion-classifier.yaml")
    spec["name"] = f"judge-f{args.judge_fraction}-e{args.judge_epochs}"
    spec["output"] = str(Path(args.work) / spec["name"])
    spec["data"]["fraction"] = args.judge_fraction
    spec["schedule"] = {"method": "supervised", "epochs": args.judge_epochs}
    _runtime(args, spec)
    return spec


def _denoise(args, spec: dict) -> None:
    spec["denoise"].update(judge=str(Path(args.work) / judge_spec(args)["name"]), judge_samples=args.judge_samples,
                           sample_steps=args.sample_steps, sample_images=args.sample_images)


def teacher_spec(args) -> dict:
    spec = _yaml("fashion-ddpm-teacher.yaml")
    b = _budget(args.teacher_images, args.teacher_epochs)
    spec["name"] = f"ddpm-teacher-i{args.teacher_images}"
    spec["output"] = str(Path(args.work) / spec["name"])
    spec["data"]["fraction"] = b["fraction"]
    spec["schedule"] = {"method": "supervised", "epochs": b["epochs"]}
    _denoise(args, spec)
    _runtime(args, spec)
    return spec


def cell_name(args, method: str, student: str, seed: int) -> str:
    return f"ddpm-{student}-{method}-i{args.student_images}-s{seed}"


def cell_spec(args, method: str, student: str, seed: int) -> dict:
    """The kdgraph spec dict of one cell: specs/fashion-ddpm.yaml with the cell's student, method,
    losses, budget and seed."""
    m, (zoo_name, can_init) = METHODS[method], STUDENTS[student]
    spec = _yaml("fashion-ddpm.yaml")
    name = cell_name(args, method, student, seed)
    spec.update(name=name, output=str(Path(args.work) / name.replace("/", "_")), seed=seed)
    b = _budget(args.student_images, STUDENT_EPOCHS)
    spec["data"]["fraction"] = b["fraction"]
    spec["student"] = {"model": f"module:kdgraph.zoo:{zoo_name}", "kwargs": {"in_chans": 1, "num_classes": 10},
                       "from_teacher": bool(m["init"] and can_init)}
    if m["method"] == "supervised":
        del spec["teacher"]
    else:
        spec["teacher"]["checkpoint"] = str(Path(teacher_spec(args)["output"]) / "student.safetensors")
    spec["decompose"] = {"blocks": m["blocks"], "cuts": "auto", "projector": "conv1x1"}
    spec["schedule"] = {"method": m["method"], "epochs": b["epochs"],
                        **({"recompositions": m["recompositions"]} if "recompositions" in m else {})}
    spec["loss"] = dict(m["loss"])
    spec["optim"]["lr_schedule"] = m["lr_schedule"]
    _denoise(args, spec)
    _runtime(args, spec)
    spec["runtime"].update(precision="auto", compile=False)
    return spec


def cells(args) -> list[dict]:
    """Seed 0 of every method on each student first (students in --students order), then the
    other seeds, student by student: a stop leaves like-with-like comparisons."""
    first, rest = args.seeds[:1], args.seeds[1:]
    order = [(s, seed) for s in args.students for seed in first] + [(s, seed) for s in args.students for seed in rest]
    return [{"method": m, "student": s, "seed": seed} for s, seed in order for m in args.methods]


# --- running -----------------------------------------------------------------------------------

def _train(spec_dict: dict) -> dict:
    """Train ``spec_dict`` to its end (resuming a killed run; a run that finished is read back)."""
    from kdgraph.runtime.loop import train
    from kdgraph.runtime.runs import RunFolder
    from kdgraph.spec import load_spec

    spec = load_spec(spec_dict)
    folder = RunFolder(spec.output_dir)
    if folder.summary.exists():
        return json.loads(folder.summary.read_text())
    resume = folder.last_checkpoint.exists()
    with contextlib.redirect_stdout(io.StringIO()):
        return train(spec, resume=resume, quiet=True, force=not resume)


def _done(results: Path) -> dict[str, dict]:
    if not results.exists():
        return {}
    return {r["cell"]: r for r in (json.loads(ln) for ln in results.read_text().splitlines() if ln.strip())}


def _append(results: Path, row: dict) -> None:
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _images(spec: dict) -> int:
    """Training images a run sees: its epochs over round(fraction · n_c) images of each class."""
    per_class = max(1, round(spec["data"]["fraction"] * FASHION_TRAIN / 10))
    return 10 * per_class * spec["schedule"]["epochs"]


def _samples(results: Path, summary: dict, cell: str) -> str | None:
    """Copy the run's samples.png next to the results (``diffusion-samples/<cell>.png``)."""
    src = Path(summary["output"]) / "samples.png"
    if not src.exists():
        return None
    dst = results.parent / "diffusion-samples" / f"{cell.replace('/', '_')}.png"  # the teacher's: teacher.png
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst)


def _row(results: Path, spec: dict, summary: dict, wall_s: float, **cell) -> dict:
    return {"cell": spec["name"], **cell, "images": _images(spec), "epochs": spec["schedule"]["epochs"],
            "fraction": spec["data"]["fraction"], "wall_s": round(wall_s, 1),
            "train_wall_s": summary["wall_time_s"], "images_per_s": summary["mean_images_per_s"],
            "fd": summary.get("student_fd"), "class_acc": summary.get("student_class_accuracy"),
            "mse": summary.get("student_mse"), "teacher_fd": summary.get("teacher_fd"),
            "teacher_class_acc": summary.get("teacher_class_accuracy"), "teacher_mse": summary.get("teacher_mse"),
            "samples": _samples(results, summary, "teacher" if cell["method"] == "teacher" else spec["name"]),
            "threads": spec["runtime"]["num_threads"]}


def run_one(results: Path, spec: dict, **cell) -> dict:
    """Run one spec unless ``results`` has its row; append the row when it ends."""
    done = _done(results)
    if spec["name"] in done:
        return done[spec["name"]]
    resumed = Path(spec["output"], "checkpoints").exists()
    print(f"{spec['name']}: {'resuming' if resumed else 'training'} ...", flush=True)
    t0 = time.perf_counter()
    summary = _train(spec)
    if cell.get("method") == "judge":
        row = {"cell": spec["name"], **cell, "top1": summary["student_top1"], "epochs": summary["epochs"],
               "images": _images(spec), "fraction": spec["data"]["fraction"],
               "wall_s": round(time.perf_counter() - t0, 1), "images_per_s": summary["mean_images_per_s"]}
    else:
        row = _row(results, spec, summary, time.perf_counter() - t0, **cell)
    _append(results, row | {"resumed": resumed})
    print(f"{spec['name']}: " + ", ".join(f"{k} {row[k]}" for k in ("top1", "fd", "class_acc", "mse", "wall_s",
                                                                     "images_per_s") if row.get(k) is not None),
          flush=True)
    return row


def run(args, results: Path) -> None:
    t0 = time.perf_counter()
    run_one(results, judge_spec(args), method="judge")
    run_one(results, teacher_spec(args), method="teacher", student="teacher", seed=0)
    todo = cells(args)
    done = _done(results)
    print(f"{sum(cell_name(args, **c) in done for c in todo)} of {len(todo)} cells done", flush=True)
    for c in todo:
        run_one(results, cell_spec(args, **c), **c)
    print(f"finished in {time.perf_counter() - t0:.0f} s; python bench/diffusion.py --report", flush=True)


# --- dry run and cost estimate -----------------------------------------------------------------

def dry_run(args) -> None:
    """Every run of the grid, its spec validated by kdgraph's schema; nothing trains."""
    from kdgraph.spec import load_spec

    specs = [judge_spec(args), teacher_spec(args)] + [cell_spec(args, **c) for c in cells(args)]
    for spec in specs:
        load_spec(spec)
        print(f"  {spec['name']}: {spec['schedule']['method']}, {_images(spec)} images "
              f"({spec['schedule']['epochs']} epochs of {spec['data']['fraction']:.4f})"
              + (", from the teacher" if spec.get("student", {}).get("from_teacher") else ""))
    print(f"{len(specs)} runs, every spec valid")


def estimate(args) -> None:
    """The grid at ``--estimate-images`` images per run (judge, teacher, seed 0 of every method on
    every student: also a smoke test), each run's fixed part (build, evaluation, sampling, judging)
    and training rate measured, extrapolated to the real budgets."""
    tiny = copy.copy(args)
    tiny.work = str(Path(args.work) / "estimate")
    tiny.judge_fraction, tiny.judge_epochs = round(args.estimate_images / FASHION_TRAIN, 6), 1
    tiny.teacher_images = tiny.student_images = args.estimate_images
    tiny.seeds = [0]
    rows = Path(tiny.work) / "rows.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    run(tiny, rows)
    real = {"judge": round(args.judge_fraction * FASHION_TRAIN) * args.judge_epochs,
            "teacher": args.teacher_images}
    total, seed0 = 0.0, 0.0
    print("\n| run | measured: images, wall s, img/s | fixed s | estimate at the real budget |\n|---|---|---|---|")
    names = {judge_spec(tiny)["name"], teacher_spec(tiny)["name"]} | {cell_name(tiny, **c) for c in cells(tiny)}
    for r in (r for r in _done(rows).values() if r["cell"] in names):
        images = r.get("images") or round(r["fraction"] * FASHION_TRAIN) * r["epochs"]
        fixed = max(r["wall_s"] - images / r["images_per_s"], 0.0)
        est = fixed + real.get(r["method"], args.student_images) / r["images_per_s"]
        total += est if r["method"] in real else est * len(args.seeds)
        seed0 += est if r["method"] in real or r.get("student") == args.students[0] else 0.0
        print(f"| {r['cell']} | {images}, {r['wall_s']:.0f}, {r['images_per_s']:.0f} | {fixed:.0f} | "
              f"{est / 60:.1f} min |")
    print(f"\nseed 0 on {args.students[0]} (judge + teacher + {len(args.methods)} cells): ~{seed0 / 60:.0f} min; "
          f"the whole grid ({len(cells(args))} cells): ~{total / 3600:.1f} h at {args.threads} thread(s)")


# --- report ------------------------------------------------------------------------------------

def _ms(v: list[float], digits: int = 2) -> str:
    if not v:
        return "–"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.{digits}f} ± {sd:.{digits}f}"


def aggregate(rows: list[dict]) -> dict[tuple[str, str, int], dict[str, list[float]]]:
    """(student, method, training images) -> {metric: values over seeds} of the cells: cells of
    another budget (``--student-images``) are groups of their own, never averaged in."""
    groups: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] in METHODS:
            g = groups[(r["student"], r["method"], r["images"])]
            for k in ("fd", "class_acc", "mse", "images"):
                if r.get(k) is not None:
                    g[k].append(r[k])
            g["wall_s"].append(max(r["wall_s"], r["train_wall_s"]))  # resumed: this process's part only
            if r.get("fd") is not None and r.get("teacher_fd"):
                g["paired"].append(r["fd"] / r["teacher_fd"])
    return groups


def table(groups: dict, teacher: dict) -> str:
    out = ["| student | method | Fréchet distance (n) | × teacher's | × teacher's, same seed | class acc % | "
           "denoising MSE | images | wall min |", "|---|---|---|---|---|---|---|---|---|"]
    out.append(f"| teacher (16/32/64, 2 blocks/level) | plain | {teacher['fd']:.3f} (1) | 1.00 | | "
               f"{teacher['class_acc']:.1f} | {teacher['mse']:.4f} | {teacher['images']} | "
               f"{teacher['wall_s'] / 60:.1f} |")
    for s, n, m in ((s, n, m) for s in STUDENTS for n in budgets(groups) for m in METHODS):
        g = groups.get((s, m, n))
        if g and g["fd"]:
            ratio = statistics.fmean(g["fd"]) / teacher["fd"]
            out.append(f"| {STUDENT_TITLES[s]} | {m} | {_ms(g['fd'], 3)} ({len(g['fd'])}) | {ratio:.2f} | "
                       f"{_ms(g['paired'])} | {_ms(g['class_acc'], 1)} | {_ms(g['mse'], 4)} | "
                       f"{n} | {statistics.fmean(g['wall_s']) / 60:.1f} |")
    return "\n".join(out)


def budgets(groups: dict) -> list[int]:
    """The student budgets (training images per cell) with results, smallest first."""
    return sorted({k[2] for k in groups})


def verdict(groups: dict, teacher: dict) -> str:
    """The issue's goal, at every student budget: the best distilled block-removed student's FD
    within 1.5x the teacher's and below the same student from scratch at equal steps."""
    return "\n".join(f"{n} images: {budget_verdict(groups, teacher, n)}" for n in budgets(groups))


def budget_verdict(groups: dict, teacher: dict, n: int) -> str:
    runs = {m: groups[("small", m, n)]["fd"] for m in DISTILLED + ("scratch",)
            if groups.get(("small", m, n)) and groups[("small", m, n)]["fd"]}
    fd = {m: statistics.fmean(v) for m, v in runs.items()}
    best = min((m for m in fd if m in DISTILLED), key=fd.get, default=None)
    if best is None or "scratch" not in fd:
        return "goal: not yet measurable (needs scratch and a distilled block-removed cell)"
    within, below = fd[best] <= 1.5 * teacher["fd"], fd[best] < fd["scratch"]
    return (f"goal {'met' if within and below else 'not met'}: best distilled block-removed student {best}, "
            f"FD {fd[best]:.2f} = {fd[best] / teacher['fd']:.2f}x the teacher's {teacher['fd']:.2f} "
            f"({'within' if within else 'over'} 1.5x) and {'below' if below else 'not below'} scratch's "
            f"{fd['scratch']:.2f} at equal steps (seeds: {len(runs[best])} and {len(runs['scratch'])})")


def plot(groups: dict, teacher: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = budgets(groups)[0]  # the grid's budget; other budgets are in the table
    groups = {k[:2]: v for k, v in groups.items() if k[2] == n}
    students = [s for s in STUDENTS if any(k[0] == s for k in groups)]
    fig, axes = plt.subplots(1, len(students), figsize=(4.8 * len(students), 3.6), squeeze=False)
    for ax, s in zip(axes[0], students):
        ms = [m for m in METHODS if groups.get((s, m)) and groups[(s, m)]["fd"]]
        means = [statistics.fmean(groups[(s, m)]["fd"]) for m in ms]
        sds = [statistics.stdev(groups[(s, m)]["fd"]) if len(groups[(s, m)]["fd"]) > 1 else 0.0 for m in ms]
        ax.bar(range(len(ms)), means, yerr=sds, capsize=3)
        ax.set_xticks(range(len(ms)), ms, rotation=30, ha="right", fontsize=8)
        ax.axhline(teacher["fd"], color="grey", lw=0.8, ls="--", label="teacher")
        ax.axhline(1.5 * teacher["fd"], color="red", lw=0.8, ls=":", label="1.5x teacher")
        ax.set_title(STUDENT_TITLES[s], fontsize=9)
        ax.set_ylabel("Fréchet distance (judge's features)")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: Path) -> str:
    rows = list(_done(results).values())
    judge = next((r for r in rows if r["method"] == "judge"), None)
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    if judge is None or teacher is None:
        return f"{results}: no judge and teacher yet"
    parts = [f"judge: resnet_tiny, test top-1 {judge['top1']:.2f} % ({judge['images']} training images, "
             f"{judge['wall_s']:.0f} s); teacher: {teacher['images']} training images in "
             f"{teacher['wall_s'] / 60:.1f} min "
             f"({teacher['images_per_s']:.0f} img/s, {teacher['threads']} thread(s))", ""]
    groups = aggregate(rows)
    parts += [table(groups, teacher), "", verdict(groups, teacher)]
    if groups:
        parts.append(f"\nplot: {plot(groups, teacher, results.with_suffix('.png'))}")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--students", nargs="*", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX files (default Debian's)")
    p.add_argument("--work", default="runs/diffusion", help="run folders")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--judge-fraction", type=float, default=1.0)
    p.add_argument("--judge-epochs", type=int, default=3)
    p.add_argument("--teacher-images", type=int, default=480_000, help="the teacher's training images")
    p.add_argument("--teacher-epochs", type=int, default=6, help="at least (more where the images exceed them)")
    p.add_argument("--student-images", type=int, default=90_000, help="every cell's training images")
    p.add_argument("--judge-samples", type=int, default=500, help="samples (and test images) the judge compares")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--sample-images", type=int, default=64, help="images in samples.png")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps")
    p.add_argument("--estimate-images", type=int, default=3000, help="--estimate: images per measured run")
    p.add_argument("--estimate", action="store_true", help="measure tiny runs, extrapolate the grid (a smoke test)")
    p.add_argument("--dry-run", action="store_true", help="validate every spec; train nothing")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(results))
        return
    if args.dry_run:
        dry_run(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.estimate:
        estimate(args)
        return
    run(args, results)
    print(report(results))


if __name__ == "__main__":
    main()
