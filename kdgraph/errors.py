"""User-facing errors. The CLI prints their message and exits with code 2, no traceback."""

from __future__ import annotations


class KDGraphError(Exception):
    """Base class of every error kdgraph raises about the user's input or models."""


class SpecError(KDGraphError):
    """A spec value is wrong. ``path`` is the dotted YAML path (``schedule.recompositions``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        # Messages built from several problems already start with their first path.
        prefixed = not path or message.startswith(path)
        super().__init__(message if prefixed else f"{path}: {message}")


class ModelError(KDGraphError):
    """A model reference cannot be built, or a checkpoint does not fit it."""


class TraceError(KDGraphError):
    """torch.fx could not trace a model; the message names the module and the Python line."""


class PlanError(KDGraphError):
    """The compiler cannot build a valid plan (mismatched stages, bad explicit cuts, ...)."""


class DataError(KDGraphError):
    """A dataset is missing or malformed."""


# How a full disk or quota reads in the errors of the writers kdgraph uses: OSError's errno,
# safetensors' "(os error 28)", torch's zip writer's "file write failed" / "unexpected pos".
_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
                    "file write failed", "unexpected pos")


def disk_full(exc: BaseException) -> KDGraphError | None:
    """``exc`` as one line where a write failed for want of space (or quota), else None."""
    text = str(exc).strip()
    if not (getattr(exc, "errno", None) in _DISK_FULL_ERRNOS or any(w in text.lower() for w in _DISK_FULL_WORDS)):
        return None
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return KDGraphError(f"a write failed, the disk is full or over quota ({first}); free some space or choose "
                        "another output, then run the command again (a training run continues with --resume)")
