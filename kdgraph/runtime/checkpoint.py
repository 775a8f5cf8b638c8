"""Checkpoints: atomic writes (temp file, fsync, rename) of everything a resume needs,
and loads that can never run code.

A training checkpoint holds tensors, numbers, strings and containers only (model,
optimizer and scheduler states, RNG states, the position and the plan), so it loads with
``torch.load(weights_only=True)``: a file carrying a pickled callable (``__reduce__`` to
``os.system``, say) is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import KDGraphError


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


def save_atomic(obj: dict[str, Any], path: Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    from .runs import _UMASK

    return _UMASK


REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "position", "plan")


def load(path: Path) -> dict[str, Any]:
    """A kdgraph training checkpoint, loaded without unpickling anything but data."""
    path = Path(path)
    if not path.exists():
        raise KDGraphError(f"no checkpoint at {path}: nothing to resume (train without --resume first)")
    if not path.is_file():
        raise KDGraphError(f"checkpoint {path} is not a file")
    try:
        with path.open("rb") as f:  # a file object: torch.load would pick a reader by the suffix
            state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "global" in str(exc).lower():  # a class or function the file asks the unpickler to call
            raise KDGraphError(f"refusing to load {path}: it holds pickled Python objects, not only tensors and "
                               "data, and loading them could run code; kdgraph never unpickles objects "
                               f"({_culprit(exc)})") from None
        raise KDGraphError(f"cannot read checkpoint {path}: {first}") from None
    except Exception as exc:  # zip, EOF and storage errors name no common base class
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KDGraphError(f"cannot read checkpoint {path} (truncated, corrupt or not a kdgraph checkpoint): "
                           f"{detail}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KDGraphError(f"{path} is not a kdgraph training checkpoint: it needs keys "
                           f"{', '.join(REQUIRED_KEYS)}; it has {have}")
    # Checkpoints of kdgraph before the frozen-teacher fix also held the teacher's tensors.
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("_teacher.")}
    return state


def _culprit(exc: Exception) -> str:
    """The global the unpickler refused (torch names it in its message), for the error."""
    for line in str(exc).splitlines():
        line = line.strip()
        if "global" in line.lower():
            return line.rstrip(".")
    return "see torch.load(weights_only=True)"
