"""Checkpoints: atomic writes (temp file, fsync, rename) of everything a resume needs,
and loads that can never run code.

A training checkpoint holds tensors, numbers, strings and containers only (model,
optimizer and scheduler states, RNG states, the position and the plan), so it loads with
``torch.load(weights_only=True)``: a file carrying a pickled callable (``__reduce__`` to
``os.system``, say) is refused before anything in it runs.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import KDGraphError
from ..weights import TRAINING_CHECKPOINT_KEYS, read_weights_file


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


REQUIRED_KEYS = TRAINING_CHECKPOINT_KEYS


def load(path: Path) -> dict[str, Any]:
    """A kdgraph training checkpoint, loaded without unpickling anything but data
    (``kdgraph.weights.read_weights_file``: format by content, code refused)."""
    path = Path(path)
    if not path.exists():
        raise KDGraphError(f"no checkpoint at {path}: nothing to resume (train without --resume first)")
    state = read_weights_file(path)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KDGraphError(f"{path} is not a kdgraph training checkpoint: it needs keys "
                           f"{', '.join(REQUIRED_KEYS)}; it has {have}")
    # Checkpoints of kdgraph before the frozen-teacher fix also held the teacher's tensors.
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("_teacher.")}
    return state
