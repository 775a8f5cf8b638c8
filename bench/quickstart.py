"""The quickstart's figures as a committed raw file: `make demo`'s two trainings (the teacher
from specs/quickstart-teacher.yaml, then the StableKD student from specs/quickstart.yaml) for
each seed, both specs as shipped but for the seed, the output folders and the teacher's
checkpoint; one JSON line per (seed, torch thread count) appended to --results with both test
top-1 figures (another thread count sums in another order and can move a run by a test image;
`make demo` runs at torch's default, the machine's core count). Each training's wall seconds
(model build, training, evaluation) go into the row where it ran whole in this invocation:
benchmark alone, as every timing here.

    OMP_NUM_THREADS=1 python bench/quickstart.py      # seed 0 at one torch thread (resumable)
    python bench/quickstart.py --seeds 0 1 2          # more seeds
    python bench/quickstart.py --report               # the rows
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kdgraph.sweep import append_row, load_rows, train_resumable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quickstart.jsonl"


def timed(spec_file: Path, overrides: list[str]) -> tuple[dict, float | None]:
    """``train_resumable``'s result and its wall seconds (build, training, evaluation), None where
    the run resumed from an earlier invocation (its time would be a part of the run)."""
    out = Path(next(o for o in overrides if o.startswith("output=")).split("=", 1)[1])
    fresh = not any(out.glob("*"))
    start = time.perf_counter()
    got = train_resumable(spec_file, overrides)
    return got, (round(time.perf_counter() - start, 1) if fresh else None)


def run_seed(seed: int, work: Path, results: Path) -> dict:
    """Teacher then student for ``seed`` (each resumable), their row appended; a done seed is skipped."""
    import torch

    tag = f"s{seed}-t{torch.get_num_threads()}"  # another thread count is another result
    key = f"quickstart-{tag}"
    if key in (done := load_rows(results)):
        return done[key]
    teacher_out, student_out = work / f"teacher-{tag}", work / f"student-{tag}"
    t, teacher_s = timed(ROOT / "specs" / "quickstart-teacher.yaml", [f"seed={seed}", f"output={teacher_out}"])
    s, student_s = timed(ROOT / "specs" / "quickstart.yaml",
                         [f"seed={seed}", f"output={student_out}",
                          f"teacher.checkpoint={teacher_out / 'student.safetensors'}"])
    if "diverged" in t or "diverged" in s:
        sys.exit(f"seed {seed}: the loss stopped being finite ({t.get('diverged') or s.get('diverged')})")
    row = {"key": key, "seed": seed, "teacher_top1": t["summary"]["student_top1"],
           "student_top1": s["summary"]["student_top1"], "student_epochs": s["summary"]["epochs"],
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "teacher_wall_s": teacher_s, "student_wall_s": student_s}
    results.parent.mkdir(parents=True, exist_ok=True)
    append_row(results, row)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--work", default="runs/bench-quickstart")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    if not args.report:
        for seed in args.seeds:
            run_seed(seed, Path(args.work), results)
    for row in load_rows(results).values():
        print(json.dumps(row))


if __name__ == "__main__":
    main()
