"""A run's output folder: every path in it named once (``RunFolder``), checked before
anything is built, locked while a run writes it, and never reused by surprise.

    RunFolder(out)                  the paths: checkpoints, metrics, summary, student, ...
    prepare_output(out)            the folder is a folder (or can be made) and writable
    with RunLock(out): ...          one writer at a time; a dead writer's lock is taken over
    claim(out, spec, resume, force) refuse to overwrite an earlier run without --force, and
                                    to resume with another spec (naming the keys that differ)

``OUT/run.json`` holds the resolved spec (and the spec file and ``--set`` overrides it came
from), so that ``kdgraph train SPEC --resume`` needs no override repeated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdgraph.errors import KDGraphError

# Spec keys a resumed run may change: where and how fast it runs, not what it trains.
RESUMABLE_CHANGES = ("runtime.device", "runtime.num_threads", "runtime.log_every", "runtime.log", "runtime.compile",
                     "runtime.num_workers", "runtime.pin_memory", "runtime.persistent_workers",
                     "runtime.prefetch_factor")
# Spec keys a resume with --reshard may change too: how the run is laid over torchrun's ranks
# (data.batch_size only where batch_size x ranks stays the checkpoint's: ``resharded_data``).
RESHARD_CHANGES = ("runtime.shard_student", "runtime.shard_dtype", "teacher.shard", "data.batch_size")


PREVIOUS_CHECKPOINT = "prev.pt"
SHARDED_CHECKPOINT_FILES = ("__*_*.distcp", ".metadata", "state.pt")  # what a DCP checkpoint folder holds
"""The name the checkpoint writer gives the checkpoint it replaces, beside the new one
(``checkpoint.previous_of`` reads it here)."""


@dataclass(frozen=True)
class RunFolder:
    """Every path of a run's output folder, each spelled here only."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def previous_checkpoint(self) -> Path:
        return self.checkpoints / PREVIOUS_CHECKPOINT

    @property
    def sharded_checkpoint(self) -> Path:
        """A sharded student's checkpoint (runtime.shard_student): a folder of DCP shard files."""
        return self.checkpoints / "last.dcp"

    @property
    def previous_sharded_checkpoint(self) -> Path:
        return self.checkpoints / "prev.dcp"

    @property
    def sharded_checkpoint_temp(self) -> Path:
        """Where a sharded checkpoint is written before its rename to ``sharded_checkpoint``."""
        return self.checkpoints / ".last.dcp.tmp"

    @property
    def corrupt_checkpoint(self) -> Path:
        """Where a damaged last.pt is set aside on resume (left in place, the next save would
        rotate it into prev.pt)."""
        return self.checkpoints / "last.pt.corrupt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def student(self) -> Path:
        """The final student, exported (the default of ``kdgraph eval`` and ``export``)."""
        return self.root / "student.safetensors"

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def samples(self) -> Path:
        """A denoiser's DDIM sample grid (spec denoise)."""
        return self.root / "samples.png"

    @property
    def text_samples(self) -> Path:
        """A causal LM's greedy continuations of held-out openings (task causal_lm)."""
        return self.root / "samples.txt"

    @property
    def tokens(self) -> Path:
        """A text task's token files (written by the first run, read by resumes)."""
        return self.root / "tokens"

    @property
    def stored_spec(self) -> Path:
        """The resolved spec and the spec file and ``--set`` overrides it came from."""
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".kdgraph.lock"

    def outputs(self) -> tuple[Path, ...]:
        """The files a run writes at the top of the folder; --force removes exactly these."""
        return (self.metrics, self.summary, self.student, self.best, self.plan, self.curves, self.samples,
                self.text_samples, self.stored_spec)

    def written_in_folders(self) -> dict[Path, tuple[str, ...]]:
        """The run's two folders and the files (glob patterns) it writes there (the checkpoint
        writer's temp files included): --force removes those only, so that a user's own files
        stay, and so does a folder holding them."""
        last, prev = self.last_checkpoint.name, self.previous_checkpoint.name
        dcp = (*SHARDED_CHECKPOINT_FILES, ".state.pt.*.tmp")  # before checkpoints/: emptied, then removed
        return {self.sharded_checkpoint: dcp, self.previous_sharded_checkpoint: dcp, self.sharded_checkpoint_temp: dcp,
                self.checkpoints: (last, prev, f".{last}.*.tmp", f".{prev}.tmp"),
                self.tensorboard: ("events.out.tfevents.*",), self.tokens: ("*.tokens", ".tokens-*")}

    def earlier_run(self) -> list[str]:
        """What an earlier run left here that a new run would lose (empty: nothing), relative to
        the folder. A run killed before its first checkpoint leaves only metrics.jsonl and
        run.json: nothing to continue (--resume has no checkpoint), so a plain run may start
        over it."""
        kept = [p for p in (self.last_checkpoint, self.previous_checkpoint, self.sharded_checkpoint,
                            self.previous_sharded_checkpoint, self.summary, self.student) if p.exists()]
        if kept and self.metrics.exists():
            kept.append(self.metrics)
        return [p.relative_to(self.root).as_posix() for p in kept]


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def readable(path: Path) -> Path:
    """Give a written file the mode the user's umask asks for (0644 under the usual 022):
    temp-file writers (mkstemp, safetensors) create 0600."""
    os.chmod(path, 0o666 & ~_UMASK)
    return path


class OutputError(KDGraphError):
    """The output folder cannot be used as asked."""


def prepare_output(out: Path) -> Path:
    """Create ``out`` if needed and check that files can be written there (before models and
    data are built, so that a bad folder costs nothing)."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"is below {parent}, which is a file"
                raise OutputError(f"output {out} {what}; choose another output: (or --set output=...)")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output {out} is not writable ({exc.strerror or exc}); choose another output:") from None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock file in the output folder, held for the run.

    Created with its content in one step (a private file, hard-linked to the lock's name:
    the link fails where a lock exists), so no run ever reads a lock that is being written.
    A lock left by a process that no longer exists on this host is stale and taken over; one
    from another host is refused (its process cannot be checked from here) with the file to
    delete named; one that is not a kdgraph lock (no readable pid) is refused likewise.
    """

    def __init__(self, out: Path):
        self.path = RunFolder(out).lock
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            if self._create(json.dumps(me)):
                self.held = True
                return self
            raw, holder = self._holder()
            if raw is None:  # gone between the two calls: try again
                continue
            if holder is None:
                raise OutputError(f"{self.path} is not a kdgraph run lock (it holds {raw[:60]!r}, not a pid); "
                                  f"delete it if no kdgraph run is using {self.path.parent}")
            if holder["host"] == me["host"] and not _pid_alive(holder["pid"]):
                self._take_over(raw)  # stale: its writer is gone
                continue
            where = "" if holder["host"] == me["host"] else f" on {holder['host']}"
            raise OutputError(f"{self.path.parent} is in use by another kdgraph run (pid {holder['pid']}"
                              f"{where}); wait for it, choose another output, or delete {self.path} "
                              "if that run is gone")
        raise OutputError(f"could not take the lock {self.path}")

    def _create(self, content: str) -> bool:
        """Make the lock file with ``content`` atomically; False where one exists."""
        private = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.monotonic_ns()}")
        private.write_text(content)
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL, the content written at once after
            return self._create_exclusive(content)
        finally:
            private.unlink(missing_ok=True)

    def _create_exclusive(self, content: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True

    def _take_over(self, stale: str) -> None:
        """Remove the stale lock whose content is ``stale``, and only it: it is moved aside
        first, and put back where another run replaced it in the meantime."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{time.monotonic_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another run took it over first
            return
        try:
            if aside.read_text(errors="replace") != stale:  # a live run's fresh lock: restore it
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)

    def _holder(self) -> tuple[str | None, dict | None]:
        """The lock's text (None where it is gone) and, where it names a process, {pid, host}."""
        try:
            raw = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise OutputError(f"cannot read the run lock {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            return raw, None
        pid = data.get("pid") if isinstance(data, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
            return raw, None
        return raw, {"pid": pid, "host": str(data.get("host"))}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def spec_differences(old: dict, new: dict, also: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose resolved values differ, outside RESUMABLE_CHANGES and ``also``."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    # a key the stored spec lacks is a field newer than the run: it ran with that field's default
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys
            if k in a and a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES + also)]


def resharded_data(stored: dict, now: dict) -> dict:
    """The data record of a checkpoint written at another world size, as this run's would be
    (``--reshard``): accepted where each optimizer step reads as many windows (samples) as
    then, data.batch_size x ranks, so that every step reads the same ones in the same order."""
    then, here = stored["batch_size"] * stored["world_size"], now["batch_size"] * now["world_size"]
    if then != here:
        fix = (f"set data.batch_size={then // now['world_size']}" if then % now["world_size"] == 0 else
               f"run it on a number of ranks that divides {then}")
        raise KDGraphError(f"--reshard keeps the data of each optimizer step: the checkpoint read {then} per step "
                           f"(data.batch_size {stored['batch_size']} x {stored['world_size']} rank(s)), this run "
                           f"reads {here} ({now['batch_size']} x {now['world_size']}); {fix}")
    return {**stored, "batch_size": now["batch_size"], "world_size": now["world_size"]}


def stored_run(out: Path) -> dict | None:
    path = RunFolder(out).stored_spec
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise OutputError(f"{path} is not valid JSON; restore it or start over with --force") from None


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out``: its spec file as run.json recorded it,
    else a SPEC placeholder. The stored --set overrides are reused, except that an output=
    override must be given again: without it the run is looked for elsewhere."""
    try:
        stored = stored_run(out) or {}
    except KDGraphError:
        stored = {}
    where = [o for o in stored.get("overrides") or [] if o.partition("=")[0].strip() == "output"]
    return " ".join(["kdgraph train", shlex.quote(stored.get("spec_file") or "SPEC"),
                     *(f"--set {shlex.quote(o)}" for o in where[-1:]), "--resume"])


# What a classifier judging a denoiser's samples must share with the denoiser's data.
JUDGE_DATA_KEYS = ("dataset", "root", "num_classes", "input_size")


def check_judge_data(judge: Path, data: dict) -> None:
    """The run in ``judge`` (denoise.judge) was trained on ``data`` (a resolved spec's data
    section): a classifier of other images measures nothing about these samples."""
    stored = stored_run(judge) or {}
    theirs = (stored.get("spec") or {}).get("data") if isinstance(stored.get("spec"), dict) else None
    if not isinstance(theirs, dict):
        raise OutputError(f"denoise.judge: {judge}/{RunFolder(judge).stored_spec.name} holds no data section")
    diff = [f"data.{k} {theirs.get(k)!r} there, {data.get(k)!r} here" for k in JUDGE_DATA_KEYS
            if theirs.get(k) != data.get(k) and not (k == "input_size" and None in (theirs.get(k), data.get(k)))]
    if diff:
        raise OutputError(f"denoise.judge: {judge} classifies other data ({'; '.join(diff)}), so its features "
                          "would not measure these samples; give a classifier run of this dataset")


def earlier_run(out: Path) -> list[str]:
    """``RunFolder(out).earlier_run()``."""
    return RunFolder(out).earlier_run()


def _run_record(folder: RunFolder) -> dict | None:
    """The folder's run.json where it is kdgraph's own record (a resolved spec), else None."""
    try:
        data = json.loads(folder.stored_spec.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("spec"), dict) else None


def _written_by_runs(folder: RunFolder) -> list[Path]:
    """The files in ``folder`` at the names a run writes (outputs, checkpoints, written_in_folders)."""
    fixed = [*folder.outputs(), folder.last_checkpoint, folder.previous_checkpoint, folder.corrupt_checkpoint]
    found = [p for p in fixed if p.is_file() or p.is_symlink()]
    for sub, patterns in folder.written_in_folders().items():
        if sub.is_dir() and not sub.is_symlink():
            found += [t for pattern in patterns for t in sorted(sub.glob(pattern))
                      if (t.is_file() or t.is_symlink()) and t not in found]
    return found


def _refuse_what_kdgraph_did_not_write(folder: RunFolder, record: dict | None) -> list[Path]:
    """Files a run may not touch (returned: another tool's files in checkpoints/ or tensorboard/,
    as recorded when the folder was first claimed). Without kdgraph's run record the folder is
    not a run's, and a file at a name a run writes is refused, --force included."""
    links = [p for p in _written_by_runs(folder)
             if p.is_symlink() and p.parent in (folder.root, folder.checkpoints, folder.tokens)]
    links += [folder.tokens] if folder.tokens.is_symlink() else []
    if links:  # kdgraph writes none: writing there would replace the file a link points to
        names = ", ".join(p.relative_to(folder.root).as_posix() for p in links)
        raise OutputError(f"{folder.root} holds links at names a run writes ({names}); a run would write through "
                          "them into the files they point to; remove the links, or choose another output")
    if record is not None:
        kept = [folder.root / name for name in record.get("kept") or [] if isinstance(name, str)]
        return [p for p in kept if p.exists() and folder.root in p.parents]
    theirs = _written_by_runs(folder)
    clash = [p for p in theirs if p.parent in (folder.root, folder.tokens)
             or p.name in (folder.last_checkpoint.name, folder.previous_checkpoint.name)]
    if clash:
        names = ", ".join(p.relative_to(folder.root).as_posix() for p in clash)
        raise OutputError(f"{folder.root} holds files kdgraph did not write ({names}): it has no kdgraph run record "
                          f"({folder.stored_spec.name}), and kdgraph never overwrites or deletes a file it cannot show "
                          "it wrote, --force included; move them, or choose another output")
    return theirs


def _spec_paths(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in a resolved spec."""
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _spec_paths(v, f"{prefix}{k}.")]
    if isinstance(d, (list, tuple)):
        return [kv for i, v in enumerate(d) for kv in _spec_paths(v, f"{prefix}{i}.")]
    return [(prefix[:-1], d)] if isinstance(d, str) and 0 < len(d) < 4096 and "\0" not in d else []


def _refuse_inputs_among(folder: RunFolder, resolved: dict, files: list[Path]) -> None:
    """A file the spec reads (teacher.checkpoint, say) that the run would delete or overwrite."""
    for key, value in _spec_paths(resolved):
        path = Path(value).expanduser()
        try:
            if not path.is_file():
                continue
            same = next((f for f in files if f.exists() and os.path.samefile(path, f)), None)
        except OSError:
            continue
        if same is not None:
            raise OutputError(f"{key} is {value}, which is {same.relative_to(folder.root).as_posix()} of the output "
                              f"{folder.root}: this run would delete or overwrite it; copy it out of the output "
                              "folder first, or choose another output")


def _remove_run_files(folder: RunFolder, kept: list[Path]) -> None:
    """Delete what a run wrote in ``folder`` (outputs, written_in_folders, not ``kept``) and nothing else."""
    for target in _written_by_runs(folder):
        if target not in kept:
            target.unlink()
    for sub in folder.written_in_folders():
        if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
            sub.rmdir()


def claim(out: Path, resolved: dict, resume: bool, force: bool, source: dict | None = None,
          reshard: bool = False) -> None:
    """Decide what a run may do with ``out`` and record the spec it runs; raises before
    writing anything when the answer is no. Only files at a run's names in a folder holding
    kdgraph's run record are ever deleted or overwritten, and never a file the spec reads.
    ``reshard`` (a resume only): the spec may also change the keys of RESHARD_CHANGES."""
    folder = RunFolder(out)
    if resume and force:
        raise OutputError("--resume and --force contradict each other: --resume continues the run in "
                          f"{out}, --force deletes it")
    record = _run_record(folder)
    kept = _refuse_what_kdgraph_did_not_write(folder, record)
    _refuse_inputs_among(folder, resolved, [f for f in _written_by_runs(folder) if f not in kept]
                         + [*folder.outputs(), folder.last_checkpoint, folder.previous_checkpoint])
    left = folder.earlier_run()
    if resume:
        stored = stored_run(out)
        if stored is not None:
            diff = spec_differences(stored["spec"], resolved, RESHARD_CHANGES if reshard else ())
            if diff:
                raise OutputError(f"{out} was trained with another spec; --resume needs the same one "
                                  f"(differs: {'; '.join(diff)}). Drop the conflicting --set or edit, "
                                  "or start over with --force")
    else:
        if left and not force:
            raise OutputError(f"{out} already holds a run ({', '.join(left)}); continue it with --resume, "
                              "or start over with --force (deletes those files), or choose another output")
        _remove_run_files(folder, kept)  # a forced start, or what a run killed before its first checkpoint left
    record = {"spec": resolved, **(source or {}), "kept": [p.relative_to(folder.root).as_posix() for p in kept]}
    folder.stored_spec.write_text(json.dumps(record, indent=2))


@contextlib.contextmanager
def unclaimed_on_refusal(out: Path, fresh: bool):
    """Around building a run that ``claim`` just recorded (``fresh``: not a resume): where the
    build is refused (a KDGraphError: bad data, a judge of other data), the run.json it wrote
    goes too, when it is the only file of a run in the folder; a refused run leaves nothing."""
    try:
        yield
    except KDGraphError:
        folder = RunFolder(out)
        if fresh and _written_by_runs(folder) == [folder.stored_spec]:
            folder.stored_spec.unlink()
        raise
