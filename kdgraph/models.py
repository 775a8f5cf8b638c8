"""Model sources: build a network from a reference string, load its weights.

A reference is ``SOURCE:REST``; ``MODEL_SOURCES.get(SOURCE)(REST, kwargs)`` builds it
(``kdgraph.registry``). Registered here: ``timm:NAME``, ``torchvision:NAME``,
``module:pkg.mod:factory``, ``diffusers:UNet2DModel`` (``kdgraph.tasks.denoise.diffusers_source``) and
``transformers:NAME`` (a causal LM, ``kdgraph.lm.source``). A ``SOURCE:NAME`` in ``LIBRARY_MODELS`` is
built by the factory a task registered there instead (its library model wrapped); the task
libraries whose entries the compiler reads by name register them when imported, here.
Weights come from ``checkpoint`` files (``kdgraph.weights``) or, with ``pretrained:
true``, from timm's or torchvision's own pretrained loader (their hub and cache).

Planning needs shapes only: ``build_model(..., materialize=False)`` builds the network
with its parameters on the meta device (no memory, no initialisation) and checks a
checkpoint against it from the file's header. A teacher with a checkpoint is built the
same way for training and takes the file's tensors over (one copy of its weights).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdgraph.tasks.denoise.diffusers_source import create_diffusers
from kdgraph.errors import ModelError
from kdgraph.lm.source import create_causal_lm, pretrained_causal_lm
from kdgraph.registry import LIBRARY_MODELS, MODEL_SOURCES, PRETRAINED_SOURCES, register_model_source
from kdgraph.segmentation import register as _dense  # noqa: F401  (the dense task's registry entries)
from kdgraph.weights import fit_state, load_state, read_state_dict

if TYPE_CHECKING:
    from kdgraph.spec import ModelSpec

__all__ = [
    "MODEL_SOURCES",
    "PRETRAINED_SOURCES",
    "ModelFactory",
    "build_model",
    "create_model",
    "holds_meta",
    "load_checkpoint",
    "parameters_on_meta",
    "read_state_dict",
    "register_model_source",
]

ModelFactory = Callable[[str, dict[str, Any]], nn.Module]


def _close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}{_close_names(name, timm.list_models())}")


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    _check_timm_name(name)
    return timm.create_model(name, pretrained=False, **kwargs)


def _check_torchvision_name(name: str) -> None:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelError(f"unknown torchvision model {name!r}{_close_names(name, names)}")


def _create_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    _check_torchvision_name(name)
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


MODEL_SOURCES.register("timm", _create_timm)
MODEL_SOURCES.register("torchvision", _create_torchvision)
MODEL_SOURCES.register("module", _create_from_module)
MODEL_SOURCES.register("diffusers", create_diffusers)  # diffusers itself is imported on first use
MODEL_SOURCES.register("transformers", create_causal_lm)  # so is transformers


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


_aten = torch.ops.aten
# In-place ops that change a tensor's values only (never its shape, dtype or device): what
# initialisers do (timm's trunc_normal_: uniform_, erfinv_, mul_, add_, clamp_).
_VALUE_ONLY_INPLACE = frozenset({
    _aten.uniform_, _aten.normal_, _aten.erfinv_, _aten.mul_, _aten.add_, _aten.sub_, _aten.div_,
    _aten.clamp_, _aten.clamp_min_, _aten.clamp_max_, _aten.fill_, _aten.zero_, _aten.copy_,
    _aten.exponential_, _aten.log_normal_, _aten.bernoulli_, _aten.random_, _aten.fmod_, _aten.sqrt_,
    _aten.neg_, _aten.abs_, _aten.exp_})


class _SkipMetaInit(TorchDispatchMode):
    """Value-only in-place ops on a meta tensor return it at once: a meta tensor has no values,
    and torch computes such ops on meta in Python (a millisecond each: two thirds of building
    Swin on meta). Every other op, and these on real tensors, run as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _VALUE_ONLY_INPLACE and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered meanwhile is put on the meta device: a shape and a
    dtype, no memory, and initialisers applied to it do nothing (``_SkipMetaInit``: their
    in-place ops on meta tensors are not even computed).

    Only parameters: ``with torch.device("meta")`` would put every tensor a constructor makes
    there too, and constructors compute with tensors (timm's drop-path rates are
    ``torch.linspace(...)[i].item()``, which a meta tensor refuses; Swin's relative position
    index is a non-persistent buffer that no state dict restores). Buffers are built as
    usual. Parameter subclasses (lazy modules' ``UninitializedParameter``) stay as built.
    Works by wrapping ``nn.Module.register_parameter`` for the duration, on one thread.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if type(param) is nn.Parameter and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        with _SkipMetaInit():
            yield
    finally:
        nn.Module.register_parameter = register


def holds_meta(model: nn.Module) -> bool:
    """True when some parameter or buffer of ``model`` is on the meta device (has no data)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def create_model(ref: str, kwargs: dict[str, Any] | None = None, search_path: Path | None = None, *,
                 meta: bool = False) -> nn.Module:
    """Build the model ``ref`` names ('timm:resnet18', 'module:pkg.mod:factory') with random weights,
    or with ``meta`` its parameters on the meta device (``parameters_on_meta``).

    ``search_path`` (the spec file's directory) is searched first for module: references.
    """
    source, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise ModelError(f"model reference {ref!r} must look like SOURCE:NAME; sources: {', '.join(MODEL_SOURCES)}")
    if source not in MODEL_SOURCES:
        raise ModelError(f"unknown model source {source!r} in {ref!r}; sources: {', '.join(MODEL_SOURCES)}")
    factory = LIBRARY_MODELS.get(ref) if ref in LIBRARY_MODELS else MODEL_SOURCES.get(source)
    with _search_first(search_path if source == "module" else None):
        try:
            with parameters_on_meta() if meta else contextlib.nullcontext():
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


def load_checkpoint(model: nn.Module, path: Path | str, *, fresh_head: bool = False) -> list[str]:
    """Load the weights file ``path`` (safetensors or torch, read by content) into ``model``
    strictly; see ``kdgraph.weights.load_state``. Returns the classifier keys kept fresh."""
    return load_state(model, read_state_dict(path), str(path), fresh_head=fresh_head)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def _no_weights(ref: str, exc: BaseException) -> ModelError:
    return ModelError(f"{ref}: cannot load its pretrained weights ({_short(exc)}); where no network is reachable, "
                      "download them elsewhere and give the file as checkpoint: PATH instead of pretrained: true")


def _timm_classes(name: str) -> int | None:
    from timm.models import get_pretrained_cfg

    _check_timm_name(name)
    cfg = get_pretrained_cfg(name)
    return cfg.num_classes if cfg is not None else None


def _timm_weights_unreachable(name: str, kwargs: dict[str, Any]) -> str | None:
    """Why timm's pretrained weights of ``name`` cannot be had here, found in seconds (None:
    they are in the local cache, a local file, or their host answers). Offline, timm's hub
    client retries for about a minute before failing."""
    import socket
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    cfg = {**(cfg.to_dict() if cfg is not None else {}), **(kwargs.get("pretrained_cfg_overlay") or {})}
    if cfg.get("file") or cfg.get("state_dict"):
        return None
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo = cfg["hf_hub_id"].split("@")[0]
        files = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files if f):
            return None
        host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    elif cfg.get("url"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name
        if cached.is_file():
            return None
        host = urlparse(cfg["url"]).hostname
    else:
        return None
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"{host} is not reachable ({exc}) and the weights are not in the local cache"
    return None


def _pretrained_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    _check_timm_name(name)
    if (problem := _timm_weights_unreachable(name, kwargs)) is not None:
        raise _no_weights(f"timm:{name}", OSError(problem))
    try:  # timm's own loader: its hub or local cache; a new num_classes gets a fresh head
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError, AssertionError) as exc:
        raise _no_weights(f"timm:{name}", exc) from None


def _torchvision_weights(name: str):
    import torchvision

    _check_torchvision_name(name)
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        raise ModelError(f"torchvision:{name} has no pretrained weights; give a weights file as checkpoint: PATH") from None


def _torchvision_classes(name: str) -> int | None:
    return len(_torchvision_weights(name).meta.get("categories") or []) or None


def _pretrained_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    weights = _torchvision_weights(name)
    classes = len(weights.meta.get("categories") or []) or None
    other_head = kwargs.get("num_classes", classes) != classes
    try:  # torchvision's own loader (its hub cache); it refuses a num_classes other than the weights'
        pretrained = torchvision.models.get_model(name, weights=weights, **{k: v for k, v in kwargs.items()
                                                                          if not (other_head and k == "num_classes")})
    except (OSError, RuntimeError) as exc:
        raise _no_weights(f"torchvision:{name}", exc) from None
    if not other_head:
        return pretrained
    model = _create_torchvision(name, kwargs)  # as timm does: the pretrained body, a fresh head
    load_state(model, pretrained.state_dict(), f"torchvision:{name} ({weights})", fresh_head=True)
    return model


# (classes of the default pretrained weights, loader) of the sources that have pretrained weights.
PRETRAINED_SOURCES.register("timm", (_timm_classes, _pretrained_timm))
PRETRAINED_SOURCES.register("torchvision", (_torchvision_classes, _pretrained_torchvision))
PRETRAINED_SOURCES.register("transformers", (lambda name: None, pretrained_causal_lm))  # logits, no classes


def _build_for_planning(ref: str, kwargs: dict[str, Any], search_path: Path | None, role: str,
                        notes: list[str]) -> nn.Module:
    """``ref`` with its parameters on the meta device; where its factory refuses that, built
    with real weights (the factory's own error, if building fails either way), with a note."""
    try:
        return create_model(ref, kwargs, search_path=search_path, meta=True)
    except Exception as exc:  # the real build below raises the error that matters, if any
        model = create_model(ref, kwargs, search_path=search_path)
        notes.append(f"{role} {ref}: built with real weights for planning (on the meta device: {_short(exc)})")
        return model


def _build_pretrained(model_spec: ModelSpec, role: str, fetch: bool, search_path: Path | None,
                      notes: list[str], materialize: bool) -> nn.Module:
    ref = model_spec.model
    source, _, name = ref.partition(":")
    if source not in PRETRAINED_SOURCES:  # the spec refuses this; a Python caller may not have validated
        raise ModelError(f"{ref}: pretrained: true works for {', '.join(PRETRAINED_SOURCES)} models; "
                         "give the weights file as checkpoint: PATH")
    classes_of, fetch_pretrained = PRETRAINED_SOURCES.get(source)
    classes, wanted = classes_of(name), model_spec.kwargs.get("num_classes")
    other_head = classes is not None and wanted is not None and wanted != classes
    if other_head and role == "teacher":
        raise ModelError(f"teacher {ref}: its pretrained weights predict {classes} classes, kwargs.num_classes asks "
                         f"for {wanted}, and a teacher with a random head teaches nothing; fine-tune it first (a "
                         "supervised spec whose student is this model with pretrained: true) and give that run's "
                         "checkpoints/last.pt as teacher.checkpoint")
    if fetch and materialize:
        try:
            model = fetch_pretrained(name, dict(model_spec.kwargs))
        except TypeError as exc:
            raise ModelError(f"{ref}: cannot build with kwargs {model_spec.kwargs}: {exc}") from exc
    else:
        model = (create_model(ref, model_spec.kwargs, search_path=search_path) if materialize
                 else _build_for_planning(ref, model_spec.kwargs, search_path, role, notes))
        notes.append(f"{role} {ref}: pretrained weights not fetched here (planning needs only shapes)")
    if other_head:
        notes.append(f"{role} {ref}: the pretrained classifier ({classes} classes) is replaced by a fresh one "
                     f"for {wanted} classes")
    return model


def _teacher_from_checkpoint(model_spec: ModelSpec, search_path: Path | None) -> nn.Module:
    """A teacher takes every tensor from its checkpoint (its head must fit), so it is built
    with its parameters on the meta device and takes the file's tensors over, memory-mapped
    where the format allows: one copy of its weights in memory, and no time spent on an
    initialisation the file overwrites. Where that leaves a tensor without data (a parameter
    no state dict holds) or the factory refuses the meta device, it is built and loaded as
    any other model."""
    path = model_spec.checkpoint
    state = read_state_dict(path, data="mmap")
    try:
        model = create_model(model_spec.model, model_spec.kwargs, search_path=search_path, meta=True)
    except Exception:  # the real build below raises the error that matters, if any
        model = None
    if model is not None:
        load_state(model, state, str(path), assign=True)
        if not holds_meta(model):
            return model
    model = create_model(model_spec.model, model_spec.kwargs, search_path=search_path)
    load_state(model, state, str(path))
    return model


def build_model(model_spec: ModelSpec, search_path: Path | None = None, *, role: str = "student",
                fetch: bool = True, notes: list[str] | None = None, materialize: bool = True) -> nn.Module:
    """The model of a spec entry: built from its reference, with its weights.

    ``pretrained: true`` loads the source's own pretrained weights (timm's hub or cache,
    torchvision's DEFAULT weights) unless ``fetch`` is false (planning: random weights of
    the same shapes). A ``checkpoint`` is loaded strictly. A student whose weights were
    trained for another number of classes gets a fresh classifier, as timm gives one; a
    teacher's must fit. What the user should know (a fresh head) is appended to ``notes``.

    ``materialize=False`` (planning): the parameters are on the meta device (see
    ``parameters_on_meta``; a real build where the factory refuses, with a note), nothing is
    fetched, and a checkpoint is checked against the model from the file's header alone
    (safetensors metadata, a memory-mapped torch file), reporting the same missing,
    unexpected and mis-shaped keys and the same notes as loading it would.
    """
    notes = notes if notes is not None else []
    if model_spec.pretrained:
        return _build_pretrained(model_spec, role, fetch, search_path, notes, materialize)
    ref, path = model_spec.model, model_spec.checkpoint
    if not materialize:
        model = _build_for_planning(ref, model_spec.kwargs, search_path, role, notes)
        if path is not None:
            _, fresh = fit_state(model, read_state_dict(path, data="none"), str(path), fresh_head=role == "student")
            _note_fresh(notes, role, model_spec, fresh)
        return model
    if path is not None and role == "teacher":
        return _teacher_from_checkpoint(model_spec, search_path)
    model = create_model(ref, model_spec.kwargs, search_path=search_path)
    if path is not None:
        _note_fresh(notes, role, model_spec, load_checkpoint(model, path, fresh_head=role == "student"))
    return model


def _note_fresh(notes: list[str], role: str, model_spec: ModelSpec, fresh: list[str]) -> None:
    if fresh:
        notes.append(f"{role} {model_spec.model}: classifier {', '.join(fresh)} freshly initialised "
                     f"({model_spec.checkpoint} was trained for another number of classes)")
