"""The recipe evidence of issue 38, run with `kdgraph sweep`'s library (kdgraph.sweep): every
learning rate chosen on the validation split with seed 0, every number reported on the test
split with fresh seeds 1-3, and controls that separate StableKD's parts.

Pair and data: bench/evidence-w8.yaml (ResNet-34 -> ResNet-18 at width/8, Fashion-MNIST 32 px,
20 % of what a 10 % validation split leaves, crop+flip, 15 epochs); the teacher:
bench/evidence-w8-teacher.yaml, trained first (it never sees seed 0's validation split).

Arms (overrides of the base spec; lr grids of 3 points, extended by up to 2 points a side
while the choice sits at an edge: every grid ends bracketed or flagged):
  kd                 CE + KL at T 4, OneCycle
  stablekd-5/2       StableKD, 2 recompositions, kd's KL (T 4) as head loss, stage_cyclic
  kd+mse             control: kd + block-end feature MSE, at kd's chosen lr
  kd-cyclic          control: kd on stage_cyclic at stablekd-5/2's chosen lr
  dist               CE + DIST (beta 1, gamma 1, tau 1), OneCycle
  stablekd-5/2+dist  StableKD-5/2 with DIST as head loss, stage_cyclic (swept, unlike before)
  dkd                CE + DKD (alpha 1, beta 8, T 4, warm-up 1/12 of the epochs), OneCycle
  kd+ls              CE + 9 KL of Z-scored logits at T 2, OneCycle
Waves (most informative first): kd and stablekd-5/2 (selection, then seeds 1-3), the two
controls, then the other recipes. One cell at a time, one torch thread.

    python bench/evidence.py --dry-run      # the arms' specs validated, the cell count; trains nothing
    nohup python bench/evidence.py > /work/grid/evidence-w8.log 2>&1 &   # run / resume the grid
    python bench/evidence.py --report       # the report of what has finished
    python bench/evidence.py --markdown     # bench/results/evidence-w8-report.md from the committed rows

The committed report is regenerated from the committed rows, in one command (the lead's refresh):
    cp /work/grid/evidence-w8.jsonl bench/results/ && python bench/evidence.py --markdown > bench/results/evidence-w8-report.md
(tests/test_bench_evidence.py checks that the committed report equals the regenerated one).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kdgraph.sweep import (Arm, Sweep, dry_run, format_report, load_rows, run_script, sweep_report, train_teacher_once,
                           welch)

HERE = Path(__file__).resolve().parent
COMMITTED = HERE / "results" / "evidence-w8.jsonl"
SPEC = HERE / "evidence-w8.yaml"
TEACHER_SPEC = HERE / "evidence-w8-teacher.yaml"
ONECYCLE = ("0.05", "0.1", "0.2")
CYCLIC = ("0.5", "1", "2")  # stage_cyclic peaks halve each stage; StableKD's best was 1.0, the top of 0.25-1
LR = "optim.lr"

KD = ("schedule.method=kd", "optim.lr_schedule=onecycle", "loss.temperature=4")
STABLEKD = ("schedule.method=stablekd", "schedule.recompositions=2", "optim.lr_schedule=stage_cyclic")
DIST = ("loss.logit=dist", "loss.temperature=1", "loss.dist_beta=1", "loss.dist_gamma=1")
ARMS = [
    Arm("kd", KD, ((LR, ONECYCLE),)),
    Arm("stablekd-5/2", (*STABLEKD, "loss.temperature=4"), ((LR, CYCLIC),)),
    Arm("kd+mse", ("schedule.method=kd+mse", "optim.lr_schedule=onecycle", "loss.temperature=4"), follow="kd"),
    Arm("kd-cyclic", ("schedule.method=kd", "optim.lr_schedule=stage_cyclic", "loss.temperature=4"),
        follow="stablekd-5/2"),
    Arm("dist", ("schedule.method=kd", "optim.lr_schedule=onecycle", *DIST), ((LR, ("0.1", "0.2", "0.4")),)),
    Arm("stablekd-5/2+dist", (*STABLEKD, *DIST), ((LR, CYCLIC),)),
    Arm("dkd", ("schedule.method=kd", "optim.lr_schedule=onecycle", "loss.logit=dkd", "loss.temperature=4",
                "loss.dkd_alpha=1", "loss.dkd_beta=8", "loss.dkd_warmup_epochs=1.25"), ((LR, ONECYCLE),)),
    Arm("kd+ls", ("schedule.method=kd", "optim.lr_schedule=onecycle", "loss.logit=kl", "loss.standardize=true",
                  "loss.temperature=2", "loss.kl_weight=9"), ((LR, ONECYCLE),)),
]
WAVES = [["kd", "stablekd-5/2"], ["kd+mse", "kd-cyclic"], ["dist", "stablekd-5/2+dist", "dkd", "kd+ls"]]


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def build(args) -> Sweep:
    work = Path(args.work)
    common = (f"teacher.checkpoint={work / 'teacher' / 'student.safetensors'}",)
    return Sweep(SPEC, ARMS, (0,), (1, 2, 3), Path(args.results), work, baseline="kd", common=common,
                 extend=2, waves=WAVES, jobs=1, log=log)


def teacher(args, results: Path) -> None:
    """Train the teacher (resumable), once; its row ("key": "teacher") in the results file."""
    if row := train_teacher_once(results, "teacher", TEACHER_SPEC, Path(args.work) / "teacher", log=log):
        log(f"teacher: test top-1 {row['test_top1']:.2f} %")


# (arm a, arm b, what a - b isolates): the controls' reading in the markdown report
CONTRASTS = [
    ("kd+mse", "kd", "block-end feature MSE added to KD, nothing else changed"),
    ("stablekd-5/2", "kd+mse", "decomposition + recomposition, stage_cyclic and StableKD's lr, over KD + the same MSE"),
    ("kd-cyclic", "kd", "KD moved to stage_cyclic at StableKD's lr, without decomposition"),
    ("stablekd-5/2", "kd-cyclic", "decomposition + recomposition (+ its MSE), at the same schedule and lr"),
]


def contrasts(report: dict) -> list[str]:
    """The controls' reading: Welch's t test of each pair of CONTRASTS from the report's test values."""
    vals = {a["arm"]: a for a in report["arms"]}
    out = ["| contrast | what it isolates | Δ (top-1 points) | t (df) | p |", "|---|---|---|---|---|"]
    for a, b, what in CONTRASTS:
        w = welch(vals[a]["test"]["values"], vals[b]["test"]["values"])
        div = "".join(f" ({vals[x]['diverged']} of {x}'s seeds diverged, left out)" for x in (a, b)
                      if vals[x]["diverged"])
        cells = ["–", "–", "–"] if w is None else [f"{w['diff']:+.2f}", f"{w['t']:.2f} ({w['df']:.1f})", f"{w['p']:.3g}"]
        out.append(f"| {a} − {b} | {what}{div} | " + " | ".join(cells) + " |")
    return out


def markdown(sweep: Sweep, rows: dict) -> str:
    """The committed report (bench/results/evidence-w8-report.md): the teacher, the sweep's report,
    the controls' contrasts; a function of the rows alone."""
    report = sweep_report(sweep, rows)
    head = ["# Evidence grid (issue 38): ResNet-34 → ResNet-18 at width / 8, Fashion-MNIST 20 %", "",
            "Generated from `bench/results/evidence-w8.jsonl` by `python bench/evidence.py --markdown`; "
            "protocol in `bench/evidence.py`'s docstring.", ""]
    if "teacher" in rows:
        t = rows["teacher"]
        head += [f"Teacher ResNet-34/8: test top-1 {t['test_top1']:.2f} %, validation {t['val_top1']:.2f} %.", ""]
    tail = ["", "**Controls** (test split, seeds 1–3; Welch's t test, two-sided; a diverged seed has no "
            "top-1 and is left out of its arm's values)", "", *contrasts(report)]
    return "\n".join([*head, format_report(report), *tail]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/work/grid/evidence-w8", help="cells' folders (outside any worktree)")
    p.add_argument("--results", default="/work/grid/evidence-w8.jsonl")
    p.add_argument("--report", action="store_true", help="print the report of what has finished")
    p.add_argument("--dry-run", action="store_true", help="validate every arm's spec and count the cells")
    p.add_argument("--markdown", action="store_true",
                   help=f"print the committed report (rows: --results, default {COMMITTED.relative_to(HERE.parent)})")
    args = p.parse_args()
    if args.markdown:
        if args.results == p.get_default("results"):
            args.results = str(COMMITTED)
        print(markdown(build(args), load_rows(Path(args.results))), end="")
        return
    sweep = build(args)
    if args.dry_run:
        run_script(lambda: print(dry_run([sweep], "the teacher")), log)
        return

    def train() -> None:
        teacher(args, Path(args.results))
        sweep.run()

    if not args.report:
        run_script(train, log)
    rows = load_rows(Path(args.results))
    if "teacher" in rows:
        print(f"teacher ResNet-34/8: test top-1 {rows['teacher']['test_top1']:.2f} %")
    print(format_report(sweep_report(sweep, rows)))


if __name__ == "__main__":
    main()
