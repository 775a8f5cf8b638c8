"""Segmentation distillation evidence (issue 41): does a dense KD loss raise a small U-Net's mIoU
on Fashion-MNIST semantic segmentation (background + 10 garment classes, 28 px)?

Pair and data: bench/seg-evidence.yaml (U-Net 16/32/64 -> U-Net 8/16/32, 3 epochs on 5 % of
Fashion-MNIST's training images (3,000, drawn by each run's seed), its whole test split (10,000)
scored); the teacher, bench/seg-evidence-teacher.yaml (8 epochs, seed 0), is trained first. Every arm trains the same epochs, batch size, learning rate and OneCycle
schedule (equal steps); fixed hyperparameters, no selection; seeds 1-3, seed-major (a stopped
grid holds whole seeds). Scores: the test split's at the end of the run (not the best epoch).

Arms (overrides of the base spec):
  no-kd      no teacher: per-pixel cross-entropy alone
  pixel-kl   CE + per-pixel KL at T 1, weight 1 (loss.dense pixel_kl)
  cwd        CE + channel-wise distillation at T 1, weight 5 (Shu et al. 2021; mmrazor's setting)
  cwd+pkd    cwd + PKD (Cao et al. 2022) at the bottleneck cut's three levels (28², 14², 7²; each
             through a 1x1 lift), weight 1 (schedule.method kd+mse, loss.feature pkd)

One cell at a time, one torch thread; a row per finished cell appended to the results file, so a
kill loses at most the running cell (which resumes from its checkpoint).

    python bench/seg_evidence.py                       # run / resume the grid
    python bench/seg_evidence.py --report out.md       # the report of what has finished
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from kdgraph.errors import KDGraphError
from kdgraph.sweep import append_row, describe, load_rows, train_resumable, welch

HERE = Path(__file__).resolve().parent
SPEC = HERE / "seg-evidence.yaml"
TEACHER_SPEC = HERE / "seg-evidence-teacher.yaml"
SEEDS = (1, 2, 3)
ARMS = {
    "no-kd": ("teacher=null", "schedule.method=supervised"),
    "pixel-kl": ("schedule.method=kd", "loss.dense=pixel_kl", "loss.kl_weight=1", "loss.temperature=1"),
    "cwd": ("schedule.method=kd", "loss.dense=cwd", "loss.kl_weight=5", "loss.temperature=1"),
    "cwd+pkd": ("schedule.method=kd+mse", "loss.dense=cwd", "loss.kl_weight=5", "loss.temperature=1",
                "loss.feature=pkd", "loss.feature_weight=1"),
}
BASELINE = "no-kd"
COMMAND = "OMP_NUM_THREADS=1 python bench/seg_evidence.py --work /work/grid/seg-evidence --results /work/grid/seg-evidence.jsonl"


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _row(key: str, arm: str, seed: int | None, summary: dict, wall: float) -> dict:
    return {"key": key, "arm": arm, "seed": seed, "miou": summary["student_miou"],
            "pixel_acc": summary["student_pixel_acc"], "top5": summary["student_top5"],
            "teacher_miou": summary.get("teacher_miou"), "best_miou": summary.get("best_miou"),
            "per_class": summary.get("per_class"), "epochs": summary["epochs"], "method": summary["method"],
            "wall_s": round(wall, 1), "output": summary["output"]}


def run_cell(results: Path, key: str, arm: str, seed: int | None, spec: Path, overrides: list[str]) -> None:
    if key in load_rows(results):
        return
    log(f"cell {key}")
    t0 = time.perf_counter()
    got = train_resumable(spec, overrides)
    if "diverged" in got:
        append_row(results, {"key": key, "arm": arm, "seed": seed, "diverged": got["diverged"]})
        log(f"{key}: diverged")
        return
    row = _row(key, arm, seed, got["summary"], time.perf_counter() - t0)
    append_row(results, row)
    log(f"{key}: mIoU {row['miou']:.2f} %, pixel acc {row['pixel_acc']:.2f} % ({row['wall_s']} s)")


def run(work: Path, results: Path, seeds: tuple[int, ...]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    run_cell(results, "teacher", "teacher", None, TEACHER_SPEC, [f"output={teacher}"])
    for seed in seeds:
        for arm, overrides in ARMS.items():
            extra = [] if "teacher=null" in overrides else [f"teacher.checkpoint={teacher / 'student.safetensors'}"]
            run_cell(results, f"{arm}/s{seed}", arm, seed, SPEC,
                     [*overrides, *extra, f"seed={seed}", f"output={work / arm / f's{seed}'}"])


def report(rows: dict[str, dict]) -> str:
    """The markdown table: per arm, mIoU and pixel accuracy mean ± std over its seeds, Welch's p vs no-kd."""
    cells = [r for r in rows.values() if r.get("arm") in ARMS and "miou" in r]
    by_arm = {arm: [r for r in cells if r["arm"] == arm] for arm in ARMS}
    base = [r["miou"] for r in by_arm[BASELINE]]
    lines = ["| arm | seeds | mIoU % (mean ± std) | pixel acc % | Δ mIoU vs no-kd | Welch p |",
             "|---|---|---|---|---|---|"]
    for arm, got in by_arm.items():
        if not got:
            lines.append(f"| {arm} | 0 | not run | | | |")
            continue
        m, a = describe([r["miou"] for r in got]), describe([r["pixel_acc"] for r in got])
        w = welch([r["miou"] for r in got], base) if arm != BASELINE else None
        std = f" ± {m['std']:.2f}" if m["std"] is not None else ""
        delta = f"{m['mean'] - statistics.fmean(base):+.2f}" if base and arm != BASELINE else ""
        p = "" if w is None else f"{w['p']:.3g}"
        seeds = ",".join(str(r["seed"]) for r in got)
        lines.append(f"| {arm} | {seeds} | {m['mean']:.2f}{std} | {a['mean']:.2f} | {delta} | {p} |")
    t = rows.get("teacher")
    if t is not None:
        lines.append(f"| teacher (U-Net 16/32/64, seed 0) | 0 | {t['miou']:.2f} | {t['pixel_acc']:.2f} | | |")
    diverged = [r["key"] for r in rows.values() if "diverged" in r]
    if diverged:
        lines.append(f"\ndiverged: {', '.join(diverged)}")
    return "\n".join(lines) + f"\n\ncommand: `{COMMAND}`\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/work/grid/seg-evidence", help="cells' folders (outside any worktree)")
    p.add_argument("--results", default="/work/grid/seg-evidence.jsonl")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--report", metavar="MD", help="write the report of what has finished to MD (- : stdout)")
    args = p.parse_args()
    results = Path(args.results)
    try:
        if args.report is None:
            run(Path(args.work), results, tuple(int(s) for s in args.seeds.split(",")))
    except KDGraphError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log("stopped; the same command resumes the grid")
        sys.exit(130)
    text = report(load_rows(results))
    if args.report and args.report != "-":
        Path(args.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
