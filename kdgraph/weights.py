"""Weight files: read by content, never run code, fitted to a model.

    read_weights_file(path)  -> whatever the file holds (safetensors dict or torch data)
    read_state_dict(path)    -> {name: tensor}, wrappers unwrapped (timm, torchvision, HF,
                                DDP, Lightning, kdgraph training checkpoints)
    fit_state(model, state)  -> checks the state against the model's keys and shapes after
                                stripping wrapper prefixes; every missing, unexpected or
                                mis-shaped key reported in one error
    load_state(model, state) -> fit_state, then loads strictly

``read_state_dict(path, data="none")`` reads shapes and dtypes from the file's header
alone (meta tensors, no tensor data read): what planning checks a checkpoint with.
``data="mmap"`` maps a torch file's storages instead of reading them, so that a model
built on the meta device takes the tensors over (``load_state(..., assign=True)``) with
one copy of the weights in memory.

The format is read from the first bytes, never from the suffix: safetensors (an 8-byte
little-endian header length, then a JSON header), a torch zip archive ('PK') or a legacy
torch pickle (protocol opcode 0x80). Torch files load with ``weights_only=True``: a file
asking the unpickler for a class or function (``__reduce__`` to ``os.system``, say) is
refused before anything in it runs.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdgraph.archive import open_archive
from kdgraph.errors import ModelError
from kdgraph.registry import METHODS

__all__ = [
    "TRAINING_CHECKPOINT_KEYS",
    "classifier_names",
    "fit_state",
    "load_state",
    "read_state_dict",
    "read_weights_file",
]

# What every kdgraph training checkpoint (OUT/checkpoints/last.pt) holds.
TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "position", "plan")
# Containers that other tools wrap a state_dict in: timm and Lightning ('state_dict'),
# torchvision's reference scripts ('model'), some DDP savers ('module').
_WRAPPER_KEYS = ("state_dict", "model", "module")
# Key prefixes of DDP ('module.'), torch.compile ('_orig_mod.') and wrapper modules ('model.').
_PREFIXES = ("module.", "_orig_mod.", "model.")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
# How much of a weights file to read: all of it, its storages memory-mapped, or its header.
DataMode = Literal["read", "mmap", "none"]
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def sniff(path: Path) -> str:
    """'safetensors', 'torch' (zip) or 'torch-legacy' (pickle), from the file's first bytes."""
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"cannot read checkpoint {path}: the file is empty")
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    # safetensors before pickle: its first byte is the low byte of the header length, which is
    # the pickle PROTO opcode (0x80) for one header length in 256
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if n <= min(size - 8, _SAFETENSORS_MAX_HEADER) and head[8:9] == b"{":
            return "safetensors"
    if head[0] == _PICKLE_PROTO:
        return "torch-legacy"
    raise ModelError(f"cannot read checkpoint {path}: not a safetensors or torch file (it starts with {head[:8]!r})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refused_global(exc: Exception) -> str:
    """The global the unpickler refused (torch names it in its message), for the error; not
    torch's advice around it (allowlist the global, retry with weights_only=False)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"it asks for {found.group(1)}" if found else "a global torch.load(weights_only=True) refuses"


def _read_safetensors(path: Path, data: DataMode) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            json.loads(f.read(n))  # a header cut short or not JSON: say so before safetensors does
        if data != "none":
            return load_file(str(path), device="cpu")
        # safe_open checks the header against the file's size; get_slice reads no tensor data.
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.uint8),
                                   device="meta") for k, s in slices.items()}
    except Exception as exc:  # SafetensorError, JSON and OS errors share no base class
        raise ModelError(f"cannot read checkpoint {path} (truncated or corrupt safetensors file): "
                         f"{_first_line(exc)}") from None


def _read_torch(path: Path, mmap: bool) -> Any:
    if sniff(path) == "torch":
        open_archive(path, ModelError, "checkpoint").close()  # what torch's reader sees is what zipfile sees
    try:
        if mmap:  # only a path maps; a zip file named *.safetensors would go to safetensors by its suffix
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        with path.open("rb") as f:  # a file object: torch.load would pick a loader from a path's suffix
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # a class or function the file asks the unpickler to call
            raise ModelError(f"cannot read checkpoint {path}: refusing to load it, it holds pickled Python "
                             "objects, not only tensors and data, and loading them could run code; kdgraph "
                             f"never unpickles objects ({_refused_global(exc)})") from None
        raise ModelError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    except Exception as exc:  # zip, EOF and storage errors name no common base class
        raise ModelError(f"cannot read checkpoint {path} (truncated or corrupt): {_first_line(exc)}") from None


def read_weights_file(path: Path | str, data: DataMode = "read") -> Any:
    """What ``path`` holds, read by content: a safetensors file's tensors, or a torch file's
    data (tensors, numbers, strings, containers; never objects). Every failure is one
    ``ModelError`` line naming the file.

    ``data="mmap"``: a torch zip file's storages are memory-mapped, not read (legacy files
    cannot be mapped and are read). ``data="none"``: a safetensors file's tensors are meta
    tensors made from its header alone; a torch file is mapped (its pickle and zip directory
    are read, its storages never touched) and its tensors turned into meta tensors.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} is not a file")
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path, data)
    obj = _read_torch(path, mmap=data != "read" and kind == "torch" and path.suffix != ".safetensors")
    return _to_meta(obj) if data == "none" else obj


def _to_meta(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a meta tensor of its shape and dtype (no data read)."""
    if torch.is_tensor(obj):
        return obj.to("meta")
    if isinstance(obj, Mapping):
        return {k: _to_meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(v) for v in obj) if type(obj) in (list, tuple) else obj
    return obj


def _is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(k in obj for k in TRAINING_CHECKPOINT_KEYS)


def _adapters_serve_losses_only(method: Any) -> bool:
    """Whether a run of ``method`` (a checkpoint's plan.method) uses its adapters for feature
    losses only (kd+mse), so that its student runs without them."""
    return isinstance(method, str) and method in METHODS and METHODS.get(method).feature_losses


def _student_of_training_checkpoint(path: Path, ckpt: Mapping) -> dict[str, Any]:
    """The student's own weights from a kdgraph training checkpoint (the distiller's state:
    ``student.*`` and ``adapters.*``). Where the trained student runs through its adapters
    (StableKD, TPP) its plain network is not the trained one, so that is refused."""
    state = ckpt["model"]
    if not isinstance(state, Mapping):
        raise ModelError(f"{path} looks like a kdgraph training checkpoint but its 'model' is a "
                         f"{type(state).__name__}, not a state_dict")
    plan = ckpt["plan"] if isinstance(ckpt["plan"], Mapping) else {}
    adapters = [k for k in state if k.startswith("adapters.")]
    if adapters and not _adapters_serve_losses_only(plan.get("method")):
        raise ModelError(f"{path} is a kdgraph training checkpoint of a {plan.get('method', '?')} student that "
                         "runs through adapters between its blocks, so its plain network is not the trained one; "
                         "use a checkpoint of a run without them (a supervised, kd or kd+mse run)")
    return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}


def read_state_dict(path: Path | str, data: DataMode = "read") -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (safetensors or torch, read by content; ``data`` as in
    ``read_weights_file``: "none" gives meta tensors, enough to check shapes).

    Unwraps ``{'state_dict': ...}``, ``{'model': ...}`` and ``{'module': ...}`` containers
    (timm, Lightning, torchvision references, DDP savers); a kdgraph training checkpoint
    (``last.pt``) gives its student's weights without the ``student.`` prefix. Key
    prefixes such as ``module.`` are kept: ``load_state`` strips those that fit a model.
    """
    path = Path(path)
    obj = read_weights_file(path, data)
    if _is_training_checkpoint(obj):
        obj = _student_of_training_checkpoint(path, obj)
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    odd = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd or not obj:
        what = f"non-tensor entries: {', '.join(odd[:5])}" if odd else "no tensors"
        raise ModelError(f"checkpoint {path} is not a state_dict: it holds {what}")
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor], own: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``, nested up to three
    deep: ``module._orig_mod.``) only where that makes more keys match the model's: a model
    whose own keys start with ``model.`` keeps them. Ties keep the fewer strips."""
    def score(s: Mapping[str, Any]) -> int:
        return sum(k in own for k in s)

    best, best_score = state, score(state)
    frontier = [state]
    for _ in range(3):
        frontier = [{k.removeprefix(p): v for k, v in s.items()} for s in frontier for p in _PREFIXES
                    if any(k.startswith(p) for k in s)]
        frontier = [s for s in frontier if len(s) == len(state)]  # stripping must not merge keys
        for s in frontier:
            if score(s) > best_score:
                best, best_score = s, score(s)
    return best


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the model's classifier head: timm's ``pretrained_cfg['classifier']``,
    else the module ``get_classifier()`` returns, else the last ``nn.Linear``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("classifier"):
        names = cfg["classifier"]
        return (names,) if isinstance(names, str) else tuple(names)
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        found = [n for n, m in model.named_modules() if n and m is head]
        if found:
            return (found[0],)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (linears[-1],) if linears else ()


def _head_keys(model: nn.Module, own: Mapping[str, Any]) -> set[str]:
    names = classifier_names(model)
    return {k for k in own for n in names if k.startswith(n + ".")}


def _listing(title: str, items: list[str]) -> str:
    more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
    return f"  {title} ({len(items)}): {', '.join(items[:10])}{more}"


def fit_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
              fresh_head: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` fitted to ``model``'s keys and shapes, after stripping wrapper prefixes that fit;
    nothing is loaded, and tensors on the meta device (a model built for planning, a state
    read from a file's header) are checked like any other.

    With ``fresh_head``, classifier keys (``classifier_names``) that are missing or have
    another shape (a checkpoint for another number of classes) keep the model's fresh
    initialisation, as timm's ``pretrained=True, num_classes=N`` does. Returns (the state
    with the model's keys, the keys kept fresh). Anything else that does not fit is one
    ``ModelError`` listing missing, unexpected and mis-shaped keys (``source`` names the file).
    """
    own = model.state_dict()
    state = _strip_prefixes(dict(state), own)
    # BatchNorm counters are absent from old torchvision files; they do not change the function.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head = _head_keys(model, own)
    fresh = [k for k in own if k in head and (k in missing or k in mismatched)] if fresh_head else []
    missing = [k for k in missing if k not in fresh]
    mismatched = [k for k in mismatched if k not in fresh]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unexpected:
            lines.append(_listing("unexpected keys", unexpected))
        if mismatched:
            lines.append(_listing("shape mismatches", [f"{k}: checkpoint {tuple(state[k].shape)} vs model "
                                                       f"{tuple(own[k].shape)}" for k in mismatched]))
        other_classes = [k for k in mismatched if k in head and state[k].shape[1:] == own[k].shape[1:]]
        if other_classes:
            k = other_classes[0]
            lines.append(f"  the classifier {k.rpartition('.')[0]} was trained for {state[k].shape[0]} classes, the "
                         f"model has {own[k].shape[0]}: a teacher needs its trained head, so fine-tune it first "
                         "(a supervised spec whose student is this model with this checkpoint) and give that "
                         "run's checkpoints/last.pt as teacher.checkpoint")
        raise ModelError("\n".join(lines))
    return {k: state[k] for k in own if k in state and k not in fresh}, fresh


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
               fresh_head: bool = False, assign: bool = False) -> list[str]:
    """Load ``state`` into ``model`` strictly (``fit_state`` first); returns the classifier
    keys kept fresh.

    ``assign``: the model's tensors become the state's own (cast where the model's dtype
    differs) instead of copies, as a model whose parameters are on the meta device needs;
    every key the state does not give keeps the model's tensor, so afterwards the model
    holds meta tensors exactly where it held them and the state had nothing.
    """
    fitted, fresh = fit_state(model, state, source, fresh_head=fresh_head)
    own = model.state_dict()
    if assign:
        fitted = {k: v.to(own[k].dtype) for k, v in fitted.items()}  # copy_ would cast; assign does not
    # Fresh head keys and absent BatchNorm counters keep the model's own values.
    model.load_state_dict({k: fitted.get(k, own[k]) for k in own}, strict=True, assign=assign)
    return fresh
