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
