"""Checkpoints: atomic writes (temp file, fsync, rename) of everything a resume needs,
and loads that can never run code.

A training checkpoint holds tensors, numbers, strings and containers only (model,
optimizer and scheduler states, RNG states, the position and the plan), so it loads with
``torch.load(weights_only=True)``: a file carrying a pickled callable (``__reduce__`` to
``os.system``, say) is refused before anything in it runs.

Each checkpoint carries the sha256 of its content (tensor bytes, dtypes and shapes, and
every other value), checked on load: flipped bits on disk are an error, never silently
corrupted weights. Writing ``last.pt`` first keeps the one it replaces as ``prev.pt``, and
``load_latest`` falls back to it (with a warning) when ``last.pt`` is damaged.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import PREVIOUS_CHECKPOINT, readable
from kdgraph.weights import TRAINING_CHECKPOINT_KEYS, DataMode, read_weights_file


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKSUM_KEY = "sha256"


def checksum(state: Any) -> str:
    """sha256 of everything in ``state`` but its own CHECKSUM_KEY, in a fixed walk order:
    tensors by dtype, shape and bytes, other values by their repr (tuples as lists: they
    hash the same whichever way a container round-trips)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                if key != CHECKSUM_KEY:
                    feed(key)
                    feed(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


def save_atomic(obj: dict[str, Any], path: Path, keep_previous: bool = False) -> Path:
    """torch.save to a temp file in the same folder, then rename: a kill never leaves half a file.

    The saved dict carries its checksum. ``keep_previous``: the file being replaced stays as
    ``prev.pt`` beside it (hard-linked, so that ``path`` exists at every moment).
    """
    return write_snapshot(snapshot(obj), path, keep_previous)


def write_snapshot(state: dict[str, Any], path: Path, keep_previous: bool = False) -> Path:
    """``save_atomic`` of a ``snapshot``: hashed and written atomically (any thread)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    if isinstance(state.get(_READY), torch.cuda.Event):
        state.pop(_READY).synchronize()  # the device-to-host copies have landed
    state[CHECKSUM_KEY] = checksum(state)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        readable(Path(tmp))  # mkstemp creates 0600; the user's umask decides
        if keep_previous and path.is_file():
            _keep_as_previous(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk, a quota; torch's zip writer says "write failed"
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
            raise
        detail = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        kept = f"; {path} from before is intact" if path.is_file() else ""
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {detail}{kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


class CheckpointWriteError(KDGraphError):
    """A checkpoint could not be written (disk full, quota, permissions); the one before is kept."""


def previous_of(path: Path) -> Path:
    """Where ``save_atomic(..., keep_previous=True)`` keeps the file it replaces at ``path``."""
    return Path(path).with_name(PREVIOUS_CHECKPOINT)


def _keep_as_previous(path: Path) -> None:
    prev = previous_of(path)
    staged = prev.with_name(f".{prev.name}.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:  # a file system without hard links: rename, leaving a moment without last.pt
        os.replace(path, prev)
        return
    os.replace(staged, prev)
    # rename(2) between two links of one file does nothing and leaves the source: so it is when
    # a save was stopped before its rename (prev.pt is then a link of last.pt)
    staged.unlink(missing_ok=True)


_READY = "_copies_ready"  # a snapshot's CUDA event: its device-to-host copies are done


def snapshot(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` that training can no longer change: every tensor copied to the CPU
    (into pinned memory, without waiting, from CUDA; the event under ``_READY`` says when the
    copies are done), every container rebuilt. Hashed and saved from this one copy."""
    cuda = []

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type == "cuda":
                cuda.append(True)
                return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
            return value.to("cpu", copy=True)  # a CPU tensor is the live one: clone it
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        return value

    state = copy(obj)
    if cuda:
        event = torch.cuda.Event()
        event.record()
        state[_READY] = event
    return state


class BackgroundWriter:
    """Checkpoints written without stalling training: ``submit`` takes a ``snapshot`` (the one
    stall: copying the tensors) and returns; a thread hashes and writes it (``write_snapshot``:
    temp file, fsync, rename). One write at a time: a submit waits for the one before. Errors
    of a write are raised by the next ``submit`` or ``wait``. The thread is not a daemon: a
    process that ends normally finishes its write first; a kill leaves the last whole file."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
        state = snapshot(obj)  # before waiting: the copy is the part training must wait for
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state, path, keep_previous),
                                        name="kdgraph-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any], path: Path, keep_previous: bool) -> None:
        try:
            write_snapshot(state, path, keep_previous)
        except BaseException as exc:  # noqa: BLE001 -- handed to the training thread
            self._error = exc

    def join(self) -> None:
        """Wait for the write in flight; keep its error for ``wait``."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Wait for the write in flight and raise its error, if any."""
        self.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


REQUIRED_KEYS = TRAINING_CHECKPOINT_KEYS


def load_latest(path: Path, data: DataMode = "read") -> tuple[dict[str, Any], str | None]:
    """The checkpoint at ``path`` or, when it is missing or damaged, ``prev.pt`` beside it
    (``data`` as ``load``'s).

    Returns the state and a warning naming what was wrong and what was loaded instead
    (None when ``path`` itself was good). Raises KDGraphError naming both files when
    neither is good.
    """
    path = Path(path)
    prev = previous_of(path)
    try:
        return load(path, data), None
    except KDGraphError as exc:
        if not prev.is_file() or prev == path:
            raise
        problem = exc if path.exists() else f"{path} is missing"
    try:
        state = load(prev, data)
    except KDGraphError as exc:
        raise KDGraphError(f"{problem}; the previous checkpoint is no good either: {exc}") from None
    return state, f"warning: {problem}; continuing from the previous checkpoint {prev} instead"


def load(path: Path, data: DataMode = "read") -> dict[str, Any]:
    """A kdgraph training checkpoint, loaded without unpickling anything but data
    (``kdgraph.weights.read_weights_file``: format by content, code refused), its checksum
    verified. ``data="mmap"`` maps the file's storages instead of reading them into this
    process: ranks that each load the same file share one copy in the page cache."""
    path = Path(path)
    if not path.exists():
        raise KDGraphError(f"no checkpoint at {path}: nothing to resume (train without --resume first)")
    state = read_weights_file(path, data)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KDGraphError(f"{path} is not a kdgraph training checkpoint: it needs keys "
                           f"{', '.join(REQUIRED_KEYS)}; it has {have}")
    stored = state.get(CHECKSUM_KEY)  # absent from checkpoints of kdgraph before checksums
    if stored is not None and stored != checksum(state):
        raise KDGraphError(f"checkpoint {path} is corrupt: its content does not match the checksum stored "
                           "in it (damaged on disk or in transfer)")
    # Checkpoints of kdgraph before the frozen-teacher fix also held the teacher's tensors.
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("_teacher.")}
    return state


class RNG:
    """The process's random generators (Python, NumPy, torch CPU and CUDA) as a checkpoint owner."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class Value:
    """A value of the run's own (its position, its history, a record a resume checks) as a
    checkpoint owner: ``get()`` packs it, ``put(state)`` unpacks or checks it."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]):
        self.get, self.put = get, put

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, state: Any) -> None:
        self.put(state)


class CheckpointManager:
    """A run's checkpoint, as torchtitan's ``CheckpointManager(states={...})``: ``states`` lists
    what it holds, key by key, in the order a resume restores them (the records it checks
    first); each owner packs and unpacks its own part through ``state_dict()`` and
    ``load_state_dict()``. Saves are written in the background (``BackgroundWriter``),
    keeping the one before as prev.pt; a resume loads the last good one."""

    def __init__(self, folder, states: dict[str, Any], resume_command: Callable[[], str]):
        self.folder, self.states, self.resume_command = folder, states, resume_command
        self.writer = BackgroundWriter()  # checkpoints hashed and written while training goes on

    def save(self) -> None:
        """Write the owners' states as the run's last checkpoint (the save before must be whole)."""
        self.written()  # the save before this one: its error, if any, stops the run here
        self.writer.submit({key: owner.state_dict() for key, owner in self.states.items()},
                           self.folder.last_checkpoint, keep_previous=True)

    def written(self) -> None:
        """Wait for the checkpoint being written in the background; a failed write stops the run."""
        try:
            self.writer.wait()
        except CheckpointWriteError as exc:
            raise KDGraphError(f"{exc}; free space and continue from it with `{self.resume_command()}`") from None

    def restore(self, main: bool) -> tuple[dict[str, Any], str | None]:
        """Load the last good checkpoint (last.pt, else prev.pt) into the owners, in order; a
        key the checkpoint lacks or holds None (older kdgraph) is left as it is. Returns the checkpoint and a warning where it had to fall back."""
        last = self.folder.last_checkpoint
        state, warning = load_latest(last)
        if warning and main and last.exists():
            last.replace(self.folder.corrupt_checkpoint)
            warning += f" (the damaged file is kept as {self.folder.corrupt_checkpoint})"
        for key, owner in self.states.items():
            if state.get(key) is not None:
                owner.load_state_dict(state[key])
        return state, warning
