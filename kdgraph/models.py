"""Model sources: build a network from a reference string, load its weights.

A reference is ``SOURCE:REST``; ``MODEL_SOURCES[SOURCE](REST, kwargs)`` builds it.
Built in: ``timm:NAME``, ``torchvision:NAME`` and ``module:pkg.mod:factory``.
Nothing is ever downloaded: weights come from ``checkpoint`` files.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdgraph.errors import ModelError
from kdgraph.spec import ModelSpec

__all__ = [
    "MODEL_SOURCES",
    "ModelFactory",
    "build_model",
    "create_model",
    "load_checkpoint",
    "register_model_source",
]

ModelFactory = Callable[[str, dict[str, Any]], nn.Module]


def _close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}{_close_names(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False, **kwargs)


def _create_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelError(f"unknown torchvision model {name!r}{_close_names(name, names)}")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _create_from_module(ref: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, sep, factory_name = ref.rpartition(":")
    if not sep or not module_name:
        raise ModelError(f"module reference {ref!r} must look like module:pkg.mod:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"module:{ref}: cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if factory is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelError(f"module:{ref}: {module_name} has no attribute {factory_name!r}{_close_names(factory_name, public)}")
    if not callable(factory):
        raise ModelError(f"module:{ref}: {module_name}.{factory_name} is not callable")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"module:{ref}: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


MODEL_SOURCES: dict[str, ModelFactory] = {
    "timm": _create_timm,
    "torchvision": _create_torchvision,
    "module": _create_from_module,
}


def register_model_source(name: str, factory: ModelFactory) -> None:
    """Make ``NAME:REST`` references build with ``factory(REST, kwargs)``."""
    if not name.isidentifier():
        raise ValueError(f"model source name must be an identifier, got {name!r}")
    MODEL_SOURCES[name] = factory


@contextmanager
def _search_first(directory: Path | None) -> Iterator[None]:
    """Put ``directory`` at the front of sys.path for the duration (a spec's own models file)."""
    if directory is None:
        yield
        return
    entry = str(Path(directory).resolve())
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(entry)


def create_model(ref: str, kwargs: dict[str, Any] | None = None, search_path: Path | None = None) -> nn.Module:
    """Build the model ``ref`` names ('timm:resnet18', 'module:pkg.mod:factory') with random weights.

    ``search_path`` (the spec file's directory) is searched first for module: references.
    """
    source, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise ModelError(f"model reference {ref!r} must look like SOURCE:NAME; sources: {', '.join(MODEL_SOURCES)}")
    factory = MODEL_SOURCES.get(source)
    if factory is None:
        raise ModelError(f"unknown model source {source!r} in {ref!r}; sources: {', '.join(MODEL_SOURCES)}")
    with _search_first(search_path if source == "module" else None):
        try:
            return factory(rest, dict(kwargs or {}))
        except ModelError:
            raise
        except TypeError as exc:  # usually a wrong constructor argument
            raise ModelError(f"{ref}: cannot build with kwargs {_shown(kwargs or {})}: {_first_line(exc)}") from exc
        except Exception as exc:  # the factory's own complaint (ValueError, AssertionError, ...)
            raise ModelError(f"{ref}: building it with kwargs {_shown(kwargs or {})} raised "
                             f"{type(exc).__name__}: {_first_line(exc)}") from exc


def _shown(value: Any) -> str:
    """A value for an error message, cut to 200 characters (kwargs can be large)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _shown(text.splitlines()[0]) if text else "(no message)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors name no common base class
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]  # a kdgraph training checkpoint
    if not isinstance(loaded, dict):
        raise ModelError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state_dict")
    return loaded


def load_checkpoint(model: nn.Module, path: Path | str) -> nn.Module:
    """Load weights from ``path`` into ``model`` strictly; every key must match in name and shape."""
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not fit {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:10])}{more}")
        raise ModelError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model


def build_model(model_spec: ModelSpec, search_path: Path | None = None) -> nn.Module:
    """The model of a spec entry: built from its reference, then its checkpoint loaded if given."""
    model = create_model(model_spec.model, model_spec.kwargs, search_path=search_path)
    if model_spec.checkpoint is not None:
        load_checkpoint(model, model_spec.checkpoint)
    return model
