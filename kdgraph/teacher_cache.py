"""The teacher cache's format: a folder holding the teacher's outputs for a run's training views.

    CACHE/header.json           what the cache was built for (``key``), its mode, its epochs, and
                                each shard's SHA-256 (written last, atomically)
    CACHE/e0003-r0.npy          epoch 3 (0-based), rank 0: one row per training position
    CACHE/e0003-r0.npy.sha256   the shard's checksum, written before the shard is renamed in place
    CACHE/.lock-r0              held (``flock``) while a build of rank 0 writes here

Every augmentation draw is a pure function of (seed, epoch, index), so the view at position i
of epoch e on rank r is fixed before training starts; row i of shard (e, r) is the teacher's
output for that view (whatever view both models see there: a crop, a flip, and a mixed image
once mixup draws from (seed, epoch, index) too). Replay reads rows ``step * batch_size ..``
of the epoch's shard.

Two modes (``header["key"]["mode"]``):

- ``full``: float32 logits, one (*logits_shape) row per position. Exact: the live teacher's
  output is float32 (or bf16/fp16 under autocast, which float32 holds exactly), so training from
  it equals training with the live teacher bit for bit.
- ``topk``: the k largest of ``p = softmax(z_t / T)`` as float16 and their class indices as
  uint16, one structured row per position (``TOPK_DTYPE``): 4k bytes, 40 at k = 10. Replayed
  with FKD's loss (``kdgraph.losses.FKDHeadLoss``). T is the spec's ``loss.temperature``, part
  of the key.

A causal LM's cache (``data.dataset: text``) holds a row per packed window and a record per
token position: full (rows, T, V) float32 logits, or top-k (rows, T) records whose ids are
uint16 up to 65,536 ids and uint32 past (``topk_dtype``): 4k or 6k bytes per token. The logits
are cut to the student's V ids first (``token_width``, the key's ``mode.vocab``), as the token
loss cuts them (``kdgraph.lm.token_losses``, which reads a top-k row as FKD's spread-the-rest).

Shards are ``.npy`` files: no pickle, readable anywhere. A shard is written under a temporary
name and renamed when complete, so a killed build leaves whole shards only and resumes at the
first missing one. Its checksum is the SHA-256 of its rows' bytes (after the ``.npy`` header),
hashed as they are written; replay checks the ``.npy`` header's dtype and shape against the
cache header's, then reads the rows once, hashing them, before any is used.

The key (``cache_key``) names what fixes the cached values: the teacher (model, kwargs,
pretrained weights' name, the checkpoint file's SHA-256, the dtype it runs in, its code: the
traced graph, the modules and their classes' source; not whether it is sharded, which gathers
the same weights), the data spec (mixup included), the files the data is read from
(``data_files``), the augmentation, the resolved input normalisation (the batch's and the
teacher's), the seed, the runtime settings the teacher's numerics depend on (precision,
micro-batches, channels_last), the ranks, the mode (k and T for top-k; the width V for text;
a text's files are its sources' stat and the tokenizer's fingerprint). ``differences``
compares two keys leaf by leaf, for a refusal that names what differs.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdgraph.errors import KDGraphError, SpecError

if TYPE_CHECKING:
    from kdgraph.spec import Spec

__all__ = ["DEFAULT_TOP_K", "HEADER", "KEY_FIELDS", "MAX_CACHE_EPOCHS", "TOPK_DTYPE", "cache_key", "cached_epochs",
           "checksum_path", "data_files", "differences", "file_sha256", "read_header", "shard_dtype", "shard_path",
           "shard_shape", "teacher_code", "token_width", "topk_dtype", "write_header"]

HEADER = "header.json"
KIND = "kdgraph teacher cache"  # a header.json without it is someone else's
FORMAT = 2  # 2: shard checksums, the teacher's code and the data's files in the key
MAX_HEADER_BYTES = 256 << 20  # ~90 bytes per shard: 100000 epochs on 28 ranks
# The spec's own bound on training epochs: a cache covers a run's epochs, no more.
MAX_CACHE_EPOCHS = 100_000
# k = 10: 40 bytes per image per epoch (10 fp16 probabilities + 10 uint16 indices). FKD's
# marginal smoothing spreads the mass outside the top k uniformly, so what k drops is the
# shape of the tail alone; a tail's KL term weighs its mass, which for a trained teacher is a
# few per cent past the tenth class (the benchmark prints it). Full fp32 logits of 1000
# classes would be 4000 bytes: 100 times more.
DEFAULT_TOP_K = 10
MAX_CLASSES_TOPK = 65535  # the largest k
KEY_FIELDS = ("teacher", "data", "data_files", "augmentation", "normalisation", "seed", "runtime", "ranks", "mode")


def topk_dtype(k: int, classes: int = MAX_CLASSES_TOPK) -> np.dtype:
    """One top-k record: k float16 probabilities ``p``, k class (token) ids ``i``: uint16 where
    ``classes`` ids fit (65,536 or fewer), else uint32."""
    return np.dtype([("p", "<f2", (k,)), ("i", "<u2" if classes <= 1 << 16 else "<u4", (k,))])


TOPK_DTYPE = topk_dtype(DEFAULT_TOP_K)


def shard_path(root: Path, epoch: int, rank: int) -> Path:
    return Path(root) / f"e{epoch:04d}-r{rank}.npy"


def checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256")


def shard_dtype(header: dict[str, Any]) -> np.dtype:
    """The dtype every shard of the cache holds: float32 logits, or the top-k record (its ids
    sized by the logits' last dimension: the classes, or a token cache's vocabulary)."""
    mode = header["key"]["mode"]["value"]
    return np.dtype("<f4") if mode["mode"] == "full" else topk_dtype(int(mode["k"]), int(header["logits_shape"][-1]))


def shard_shape(header: dict[str, Any]) -> tuple[int, ...]:
    """One rank's shard: (rows, *logits_shape) of full logits; of top-k records, one per
    position: (rows,) of (C,) logits, (rows, T) of a causal LM's (T, V) ones."""
    rows, shape = int(header["rows_per_epoch"]), tuple(map(int, header["logits_shape"]))
    return (rows, *shape) if header["key"]["mode"]["value"]["mode"] == "full" else (rows, *shape[:-1])


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_code(model: Any, traced: Any = None) -> str:
    """SHA-256 of what the teacher computes, weights aside: its module tree as printed (a
    ReLU swapped for a Sigmoid shows), the traced graph's code (a functional call changed in
    a forward fx traces through) and the source of the classes of its modules outside torch
    itself (a forward fx keeps whole). The same for the meta-device model ``kdgraph plan``
    builds and the real one. A model fed token ids is traced by torch.export, whose graph is
    not the same on the meta device (it names the device, and traces one more node per layer):
    its library's version stands in for the graph (its functions besides the classes)."""
    sources = {}
    for m in model.modules():
        cls = type(m)
        if cls.__module__.split(".")[0] != "torch":
            try:
                sources[f"{cls.__module__}.{cls.__qualname__}"] = inspect.getsource(cls)
            except (OSError, TypeError):  # defined where no source is kept
                sources[f"{cls.__module__}.{cls.__qualname__}"] = None
    code = traced.gm.code if traced is not None else None
    if getattr(model, "takes_tokens", False):
        package = sys.modules.get(type(getattr(model, "lm", model)).__module__.split(".")[0])
        code = f"{package.__name__} {getattr(package, '__version__', None)}" if package is not None else None
    return hashlib.sha256(json.dumps([repr(model), code, sources], sort_keys=True).encode()).hexdigest()


def data_files(data_spec: Any) -> dict[str, Any] | None:
    """What the training split is read from, as a key: an image folder's training files by
    (path under data.root, size, mtime_ns, inode) (a stat each, no read: a swapped or duplicated
    class folder, an added, removed, resized or rewritten image changes it; a copied folder too),
    Fashion-MNIST's training IDX files by the SHA-256 of their bytes (read whole in any case), a
    torchvision root's files by the same stat, text by its source files' stat and the tokenizer
    (``kdgraph.lm.text.text_key``). None where the data is made in code (digits,
    synthetic). What the stat cannot see (bytes rewritten with their size, mtime and inode put
    back) the replay sees: the decoded training split's SHA-256 (``train_data_sha256``)."""
    from kdgraph.data import FASHION_MNIST_ROOT, _find_file
    from kdgraph.imagefolder import scan_imagefolder

    name = data_spec.dataset
    if name == "text":
        from kdgraph.lm.text import text_key

        return text_key(data_spec)
    root = Path(data_spec.root) if data_spec.root is not None else None
    if name == "imagefolder":
        if root is None or not (root / "train").is_dir():
            return None  # the plan names the missing root
        return _stat_key(root, scan_imagefolder(root, data_spec.num_classes).train_files.tolist())
    if name.startswith("fashion-mnist"):
        root = root or FASHION_MNIST_ROOT
        found = [_find_file(root, s) if root.is_dir() else None
                 for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")]
        return {"files": {p.name: file_sha256(p) for p in found if p is not None}}
    if name.startswith("torchvision:") and root is not None and root.is_dir():
        return _stat_key(root, sorted(str(p) for p in root.rglob("*") if p.is_file()))
    return None


def _stat_key(root: Path, files: list[str]) -> dict[str, Any]:
    h, total = hashlib.sha256(), 0
    for f in files:
        st = os.stat(f)
        total += st.st_size
        h.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": h.hexdigest()}


def cache_key(spec: Spec, mode: str, top_k: int | None, world_size: int, data_plan: Any = None,
              teacher: Any = None, vocab: int | None = None) -> dict[str, Any]:
    """What the cached values are a function of, field by field (each a short hash, the
    readable values beside it in the header). ``mode``: full or topk. ``data_plan`` (the
    compiled ``DataPlan``): its resolved normalisation, which the student's model can choose
    (the batch's, and the teacher's own where they differ). ``teacher``: the compiled
    teacher's artifacts (``ModelArtifacts``), for its code. ``vocab``: a token cache's width,
    the student's ids the teacher's logits are cut to (``token_width``); None for images."""
    t = spec.teacher
    code = teacher_code(teacher.model, teacher.traced) if teacher is not None else None
    teacher_value = {"model": t.model, "kwargs": t.kwargs, "pretrained": t.pretrained,
                     "checkpoint_sha256": file_sha256(t.checkpoint) if t.checkpoint is not None else None,
                     "dtype": t.dtype,  # a bfloat16 teacher's logits are not a float32 one's
                     "code_sha256": code}
    data = spec.data.model_dump(mode="json")
    augment = data.pop("augment")
    data.pop("test_batch_size", None)  # evaluation only
    rt = spec.runtime
    fields = {
        "teacher": teacher_value,
        "data": data,
        "data_files": data_files(spec.data),
        "augmentation": augment,
        "normalisation": {f: getattr(data_plan, f, None) for f in ("mean", "std", "teacher_mean", "teacher_std")},
        "seed": spec.seed,
        "runtime": {"precision": rt.precision, "micro_batches": rt.micro_batches,
                    "channels_last": str(rt.channels_last)},
        "ranks": world_size,
        "mode": {"mode": mode, **({"k": top_k, "temperature": spec.loss.temperature} if mode == "topk" else {}),
                 **({"vocab": vocab} if vocab is not None else {})},
    }
    return {name: {"sha256": _digest(value), "value": value} for name, value in fields.items()}


def token_width(spec: Spec, student: Any) -> int | None:
    """A causal LM's token cache holds the teacher's logits over the student's ids (a teacher
    padded past them is cut, as the token loss cuts it): the width V of the student's traced
    (B, T, V) output (``student``: its ``ModelArtifacts``). None for images (their logits are
    cached whole)."""
    if spec.data.dataset != "text" or student is None or student.traced is None:
        return None
    shape = student.output_shape
    return int(shape[-1]) if shape is not None else None


def differences(built: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Each key leaf that differs, whole (never cut: the one that matters may be the last), as
    ``field.leaf (then then, now now)``: ``teacher.dtype ("float32" then, "bfloat16" now)``."""
    out = []
    for name in wanted:
        if name in ignore:
            continue
        a, b = built.get(name), wanted[name]
        if a is None:
            out.append(f"{name} (absent then, {_shown(b['value'])} now)")
        elif a["sha256"] != b["sha256"]:
            out += _leaves(name, a["value"], b["value"]) or [f"{name} ({_shown(a['value'])} then, "
                                                            f"{_shown(b['value'])} now)"]
    return out


def _leaves(path: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _leaves(f"{path}.{k}", a.get(k, _ABSENT), b.get(k, _ABSENT))]
    if _shown(a) == _shown(b):
        return []
    return [f"{path} ({_shown(a)} then, {_shown(b)} now)"]


_ABSENT = object()


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, sort_keys=True, default=str)


def read_header(root: Path | str) -> dict[str, Any]:
    """The cache's header, checked whole (a damaged, truncated, foreign or key-less one is one
    line naming what is wrong, never a traceback); the one place a header is read. Read once per
    process while the file is unchanged (same inode, size and mtime): planning, the trainer and
    the replay all see the header that was checked."""
    root = Path(root)
    path = root / HEADER
    if root.exists() and not root.is_dir():
        raise SpecError("teacher.cache", f"{root} is a file; a teacher cache is a folder (built by `kdgraph cache`)")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError("teacher.cache", f"{root}: no teacher cache there (no {HEADER}); build it with "
                        "`kdgraph cache SPEC --epochs N`") from None
    except OSError as exc:
        raise SpecError("teacher.cache", f"{path}: cannot read it ({exc.strerror})") from None
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _READ.get(str(path.resolve()))
    if cached is None or cached[0] != sig:
        cached = (sig, _parse_header(root, path, st.st_size))
        _READ[str(path.resolve())] = cached
    return copy.deepcopy(cached[1])


_READ: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def _parse_header(root: Path, path: Path, size: int) -> dict[str, Any]:
    if size > MAX_HEADER_BYTES:
        raise SpecError("teacher.cache", f"{path}: {size:,} bytes, not a header kdgraph wrote (at most "
                        f"{MAX_HEADER_BYTES:,})")
    try:
        header = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError("teacher.cache", f"{path} is damaged ({type(exc).__name__}: {exc}); rebuild the cache with "
                        "`kdgraph cache SPEC --epochs N` into a new folder") from None
    earlier = isinstance(header, dict) and header.get("format") == 1 and "key" in header  # before "kind"
    if not earlier and (not isinstance(header, dict) or header.get("kind") != KIND):
        raise SpecError("teacher.cache", f"{root} is not a kdgraph teacher cache: its {HEADER} was not written by "
                        "`kdgraph cache`; name another folder")
    if header.get("format") != FORMAT:
        raise SpecError("teacher.cache", f"{root}: cache format {header.get('format')!r}, this kdgraph reads "
                        f"{FORMAT}; delete it and build it again with `kdgraph cache SPEC --epochs N`")
    problem = _header_problem(header)
    if problem:
        raise SpecError("teacher.cache", f"{path} is damaged ({problem}); rebuild the cache with "
                        "`kdgraph cache SPEC --epochs N` into a new folder")
    return header


def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _header_problem(h: dict[str, Any]) -> str | None:
    """What is wrong with a parsed header, or None."""
    key = h.get("key")
    if not isinstance(key, dict) or set(key) != set(KEY_FIELDS):
        return f"its key does not hold exactly {', '.join(KEY_FIELDS)}"
    for name, field in key.items():
        if not isinstance(field, dict) or not isinstance(field.get("sha256"), str) or "value" not in field:
            return f"key field {name} is not {{sha256, value}}"
    mode = key["mode"]["value"]
    if not isinstance(mode, dict) or mode.get("mode") not in ("full", "topk") or \
            (mode["mode"] == "topk" and not _is_int(mode.get("k"), 1, MAX_CLASSES_TOPK)):
        return f"key field mode is {_shown(mode)}"
    if not _is_int(key["ranks"]["value"], 1):
        return "key field ranks is not a positive integer"
    if not _is_int(h.get("epochs"), 1, MAX_CACHE_EPOCHS):
        return f"epochs is {_shown(h.get('epochs'))}, not 1..{MAX_CACHE_EPOCHS}"
    stored = h.get("stored_epochs")
    if not isinstance(stored, list) or not all(_is_int(e, 0, h["epochs"] - 1) for e in stored):
        return "stored_epochs is not a list of the cache's epochs"
    for name, lo in (("rows_per_epoch", 0), ("batch_size", 1), ("bytes_per_row", 1)):
        if not _is_int(h.get(name), lo):
            return f"{name} is {_shown(h.get(name))}"
    shape = h.get("logits_shape")
    if not isinstance(shape, list) or not all(_is_int(d, 1) for d in shape):
        return f"logits_shape is {_shown(shape)}"
    if not isinstance(h.get("complete"), bool) or not isinstance(h.get("teacher_weights_sha256"), str):
        return "complete or teacher_weights_sha256 is missing"
    if not isinstance(h.get("train_data_sha256"), (str, type(None))):
        return "train_data_sha256 is not a SHA-256"
    shards = h.get("shards", {})
    if not isinstance(shards, dict) or not all(isinstance(v, str) and len(v) == 64 for v in shards.values()):
        return "shards is not a map of shard names to SHA-256 checksums"
    return None


def write_header(root: Path | str, header: dict[str, Any]) -> None:
    """Atomically: a killed build leaves the old header or the new one. A full disk or a
    read-only folder is one line."""
    path = Path(root) / HEADER
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps({"kind": KIND, "format": FORMAT, **header}, indent=2))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KDGraphError(f"{path}: cannot write the cache's header ({exc.strerror or exc})") from None


def cached_epochs(header: dict[str, Any]) -> range:
    """The epochs (0-based) the cache covers: its first ``epochs``."""
    return range(int(header["epochs"]))
