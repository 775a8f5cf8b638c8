"""The rest of issue 38's evidence under bench/evidence.py's protocol (kdgraph.sweep): every lr
chosen on the validation split with seed 0, from a 3-point grid grown by up to 2 points a side
while the choice sits at its edge, and reported on the test split with fresh seeds 1-3 (mean,
std, 95 % CI, Welch's t test against KD). Same optimiser, T 4, crop+flip, 10 % validation split.

Two sweeps, run in this order, one cell at a time, one torch thread:
  full  ResNet-34 -> ResNet-18 at width / 8 (bench/evidence-w8.yaml) on 100 % of what the
        validation split leaves, at the 20 % grid's number of optimizer steps (3 epochs instead
        of 15), with the 20 % grid's teacher (WORK_W8/teacher): kd, stablekd-5/2, then the
        control kd+mse at kd's lr.
  r50   the adapter-free pair (bench/adapter_free.py's, now under this protocol):
        ResNet-50-shaped teacher -> ResNet-18, every width / 8 (bench/evidence-more-r50.yaml),
        20 %, 15 epochs; its teacher (bench/evidence-more-r50-teacher.yaml) trained here first,
        as the ResNet-34 one was: kd, stablekd-5/2 (decompose.adapters auto: projected), then
        stablekd-5/2 with the adapters in the path.

It first waits, polling every 60 s, until no process of bench/evidence.py's grid runs (the
machine's 2 cores hold one grid at a time), then trains what is missing: rows appended to
--results per finished cell, a killed run resumes where it stopped (the same command).

    python bench/evidence_more.py --dry-run   # every arm's spec validated, the cell count; trains nothing
    setsid nohup python bench/evidence_more.py > /work/grid/evidence-more.log 2>&1 < /dev/null &
    python bench/evidence_more.py --report    # the reports of what has finished
    python bench/evidence_more.py --markdown  # the same from the committed rows (bench/results/evidence-more.jsonl)

To commit the rows and their report (one command):
    cp /work/grid/evidence-more.jsonl bench/results/ && python bench/evidence_more.py --markdown > bench/results/evidence-more-report.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence  # noqa: E402  (bench/evidence.py: the arms' overrides, the grids)

from kdgraph.sweep import (Arm, Sweep, dry_run, format_report, load_rows, run_script,  # noqa: E402
                           sweep_report, train_teacher_once)

HERE = Path(__file__).resolve().parent
COMMITTED = HERE / "results" / "evidence-more.jsonl"
R50_SPEC = HERE / "evidence-more-r50.yaml"
R50_TEACHER_SPEC = HERE / "evidence-more-r50-teacher.yaml"
# a process of the running grid: its driver, or a cell it started (python -m kdgraph.sweep .../evidence-w8/jobs/...)
GRID_PATTERN = r"bench/evidence\.py|evidence-w8/jobs/"
LR = evidence.LR
STABLEKD = (*evidence.STABLEKD, "loss.temperature=4")

FULL_ARMS = [
    Arm("kd", evidence.KD, ((LR, evidence.ONECYCLE),)),
    Arm("stablekd-5/2", STABLEKD, ((LR, evidence.CYCLIC),)),
    Arm("kd+mse", ("schedule.method=kd+mse", "optim.lr_schedule=onecycle", "loss.temperature=4"), follow="kd"),
]
R50_ARMS = [
    Arm("kd", evidence.KD, ((LR, evidence.ONECYCLE),)),
    Arm("stablekd-5/2", STABLEKD, ((LR, evidence.CYCLIC),)),
    Arm("stablekd-5/2-inpath", (*STABLEKD, "decompose.adapters=in_path"), ((LR, evidence.CYCLIC),)),
]


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def build(args) -> dict[str, Sweep]:
    """The two sweeps, by name, in the order they run."""
    work, results = Path(args.work), Path(args.results)
    w8_teacher = Path(args.w8_work) / "teacher" / "student.safetensors"
    full = Sweep(evidence.SPEC, FULL_ARMS, (0,), (1, 2, 3), results, work / "full", baseline="kd",
                 common=(f"teacher.checkpoint={w8_teacher}", "data.fraction=1.0", "schedule.epochs=3",
                         "runtime.eval_every=3"),
                 extend=2, waves=[["kd", "stablekd-5/2"], ["kd+mse"]], jobs=1, log=log)
    r50 = Sweep(R50_SPEC, R50_ARMS, (0,), (1, 2, 3), results, work / "r50", baseline="kd",
                common=(f"teacher.checkpoint={work / 'r50' / 'teacher' / 'student.safetensors'}",),
                extend=2, waves=[["kd", "stablekd-5/2"], ["stablekd-5/2-inpath"]], jobs=1, log=log)
    return {"full": full, "r50": r50}


def grid_running(pattern: str = GRID_PATTERN) -> list[int]:
    """Ids of running processes whose command line matches ``pattern`` (pgrep -f), this one excepted."""
    got = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [pid for pid in map(int, got.stdout.split()) if pid != os.getpid()]


def wait_for_grid(poll_s: float = 60.0, pattern: str = GRID_PATTERN) -> None:
    """Return once no process of bench/evidence.py's grid runs, polling every ``poll_s`` seconds."""
    waited = False
    while pids := grid_running(pattern):
        if not waited:
            log(f"waiting for bench/evidence.py's grid (pids {pids}) to finish; polling every {poll_s:.0f} s")
            waited = True
        time.sleep(poll_s)
    if waited:
        log("the grid has finished: starting")


def r50_teacher(args) -> None:
    """Train the adapter-free pair's teacher (resumable), once; its row ("key": "teacher-r50")."""
    if row := train_teacher_once(Path(args.results), "teacher-r50", R50_TEACHER_SPEC, Path(args.work) / "r50" / "teacher",
                                 what="the ResNet-50/8 teacher", log=log):
        log(f"ResNet-50/8 teacher: test top-1 {row['test_top1']:.2f} %")


def report(sweeps: dict[str, Sweep], rows: dict) -> str:
    titles = {"full": "ResNet-34 -> ResNet-18 /8, 100 % of the training split, 3 epochs (equal steps to 20 % x 15)",
              "r50": "ResNet-50-shaped -> ResNet-18 /8 (the adapter-free pair), 20 %, 15 epochs"}
    out = ["# Evidence grid, continued (issue 38): the 100 % fraction and the adapter-free pair", "",
           "Generated from `bench/results/evidence-more.jsonl` by `python bench/evidence_more.py --markdown`; "
           "protocol in `bench/evidence_more.py`'s docstring.", ""]
    for name, sweep in sweeps.items():
        out += [f"## {titles[name]}", ""]
        if name == "r50" and "teacher-r50" in rows:
            out += [f"Teacher ResNet-50/8: test top-1 {rows['teacher-r50']['test_top1']:.2f} %", ""]
        out += [format_report(sweep_report(sweep, rows)), ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/work/grid/evidence-more", help="cells' folders (outside any worktree)")
    p.add_argument("--w8-work", default="/work/grid/evidence-w8", help="bench/evidence.py's work (its teacher)")
    p.add_argument("--results", default="/work/grid/evidence-more.jsonl")
    p.add_argument("--report", action="store_true", help="print the reports of what has finished")
    p.add_argument("--dry-run", action="store_true", help="validate every arm's spec and count the cells")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between checks for the running grid")
    p.add_argument("--markdown", action="store_true",
                   help="print the report of the committed rows (--results, default bench/results/evidence-more.jsonl)")
    args = p.parse_args()
    if args.markdown:
        rows = load_rows(COMMITTED if args.results == p.get_default("results") else Path(args.results))
        print(report(build(args), rows), end="")
        return
    sweeps = build(args)
    if args.dry_run:
        run_script(lambda: print(dry_run(list(sweeps.values()), "the ResNet-50 teacher")), log)
        return

    def train() -> None:
        wait_for_grid(args.poll)
        for name, sweep in sweeps.items():
            if name == "r50":
                r50_teacher(args)
            sweep.run()

    if not args.report:
        run_script(train, log, stopped="stopped; the same command resumes")
    print(report(sweeps, load_rows(Path(args.results))))


if __name__ == "__main__":
    main()
