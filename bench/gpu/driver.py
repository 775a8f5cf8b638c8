"""Everything a lent GPU should run, in one command that fits one call (at most 8 minutes).

Parts run in priority order, the most important first; each is one subprocess whose figures
go to JSON lines. Checks (the CUDA tier's parts) run side by side on the GPU (``--jobs``);
timings (the benchmarks) run alone. A part that would not finish within ``--budget`` seconds
by its estimate is not started (the summary names it and the command that runs it in the
next call); a running part is stopped at the budget's end and keeps what it wrote.

Out (``--out``, default $OUT): figures.jsonl (one line per figure, each with its ``part``),
summary.json (every part: status, exit code, seconds, counts) and log.txt (each part's output).

    bash bench/gpu/run.sh                                  # on the GPU machine (installs the carried wheels)
    bash bench/gpu/run.sh --parts throughput-compiled     # the next call: what did not fit
    bash bench/gpu/run.sh --parts evidence-h100           # whole epochs: issue 38's open H100 cells
    python bench/gpu/driver.py --list                      # parts, estimates, commands
    python bench/gpu/driver.py --dry-run --out /tmp/gpu    # here: the same parts on the CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Fashion-MNIST's IDX files: the copy bench/gpu/prepare.sh puts in the tree, else Debian's.
FASHION = next((p for p in (ROOT / ".gpu" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
                if (p / "t10k-images-idx3-ubyte.gz").exists()), ROOT / ".gpu" / "fashion-mnist")
THROUGHPUT_PAIRS = ["r34-r18@224", "vitS-r18@224", "swinS-swinT@224", "r34-r18@32"]  # bench/throughput.py's PAIRS
# Specs of the dry run's tier parts (-k matches substrings: both quickstarts, both U-Nets): small ones.
DRY_SPECS = "quickstart or custom-module or fashion-unet"


@dataclass(frozen=True)
class Ctx:
    dry: bool
    work: Path
    jobs: int
    python: str = sys.executable

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def figures(self, part: str) -> Path:
        return self.work / (part.replace("@", "_") + ".jsonl")


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    estimate_s: int  # on an H200; a guess until a call has measured it (summary.json has the times)
    exclusive: bool  # a timing: runs with nothing else on the GPU
    command: Callable[[Ctx], list[str] | None]  # None: nothing to run in this mode
    default: bool = True
    # Earlier results the part's script resumes from (it skips what they hold): copied to the
    # part's figures file first; only the lines it adds are figures of this call.
    resume_from: str | None = None


def _tier(select: str, workers: int, every_spec: bool):
    """The CUDA tier's cases matching ``select`` (pytest's ``-k``, DEVICE standing for the
    device); in a dry run their CPU twins, of a few specs where the cases run every spec."""
    def command(ctx: Ctx) -> list[str]:
        cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
               "-k", select.replace("DEVICE", ctx.device) + (f" and ({DRY_SPECS})" if ctx.dry and every_spec else "")]
        if ctx.dry:
            return cmd + ["-m", "not cuda and not slow"]
        cmd += ["-m", "cuda"]
        if workers > 1 and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(workers)]
        return cmd
    return command


def _throughput(mode: str, pair: str | None = None):
    def command(ctx: Ctx) -> list[str]:
        cmd = [ctx.python, "bench/throughput.py", "--device", ctx.device, "--modes", mode,
               "--out", str(ctx.figures(f"throughput-{mode}" + (f"-{pair}" if pair else "")))]
        if ctx.dry:  # two images, one step (every pair: the 32-px one); Dynamo without code generation
            return cmd + ["--pairs", pair or "r34-r18@32", "--batch", "2", "--steps", "1", "--rounds", "1",
                          "--warmup", "1", "--threads", "1", "--backend", "eager"]
        return cmd + ["--pairs", pair] if pair else cmd
    return command


def _data(ctx: Ctx) -> list[str]:
    cmd = [ctx.python, "bench/data_throughput.py", "--device", ctx.device, "--root", str(FASHION),
           "--out", str(ctx.figures("data")), "--cache", str(ctx.work / "png")]
    if ctx.dry:
        return cmd + ["--sizes", "128", "--val", "64", "--batch", "16", "--steps", "2", "--warmup", "1",
                      "--repeats", "1", "--threads", "1", "--workers", "0"]
    return cmd + ["--sizes", "6000", "--repeats", "2", "--side", "224", "--batch", "256", "--workers", "8",
                  "--threads", "4"]


def _stablekd(ctx: Ctx) -> list[str] | None:
    if ctx.dry:
        return None  # cells of whole epochs: nothing tiny to run
    return [ctx.python, "bench/stablekd_study.py", "--device", "cuda", "--jobs", "10", "--block", "full",
            "--root", str(FASHION), "--results", str(ctx.figures("stablekd"))]


def _evidence_h100(ctx: Ctx) -> list[str]:
    """Issue 38 item 4's cells (bench/stablekd_study.py --block h100-open); in a dry run one seed
    of them at width / 16, three epochs each (5/2 has three stages) and a one-epoch teacher."""
    cmd = [ctx.python, "bench/stablekd_study.py", "--block", "h100-open", "--device", ctx.device,
           "--root", str(FASHION), "--results", str(ctx.figures("evidence-h100"))]
    if ctx.dry:
        return cmd + ["--width-div", "16", "--jobs", "1", "--threads", "1", "--seeds", "0", "--base-epochs", "3",
                      "--teacher-epochs", "1", "--work", str(ctx.work / "stablekd-study")]
    return cmd + ["--jobs", "10"]  # the stablekd part's work folder: its teacher is trained once


def _lm_throughput(ctx: Ctx) -> list[str]:
    cmd = [ctx.python, "bench/lm_throughput.py", "--device", ctx.device, "--out", str(ctx.figures("lm-throughput"))]
    if ctx.dry:
        return cmd + ["--width", "64", "--teacher-layers", "2", "--vocab", "512", "--batch", "2", "--seq", "32",
                      "--steps", "1", "--rounds", "1", "--warmup", "1", "--threads", "1"]
    return cmd + ["--width", "1024", "--teacher-layers", "16", "--batch", "16", "--seq", "1024", "--rounds", "5"]


def _lm_memory(ctx: Ctx) -> list[str]:
    cmd = [ctx.python, "bench/lm_memory.py", "--measure", "--device", ctx.device,
           "--out", str(ctx.figures("lm-memory"))]
    if ctx.dry:  # the prediction only: the CPU's peak is not measured
        return cmd + ["--size", "tiny", "--batch", "2", "--seq", "32", "--steps", "1"]
    return cmd  # Qwen2.5-0.5B student + 1.5B teacher, 4 x 1024 tokens, 3 steps


def _env(ctx: Ctx) -> list[str]:
    return [ctx.python, str(Path(__file__).resolve()), "--env-report", str(ctx.figures("env"))]


def _compiled_throughput(pair: str) -> Part:
    return Part(f"throughput-compiled-{pair}", f"bench/throughput.py, {pair}, compiled", 240, True,
                _throughput("compiled", pair))


# Priority order: the cheap checks, then the goal's headline figures (every pair eager, the
# ResNet pair compiled), the causal-LM figures issues 36 and 37 wait for (kdgraph's step against
# a hand-written loop; measured peak memory against kdgraph.lm.memory), the data path, the
# compiled tier, the other pairs compiled; only when named: whole-epoch evidence.
PARTS: list[Part] = [
    Part("env", "torch, the GPU, the packages kdgraph imports", 15, False, _env),
    Part("tier-eager", "every spec, eager, channels_last on and off", 120, False, _tier("on_DEVICE and eager", 6, True)),
    Part("tier-other", "bf16 terms within 3 % of fp32; resume bit-exact", 60, False,
         _tier("(bf16 or resume) and DEVICE", 1, False)),
    Part("throughput-eager", "bench/throughput.py, every pair, eager, against the strong loop", 120, True,
         _throughput("eager")),
    _compiled_throughput(THROUGHPUT_PAIRS[0]),
    Part("lm-throughput", "bench/lm_throughput.py, llama 16x1024 -> 8x512, 16 x 1024 tokens: kdgraph against "
         "the hand-written loop", 90, True, _lm_throughput),
    Part("lm-memory", "bench/lm_memory.py --measure, Qwen2.5 0.5B + 1.5B: peak against the prediction, "
         "checkpointing off and on", 90, False, _lm_memory),
    Part("data", "bench/data_throughput.py at 224 px: in-memory against streamed", 120, True, _data),
    Part("tier-compiled", "every spec, torch.compile (inductor)", 300, False, _tier("on_DEVICE and compiled", 8, True)),
    *[_compiled_throughput(pair) for pair in THROUGHPUT_PAIRS[1:]],
    # alone: its 10 cells fill the GPU, and it trains the teacher the stablekd part then reuses
    Part("evidence-h100", "bench/stablekd_study.py --block h100-open: issue 38's open full-width cells, 3 seeds",
         300, True, _evidence_h100, default=False, resume_from="bench/results/stablekd-study-full.jsonl"),
    Part("stablekd", "bench/stablekd_study.py --block full: the cells not yet in its results", 480, False,
         _stablekd, default=False, resume_from="bench/results/stablekd-study-full.jsonl"),
]


def select_parts(names: list[str] | None) -> list[Part]:
    """The parts named (a name also picks the parts it prefixes: ``tier``, ``throughput-compiled``),
    in priority order; without names, the default ones."""
    if not names:
        return [p for p in PARTS if p.default]
    unknown = [n for n in names if not any(p.name == n or p.name.startswith(n + "-") for p in PARTS)]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(p.name for p in PARTS)}")
    return [p for p in PARTS if any(p.name == n or p.name.startswith(n + "-") for n in names)]


@dataclass
class Running:
    part: Part
    proc: subprocess.Popen
    started: float
    log: Path
    skip: int  # lines of the figures file that were there before the part ran


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (pytest workers, DataLoader workers), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _figures(ctx: Ctx, part: Part, skip: int) -> list[dict]:
    path = ctx.figures(part.name)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines()[skip:]:
        try:
            rows.append({"part": part.name, **json.loads(line)})
        except json.JSONDecodeError:  # a line cut by a stop at the budget's end
            continue
    return rows


def run_parts(parts: list[Part], ctx: Ctx, budget_s: float, out: Path) -> list[dict]:
    """Run ``parts`` in order within ``budget_s``; returns one record per part (summary.json)."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("figures.jsonl", "log.txt"):  # one run, one set of figures
        (out / name).unlink(missing_ok=True)
    t0, running, records = time.monotonic(), [], {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def left() -> float:
        return budget_s - (time.monotonic() - t0)

    def write_summary() -> list[dict]:
        """summary.json as it stands (rewritten after every part: a call cut short keeps it)."""
        summary = [records.get(p.name, {"part": p.name, "status": "pending"}) for p in parts]
        (out / "summary.json").write_text(json.dumps({"dry_run": ctx.dry, "budget_s": budget_s,
                                                      "seconds": round(time.monotonic() - t0, 1),
                                                      "parts": summary}, indent=1))
        return summary

    def reap(block_until_free: int | None) -> None:
        """Collect finished parts; stop any still running at the budget's end. Waits until at most
        ``block_until_free`` parts run (None: just look once)."""
        while True:
            for r in list(running):
                over = left() <= 0
                if over and r.proc.poll() is None:
                    _stop(r.proc)
                if r.proc.poll() is not None:
                    running.remove(r)
                    records[r.part.name] = _finish(ctx, r, timed_out=over, out=out)
                    write_summary()
            if block_until_free is None or len(running) <= block_until_free:
                return
            time.sleep(0.5)

    for part in parts:
        cmd = part.command(ctx)
        if cmd is None:
            records[part.name] = {"part": part.name, "status": "skipped", "why": "nothing to run in a dry run"}
            continue
        reap(0 if part.exclusive else ctx.jobs - 1)
        # the estimates are a GPU's: a dry run starts every part while there is time
        if left() <= 0 or (part.estimate_s > left() and not ctx.dry):
            records[part.name] = {"part": part.name, "status": "skipped", "estimate_s": part.estimate_s,
                                  "why": f"does not fit: {max(left(), 0):.0f} s of the budget left"}
            continue
        figures = ctx.figures(part.name)
        figures.unlink(missing_ok=True)
        if part.resume_from:
            shutil.copyfile(ROOT / part.resume_from, figures)
        skip = len(figures.read_text().splitlines()) if figures.exists() else 0
        log = ctx.work / (part.name.replace("@", "_") + ".log")
        env_part = {**env, "KDGRAPH_TEST_JSONL": str(ctx.figures(part.name))}
        print(f"[{time.monotonic() - t0:6.0f} s] start {part.name}: {' '.join(cmd)}", flush=True)
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env_part, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        running.append(Running(part, proc, time.monotonic(), log, skip))
        if part.exclusive:
            reap(0)
    reap(0)
    return write_summary()


def _finish(ctx: Ctx, r: Running, timed_out: bool, out: Path) -> dict:
    rows = _figures(ctx, r.part, r.skip)
    with (out / "figures.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({"dry_run": ctx.dry, **row}) + "\n")
    text = r.log.read_text(errors="replace")
    with (out / "log.txt").open("a") as f:
        f.write(f"\n===== {r.part.name} (exit {r.proc.returncode}) =====\n{text[-400_000:]}")
    rc = r.proc.returncode
    record = {"part": r.part.name, "status": "stopped" if timed_out else ("ok" if rc == 0 else "failed"),
              "exit_code": rc, "seconds": round(time.monotonic() - r.started, 1), "figures": len(rows)}
    outcomes = [row["outcome"] for row in rows if "outcome" in row]
    if outcomes:
        record["tests"] = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"{r.part.name}: {record['status']} in {record['seconds']} s"
          + (f", tests {record['tests']}" if outcomes else f", {len(rows)} figures"), flush=True)
    return record


def env_report(path: Path) -> None:
    """One JSON line: python, torch, the GPU, and the versions of what kdgraph imports."""
    import importlib.metadata as md
    import platform

    import torch

    row = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
           "cpus": os.cpu_count()}
    for name in ("torchvision", "timm", "pydantic", "pydantic-core", "typer", "rich", "networkx", "pyyaml",
                 "safetensors", "numpy", "pytest", "pytest-xdist", "transformers"):
        try:
            row[name] = md.version(name)
        except md.PackageNotFoundError:
            row[name] = None
    import kdgraph.runtime.loop  # noqa: F401  (fails here, not in every part, if a package is missing)

    path.write_text(json.dumps(row) + "\n")
    print(json.dumps(row))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=None, metavar="PART",
                   help="parts to run, in priority order whatever the order given (a prefix picks a group: tier, "
                        "throughput-compiled); default: every default part")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for all parts (default 420: an 8-minute call less installing the wheels and stopping)")
    p.add_argument("--jobs", type=int, default=3, help="check parts side by side")
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="where figures.jsonl, summary.json and log.txt go (default $OUT)")
    p.add_argument("--work", type=Path, default=Path("/tmp/kdgraph-gpu"), help="scratch: per-part logs and figures")
    p.add_argument("--list", action="store_true", help="print the parts and their commands, run nothing")
    p.add_argument("--env-report", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None and not (args.list or args.env_report):
        p.error("--out is required where $OUT is not set")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env_report:
        env_report(args.env_report)
        return 0
    ctx = Ctx(dry=args.dry_run, work=args.work, jobs=args.jobs)
    parts = select_parts(args.parts)
    if args.list:
        for part in parts:
            cmd = part.command(ctx)
            print(f"{part.name:<37}{part.estimate_s:>5} s  {'alone' if part.exclusive else 'shared'}  {part.what}\n"
                  f"{'':<37}{' '.join(cmd) if cmd else '(nothing in a dry run)'}")
        return 0
    summary = run_parts(parts, ctx, args.budget, args.out)
    print(f"\n{'part':<37}{'status':<9}{'seconds':>8}  result")
    for rec in summary:
        result = rec.get("tests") or rec.get("why") or f"{rec.get('figures', 0)} figures"
        print(f"{rec['part']:<37}{rec['status']:<9}{rec.get('seconds', ''):>8}  {result}")
    rest = [r["part"] for r in summary if r["status"] in ("skipped", "stopped") and "dry run" not in r.get("why", "")]
    if rest:
        print(f"\nnext call: bash bench/gpu/run.sh --parts {' '.join(rest)}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
