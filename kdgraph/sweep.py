"""`kdgraph sweep`: a grid of spec overrides x seeds, each cell a separate, resumable training
process, each finished cell one line of a JSONL; a report that chooses on the validation split
with the selection seeds and reports the test split on fresh seeds.

    Sweep(spec, arms, seeds, report_seeds, baseline, results, work).run()   train what is missing
    sweep_report(sweep, rows)                                                the numbers
    format_report(report)                                                    the markdown
    train_teacher_once, dry_run, run_script                                  a grid script's teacher, check, main

Arms and grids. An ``Arm`` is a named set of overrides (a recipe) with a grid of overrides
tuned within it (``optim.lr=0.5,1,2``). On the command line the axes named by ``--baseline``
split the grid into arms, one per combination of their values (compared with each other);
the other axes are tuned within each arm; without a baseline there is one arm. An arm may
instead ``follow`` another: it has no grid and trains at the other arm's chosen point (a
control "at StableKD's lr").

Protocol. 1. Selection: every grid point of an arm on each selection seed; the point with the
best mean validation score (``metric``, top-1 by default: ``student_val_top1`` of an image
spec, per-image or per-pixel, with ``data.val_fraction``; ``bpb``, lower is better, for a causal LM) is the
arm's choice (ties: the first in grid order; a diverged cell scores below any other).
With ``extend`` > 0, a choice at the edge of a numeric axis whose values are all positive adds
the next value of its geometric progression there (at most ``extend`` per side), and
selection goes on: grids end bracketed where the budget allows. 2. Report: each arm's choice
on each report seed: the test split's score (``student_top1``, or ``student_<metric>``), mean, sample std, 95 %
Student-t interval, and Welch's t test against the baseline arm (two-sided p). A choice still
at the edge of its grid is flagged.

Cells. A cell is (arm overrides + grid point, seed); its key is a hash of the spec file's
bytes, the overrides (the sweep's common ``--set`` ones first) and the seed: a row of the
results file with that key is that cell done, skipped on a rerun (another spec file, override
or seed is another cell). A cell trains in its own process (``python -m kdgraph.sweep
JOB.json``) into ``WORK/cells/<arm>-<point>-s<seed>-<key>``; a killed one resumes from its
last checkpoint when the sweep is run again. One sweep at a time holds ``WORK/.lock`` (its
cells' processes inherit it: an orphaned cell still holds it).

The statistics are written out here (``t_sf2``, ``t_quantile``): the regularized incomplete
beta function by Lentz's continued fraction (Numerical Recipes, 6.4), so that kdgraph needs no
scipy; the tests check them against scipy.stats.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kdgraph.errors import KDGraphError

__all__ = ["Arm", "Cell", "Sweep", "arms_from_cli", "append_row", "format_report", "from_cli", "load_rows", "sweep_report",
           "t_quantile", "t_sf2", "train_resumable", "welch"]


# --------------------------------------------------------------------- the statistics


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (a two-sided p-value)."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t with ``df`` degrees of freedom, by bisection."""
    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) / 2 > 1.0 - q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def welch(a: list[float], b: list[float]) -> dict | None:
    """Welch's unequal-variance t test of mean(a) - mean(b): {diff, t, df, p} (two-sided), None
    where it is undefined (fewer than 2 values on a side, or no variance on either)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return None
    diff = statistics.fmean(a) - statistics.fmean(b)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "t": t, "df": df, "p": t_sf2(t, df)}


def describe(values: list[float]) -> dict:
    """{n, mean, std (sample), ci95 (Student t; None for n < 2), values}."""
    n = len(values)
    mean = statistics.fmean(values) if n else None
    std = statistics.stdev(values) if n > 1 else None
    ci = None
    if n > 1:
        half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
        ci = (mean - half, mean + half)
    return {"n": n, "mean": mean, "std": std, "ci95": ci, "values": list(values)}


# --------------------------------------------------------------------- arms and cells


@dataclass(frozen=True)
class Arm:
    """A named set of overrides with a grid tuned within it (``grid``: (axis, values) pairs,
    values as written), or one that trains at the point another arm chose (``follow``)."""

    name: str
    overrides: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()
    follow: str | None = None


@dataclass(frozen=True)
class Cell:
    arm: str
    point: tuple[tuple[str, str], ...]  # (axis, value) of the grid point
    seed: int
    overrides: tuple[str, ...]  # everything set on the spec file but the seed and output
    key: str

    @property
    def slug(self) -> str:
        point = "-".join(f"{a.split('.')[-1]}{v}" for a, v in self.point)
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.arm}-{point}-s{self.seed}-{self.key[:10]}")


def parse_grid(items: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``--grid optim.lr=0.5,1,2`` -> [("optim.lr", ("0.5", "1", "2"))]; one line per problem."""
    axes: list[tuple[str, tuple[str, ...]]] = []
    for item in items:
        axis, sep, values = item.partition("=")
        vals = tuple(v.strip() for v in values.split(","))
        if not sep or not axis.strip() or not all(vals):
            raise KDGraphError(f"--grid {item!r}: write dotted.path=value1,value2,... (values parsed as YAML)")
        if axis.strip() in {a for a, _ in axes}:
            raise KDGraphError(f"--grid: {axis.strip()} is given twice; list its values once, comma-separated")
        if len(set(vals)) != len(vals):
            raise KDGraphError(f"--grid {item!r}: a value is listed twice")
        axes.append((axis.strip(), vals))
    if not axes:
        raise KDGraphError("kdgraph sweep needs at least one --grid dotted.path=value1,value2,...")
    return axes


def arms_from_cli(grid: list[str], baseline: str | None) -> tuple[list[Arm], str | None]:
    """The arms of ``--grid`` axes split by the axes ``--baseline`` names (``axis=value``, comma-
    separated pairs for several), and the baseline arm's name (None without a baseline)."""
    axes = parse_grid(grid)
    if baseline is None:
        return [Arm("all", (), tuple(axes))], None
    pairs = [p.split("=", 1) for p in baseline.split(",")]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise KDGraphError(f"--baseline {baseline!r}: write axis=value (a --grid axis and one of its values)")
    fixed, values = dict(pairs), dict(axes)
    for axis, value in fixed.items():
        if axis not in values or value not in values[axis]:
            given = ", ".join(a + "=" + ",".join(v) for a, v in axes)
            raise KDGraphError(f"--baseline {baseline!r}: {axis}={value} is not a value of a --grid axis ({given})")
    arm_axes = [(a, v) for a, v in axes if a in fixed]
    tuned = tuple((a, v) for a, v in axes if a not in fixed)
    arms = []
    for combo in itertools.product(*(v for _, v in arm_axes)):
        sets = tuple(f"{a}={v}" for (a, _), v in zip(arm_axes, combo))
        arms.append(Arm(",".join(sets), sets, tuned))
    return arms, ",".join(f"{a}={fixed[a]}" for a, _ in arm_axes)


def _numeric(values: list[str]) -> list[float] | None:
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return None
    return nums if all(math.isfinite(x) and x > 0 for x in nums) else None


def _fmt(x: float) -> str:
    return f"{x:.6g}"


@dataclass
class ArmState:
    """Where an arm's selection stands: its grid (extended where it grew), the validation mean
    of each point (None: a seed diverged), the chosen point and the axes where it sits at the
    grid's edge, and the selection cells still to train (then nothing is chosen yet)."""

    arm: Arm
    grid: list[tuple[str, list[str]]]
    means: dict[tuple, float | None] = field(default_factory=dict)
    chosen: tuple | None = None
    edges: list[str] = field(default_factory=list)
    pending: list[Cell] = field(default_factory=list)


def load_rows(path: Path) -> dict[str, dict]:
    """The results file's rows by cell key (the first row of a key counts; a line that is not a JSON
    object is passed over); {} before any."""
    rows: dict[str, dict] = {}
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    for line in lines:
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line a kill cut short: its cell is not done (and trains again)
            continue
        if isinstance(row, dict):
            rows.setdefault(row.get("key"), row)
    return rows


def append_row(path: Path, row: dict) -> None:
    """One line appended to ``path``, on a line of its own (after a line a kill cut short)."""
    with open(path, "a+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(f.tell() - 1)
            cut = f.read(1) != "\n"
            f.seek(0, os.SEEK_END)
            if cut:
                f.write("\n")
        f.write(json.dumps(row) + "\n")


@dataclass
class Sweep:
    """A sweep of ``spec`` (a YAML file): ``arms`` compared, each tuned on ``seeds`` (selection)
    and reported on ``report_seeds``; ``common``: ``--set`` overrides of every cell; ``waves``:
    arm names run together, selection then report, wave by wave (default: all arms at once)."""

    spec: Path
    arms: list[Arm]
    seeds: tuple[int, ...]
    report_seeds: tuple[int, ...]
    results: Path
    work: Path
    baseline: str | None = None
    common: tuple[str, ...] = ()
    allow_code: bool = False
    extend: int = 0
    waves: list[list[str]] | None = None
    jobs: int = 1
    log: object = print
    metric: str = "top1"  # the task's metric chosen on (val_<metric>) and reported (test_<metric>)
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        self.spec, self.results, self.work = Path(self.spec), Path(self.results), Path(self.work)
        if not self.spec.is_file():
            raise KDGraphError(f"kdgraph sweep: {self.spec} is not a spec file")
        self.spec_sha = hashlib.sha256(self.spec.read_bytes()).hexdigest()
        names = [a.name for a in self.arms]
        if not names or len(set(names)) != len(names):
            raise KDGraphError(f"kdgraph sweep: arm names must be given and distinct, got {names}")
        by_name = {a.name: a for a in self.arms}
        for a in self.arms:
            if a.follow is not None and (a.follow not in by_name or by_name[a.follow].follow is not None):
                raise KDGraphError(f"arm {a.name}: follows {a.follow!r}, which is not an arm with a grid")
        if self.baseline is not None and self.baseline not in by_name:
            raise KDGraphError(f"--baseline {self.baseline!r} is not one of the arms ({', '.join(names)})")
        if not self.seeds:
            raise KDGraphError("kdgraph sweep: --seeds needs at least one selection seed")
        if shared := sorted(set(self.seeds) & set(self.report_seeds)):
            raise KDGraphError(f"kdgraph sweep: --report-seeds must be fresh, not selection seeds; both have {shared}")
        self.waves = self.waves or [names]
        if sorted(n for w in self.waves for n in w) != sorted(names):
            raise KDGraphError(f"kdgraph sweep: the waves {self.waves} must list every arm once ({names})")
        self.by_name = by_name

    # ------------------------------------------------------------------ cells

    def cell(self, arm: Arm, point: tuple, seed: int) -> Cell:
        overrides = (*self.common, *arm.overrides, *(f"{a}={v}" for a, v in point))
        ident = json.dumps({"spec_sha256": self.spec_sha, "overrides": list(overrides), "seed": seed})
        return Cell(arm.name, tuple(point), seed, overrides, hashlib.sha256(ident.encode()).hexdigest()[:16])

    def arm_state(self, arm: Arm, done: dict[str, dict]) -> ArmState:
        """Selection from the rows ``done``: see the module's docstring."""
        if arm.follow is not None:
            target = self.arm_state(self.by_name[arm.follow], done)
            return ArmState(arm, [], {}, target.chosen, [], target.pending)
        grid, added = [(a, list(v)) for a, v in arm.grid], {}
        while True:
            points = [tuple(zip([a for a, _ in grid], combo)) for combo in itertools.product(*(v for _, v in grid))]
            missing = [c for p in points for s in self.seeds if (c := self.cell(arm, p, s)).key not in done]
            if missing:
                return ArmState(arm, grid, pending=missing)
            means = {p: self._mean(arm, p, self.seeds, done, f"val_{self.metric}") for p in points}
            sign = 1.0 if self.higher_is_better else -1.0
            chosen = max(points, key=lambda p: -math.inf if means[p] is None else sign * means[p])  # the first best
            edges, grew = [], False
            for i, (axis, values) in enumerate(grid):
                nums = _numeric(values)
                if len(values) < 2 or nums is None or float(chosen[i][1]) not in (min(nums), max(nums)):
                    continue
                edges.append(axis)
                side = "low" if float(chosen[i][1]) == min(nums) else "high"
                if added.get((axis, side), 0) < self.extend:
                    s = sorted(nums)
                    new = _fmt(s[0] ** 2 / s[1] if side == "low" else s[-1] ** 2 / s[-2])
                    if new not in values:
                        grid[i] = (axis, [new, *values] if side == "low" else [*values, new])
                        added[(axis, side)] = added.get((axis, side), 0) + 1
                        grew = True
            if not grew:
                return ArmState(arm, grid, means, chosen, edges)

    def _mean(self, arm: Arm, point: tuple, seeds, done: dict, key: str) -> float | None:
        vals = [done[self.cell(arm, point, s).key].get(key) for s in seeds]
        return None if any(v is None for v in vals) else statistics.fmean(vals)

    def report_cells(self, state: ArmState) -> list[Cell]:
        if state.chosen is None:
            return []
        return [self.cell(state.arm, state.chosen, s) for s in self.report_seeds]

    def pending(self, wave: list[str], done: dict[str, dict]) -> list[Cell]:
        """The cells of ``wave`` to train next: its selection cells, else its report cells."""
        states = [self.arm_state(self.by_name[n], done) for n in wave]
        cells = [c for st in states for c in st.pending]
        if not cells:
            cells = [c for st in states for c in self.report_cells(st) if c.key not in done]
        return list({c.key: c for c in cells}.values())

    def count(self) -> int:
        """Cells of the grid as given (before any extension), report cells included."""
        n = 0
        for a in self.arms:
            points = math.prod(len(v) for _, v in a.grid) if a.follow is None else 0
            n += points * len(self.seeds) + len(self.report_seeds)
        return n

    # ------------------------------------------------------------------ running

    def check(self) -> None:
        """Every arm's overrides load (one line per problem, before anything trains), and the
        spec evaluates on a validation split (selection reads it)."""
        from kdgraph.spec import load_spec
        from kdgraph.tasks.create import spec_task

        for arm in self.arms:
            target = self.by_name[arm.follow] if arm.follow else arm
            point = tuple((a, v[0]) for a, v in target.grid)
            spec = load_spec(self.spec, list(self.cell(arm, point, self.seeds[0]).overrides),
                             allow_code=self.allow_code)
            task = spec_task(spec)
            if self.metric not in task.metrics:
                raise KDGraphError(f"kdgraph sweep chooses on validation {self.metric}; {self.spec} is a {task.name} "
                                   f"spec, which measures {', '.join(task.metrics)}")
            if self.metric == task.best_metric and self.higher_is_better != task.higher_is_better:
                raise KDGraphError(f"kdgraph sweep: {task.name}'s {self.metric} is better "
                                   f"{'higher' if task.higher_is_better else 'lower'}; the sweep was told otherwise")
            if spec.data.val_fraction <= 0:
                raise KDGraphError(f"kdgraph sweep chooses on a validation split and {self.spec} has none: set "
                                   "data.val_fraction (e.g. --set data.val_fraction=0.1)")

    def run(self) -> None:
        """Train every cell not yet in the results file, wave by wave; resumable."""
        self.check()
        self.work.mkdir(parents=True, exist_ok=True)
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KDGraphError(f"another sweep (or a cell it started) is running in {self.work}; wait for it "
                                   "or stop it first") from None
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
            try:
                for wave in self.waves:
                    while cells := self.pending(wave, load_rows(self.results)):
                        self.log(f"wave {', '.join(wave)}: {len(cells)} cell(s) to train")
                        self._run_cells(cells, lock.fileno())
            finally:
                signal.signal(signal.SIGTERM, previous)

    def _run_cells(self, cells: list[Cell], lock_fd: int) -> None:
        queue, running = list(cells), []
        try:
            while queue or running:
                while queue and len(running) < max(self.jobs, 1):
                    cell = queue.pop(0)
                    running.append((cell, self._launch(cell, lock_fd), time.time()))
                time.sleep(0.2)
                for item in [r for r in running if r[1].poll() is not None]:
                    running.remove(item)
                    self._finish(*item)
        finally:
            for _, proc, _ in running:  # a stopped sweep stops its cells: each checkpoints and exits
                proc.send_signal(signal.SIGTERM)
            for _, proc, _ in running:
                proc.wait()

    def paths(self, cell: Cell) -> tuple[Path, Path, Path, Path]:
        """(job file, result file, log file, output folder) of ``cell``."""
        return (self.work / "jobs" / f"{cell.slug}.json", self.work / "jobs" / f"{cell.slug}.result.json",
                self.work / "logs" / f"{cell.slug}.log", self.work / "cells" / cell.slug)

    def _launch(self, cell: Cell, lock_fd: int) -> subprocess.Popen:
        job, result, log, out = self.paths(cell)
        for p in (job, log):
            p.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)  # written by an earlier process of this cell only
        job.write_text(json.dumps({"spec": str(self.spec.resolve()), "allow_code": self.allow_code,
                                   "overrides": [*cell.overrides, f"seed={cell.seed}", f"output={out.resolve()}"],
                                   "result": str(result.resolve())}, indent=1))
        self.log(f"{cell.slug}: training (log {log})")
        with open(log, "a") as f:
            return subprocess.Popen([sys.executable, "-m", "kdgraph.sweep", str(job)], stdout=f,
                                    stderr=subprocess.STDOUT, pass_fds=(lock_fd,))

    def _finish(self, cell: Cell, proc: subprocess.Popen, t0: float) -> None:
        _, result, log, out = self.paths(cell)
        if proc.returncode != 0 or not result.exists():
            tail = (log.read_text().strip().splitlines() or ["(no output)"])[-1] if log.exists() else "(no log)"
            raise KDGraphError(f"cell {cell.slug} failed (exit {proc.returncode}): {tail[:300]}; see {log}")
        got = json.loads(result.read_text())
        row = {"key": cell.key, "arm": cell.arm, "point": dict(cell.point), "seed": cell.seed,
               "overrides": list(cell.overrides), "spec": str(self.spec), "spec_sha256": self.spec_sha,
               "output": str(out), "wall_s": round(time.time() - t0, 1), **_scores_of(got, self.metric)}
        append_row(self.results, row)
        m = self.metric
        shown = "diverged" if row.get("diverged") else f"val {row[f'val_{m}']:.4g} test {row[f'test_{m}']:.4g}"
        self.log(f"{cell.slug}: {shown} ({row['wall_s']:.0f} s)")


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _scores_of(got: dict, metric: str = "top1") -> dict:
    """A row's scores from a cell's result (top-1 and ``metric``): a diverged cell has none."""
    if "diverged" in got:
        return {"diverged": got["diverged"], "val_top1": None, "test_top1": None, f"val_{metric}": None,
                f"test_{metric}": None}
    s = got["summary"]
    return {f"val_{metric}": s.get(f"student_val_{metric}"), f"test_{metric}": s.get(f"student_{metric}"),
            f"teacher_{metric}": s.get(f"teacher_{metric}"), "val_top1": s.get("student_val_top1"),
            "val_top5": s.get("student_val_top5"),
            "test_top1": s.get("student_top1"), "test_top5": s.get("student_top5"),
            "best_top1": s.get("best_top1"), "best_epoch": s.get("best_epoch"),
            "teacher_top1": s.get("teacher_top1"), "epochs": s.get("epochs"), "eval_split": s.get("eval_split"),
            "train_wall_s": s.get("wall_time_s")}


def train_resumable(spec_file: Path | str, overrides: list[str], allow_code: bool = False) -> dict:
    """Train ``spec_file`` with ``overrides`` in this process, resuming where its output folder
    has a checkpoint or a summary (a finished run returns its summary), else starting over there;
    {"summary": ...}, or {"diverged": message} where the loss stopped being finite."""
    from kdgraph.runtime.loop import NonFiniteLoss, train
    from kdgraph.runtime.runs import RunFolder
    from kdgraph.spec import load_spec

    spec = load_spec(spec_file, overrides, allow_code=allow_code)
    folder = RunFolder(spec.output_dir)
    resume = folder.last_checkpoint.exists() or folder.summary.exists()
    print(f"{'resuming' if resume else 'starting'} {spec.output_dir}", flush=True)
    source = {"spec_file": str(Path(spec_file).resolve()), "overrides": list(overrides)}
    try:
        return {"summary": train(spec, resume=resume, quiet=True, force=not resume, source=source)}
    except NonFiniteLoss as exc:
        return {"diverged": str(exc)}


def train_teacher_once(results: Path, key: str, spec_file: Path | str, output: Path, metric: str = "top1",
                       extra: dict[str, str] | None = None, what: str = "the teacher", log=print) -> dict | None:
    """Train a grid's teacher (``spec_file``, resumable, into ``output``) unless ``results`` has a
    row of ``key``; its row appended there: {key, "arm": "teacher", test_<metric>, val_<metric>,
    each ``extra`` row field from its summary field, epochs, wall_s, output}. The new row, None
    where it was there already."""
    results = Path(results)
    if key in load_rows(results):
        return None
    log(f"training {what}")
    t0 = time.perf_counter()
    s = train_resumable(spec_file, [f"output={output}"])["summary"]
    row = {"key": key, "arm": "teacher", f"test_{metric}": s[f"student_{metric}"],
           f"val_{metric}": s.get(f"student_val_{metric}"), **{k: s[v] for k, v in (extra or {}).items()},
           "epochs": s["epochs"], "wall_s": round(time.perf_counter() - t0, 1), "output": s["output"]}
    results.parent.mkdir(parents=True, exist_ok=True)
    append_row(results, row)
    return row


def dry_run(sweeps: list[Sweep], also: str) -> str:
    """Check every sweep's arms (``Sweep.check``: each spec loads, with a validation split) and
    say what a run would train: arms, cells as given, the most a grown grid adds, and ``also``."""
    for s in sweeps:
        s.check()
    arms = sum(len(s.arms) for s in sweeps)
    where = f" in {len(sweeps)} sweeps" if len(sweeps) > 1 else ""
    grow = 2 * max(s.extend for s in sweeps)
    return (f"{arms} arms{where}, {sum(s.count() for s in sweeps)} cells as given (+ up to {grow} per swept arm "
            f"where a grid grows) + {also}; specs valid")


def run_script(body, log=print, stopped: str = "stopped; the same command resumes the grid") -> None:
    """Run ``body()``, a grid script's training, as its command: a KDGraphError exits with its
    one-line error; an interrupt (SIGINT, or SIGTERM inside ``Sweep.run``: the running cell has
    checkpointed) logs ``stopped`` and exits 130."""
    try:
        body()
    except KDGraphError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log(stopped)
        sys.exit(130)


def run_job(job_path: Path) -> int:
    """One cell, in this process (``python -m kdgraph.sweep JOB``): ``train_resumable``, and its
    result written where the job says; exit status 2 with a one-line error."""
    job = json.loads(Path(job_path).read_text())
    try:
        got = train_resumable(job["spec"], job["overrides"], job["allow_code"])
    except KDGraphError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    Path(job["result"]).write_text(json.dumps(got, default=str))
    return 0


def parse_seeds(text: str, what: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> (1, 2, 3); "" -> ()."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise KDGraphError(f"{what} {text!r}: write comma-separated integers, e.g. 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise KDGraphError(f"{what} {text!r}: a seed is listed twice")
    return seeds


def from_cli(spec: Path, grid: list[str], seeds: str, report_seeds: str, baseline: str | None = None,
             overrides: list[str] | None = None, allow_code: bool = False, work: Path | None = None,
             results: Path | None = None, jobs: int = 1, extend: int = 0) -> Sweep:
    """The Sweep of `kdgraph sweep`'s options; WORK defaults to the spec's output folder + ``-sweep``
    and the results file to WORK/results.jsonl. The metric is top-1 where the spec's task measures
    it, else the task's own best metric and direction (a causal LM's bits per byte, lower is better)."""
    from kdgraph.spec import load_spec
    from kdgraph.tasks.create import spec_task

    arms, base = arms_from_cli(grid, baseline)
    loaded = load_spec(spec, overrides or [], allow_code=allow_code)
    task = spec_task(loaded)
    metric, higher = ("top1", True) if "top1" in task.metrics else (task.best_metric, task.higher_is_better)
    if work is None:
        work = Path(str(loaded.output_dir) + "-sweep")
    return Sweep(spec, arms, parse_seeds(seeds, "--seeds"), parse_seeds(report_seeds, "--report-seeds"),
                 results or Path(work) / "results.jsonl", work, base, tuple(overrides or ()), allow_code, extend,
                 jobs=jobs, metric=metric, higher_is_better=higher)


# --------------------------------------------------------------------- the report


def sweep_report(sweep: Sweep, done: dict[str, dict] | None = None) -> dict:
    """The sweep's numbers from its rows (default: its results file): per arm, the validation
    mean of each grid point on the selection seeds, the choice and its edge axes; the test
    score (``sweep.metric``) of the choice on the report seeds (n, mean, std, 95 % CI) and Welch's test against
    the baseline arm. Cells not trained yet are left out (``pending`` counts them)."""
    done = load_rows(sweep.results) if done is None else done
    arms, test = [], f"test_{sweep.metric}"
    for arm in sweep.arms:
        st = sweep.arm_state(arm, done)
        cells = sweep.report_cells(st)
        rows = [done[c.key] for c in cells if c.key in done]
        entry = {"arm": arm.name, "follow": arm.follow, "grid": {a: v for a, v in st.grid},
                 "selection": [{"point": dict(p), "val_mean": m} for p, m in st.means.items()],
                 "chosen": None if st.chosen is None else dict(st.chosen), "edge": st.edges,
                 "pending": len(st.pending) + len(cells) - len(rows),
                 "diverged": sum(1 for r in rows if r.get("diverged")),
                 "test": describe([r[test] for r in rows if r.get(test) is not None])}
        arms.append(entry)
    base = next((a for a in arms if a["arm"] == sweep.baseline), None)
    for a in arms:
        a["vs_baseline"] = (None if base is None or a is base else
                            welch(a["test"]["values"], base["test"]["values"]))
    return {"spec": str(sweep.spec), "seeds": list(sweep.seeds), "report_seeds": list(sweep.report_seeds),
            "baseline": sweep.baseline, "metric": sweep.metric, "higher_is_better": sweep.higher_is_better,
            "arms": arms}


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def format_report(report: dict) -> str:
    """The report as markdown: the selection per arm, then the test table (top-1 in % to 2
    decimals; another metric, e.g. bits per byte, to 4)."""
    seeds = ",".join(map(str, report["seeds"]))
    metric = report.get("metric", "top1")
    unit, f = ("top-1 %", ".2f") if metric == "top1" else (
        f"{metric}, {'higher' if report.get('higher_is_better', True) else 'lower'} is better", ".4f")
    out = [f"**Selection** on the validation split, seeds {seeds} (mean {unit}; chosen in brackets)", ""]
    for a in report["arms"]:
        if a["follow"]:
            out.append(f"- {a['arm']}: at {a['follow']}'s choice {_point(a['chosen'])}")
            continue
        pts = ", ".join(("[{}]" if p["point"] == a["chosen"] else "{}").format(
            f"{_point(p['point'])} → {'diverged' if p['val_mean'] is None else _num(p['val_mean'], f)}")
            for p in a["selection"])  # a point's mean is None only where a seed's loss stopped being finite
        edge = f"; EDGE: the choice sits at the edge of {', '.join(a['edge'])}" if a["edge"] else ""
        more = f"; {a['pending']} cell(s) pending" if a["pending"] else ""
        out.append(f"- {a['arm']}: {pts or 'not chosen yet'}{edge}{more}")
    rs = ",".join(map(str, report["report_seeds"]))
    base = report["baseline"]
    out += ["", f"**Test split**, fresh seeds {rs} ({unit})" + (f"; Welch's t test against {base}" if base else ""),
            "", "| arm | chosen | n | mean ± std | 95 % CI | Δ | t (df) | p |", "|---|---|---|---|---|---|---|---|"]
    for a in report["arms"]:
        t, w = a["test"], a["vs_baseline"]
        ci = "–" if t["ci95"] is None else f"{t['ci95'][0]:{f}} … {t['ci95'][1]:{f}}"
        flag = " (edge)" if a["edge"] else ""
        div = f" ({a['diverged']} diverged)" if a["diverged"] else ""
        cmp = ["base", "", ""] if a["arm"] == base else (
            ["–", "–", "–"] if w is None else
            [f"{w['diff']:+{f}}", f"{w['t']:.2f} ({w['df']:.1f})", f"{w['p']:.3g}"])
        out.append(f"| {a['arm']} | {_point(a['chosen'])}{flag} | {t['n']}{div} | {_num(t['mean'], f)} ± "
                   f"{_num(t['std'], f)} | {ci} | " + " | ".join(cmp) + " |")
    return "\n".join(out)


def _point(point: dict | None) -> str:
    return "–" if point is None else (" ".join(f"{k}={v}" for k, v in point.items()) or "(no grid)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m kdgraph.sweep JOB.json  (a cell of `kdgraph sweep`)")
    sys.exit(run_job(Path(sys.argv[1])))
