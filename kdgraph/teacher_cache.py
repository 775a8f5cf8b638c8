"""The teacher cache's format: a folder holding the teacher's outputs for a run's training views.

    CACHE/header.json           what the cache was built for (``key``), its mode, its epochs
    CACHE/e0003-r0.npy          epoch 3 (0-based), rank 0: one row per training position

Every augmentation draw is a pure function of (seed, epoch, index), so the view at position i
of epoch e on rank r is fixed before training starts; row i of shard (e, r) is the teacher's
output for that view (whatever view both models see there: a crop, a flip, and a mixed image
once mixup draws from (seed, epoch, index) too). Replay reads rows ``step * batch_size ..``
of the epoch's shard: contiguous, memory-mapped, no per-sample index.

Two modes (``header["mode"]``):

- ``full``: float32 logits, one (*logits_shape) row per position. Exact: the live teacher's
  output is float32 (or bf16/fp16 under autocast, which float32 holds exactly), so training from
  it equals training with the live teacher bit for bit.
- ``topk``: the k largest of ``p = softmax(z_t / T)`` as float16 and their class indices as
  uint16, one structured row per position (``TOPK_DTYPE``): 4k bytes, 40 at k = 10. Replayed
  with FKD's loss (``kdgraph.losses.FKDHeadLoss``). T is the spec's ``loss.temperature``, part
  of the key.

Shards are ``.npy`` files (``numpy.lib.format.open_memmap``): no pickle, readable anywhere.
A shard is written under a temporary name and renamed when complete, so a killed build
leaves whole shards only and resumes at the first missing one. Under torchrun every rank
writes its own shards (``r{rank}``) from its own slice of the epoch; rank 0 writes the header.

The key (``cache_key``) names what fixes the cached values: the teacher (model, kwargs,
pretrained weights' name, the checkpoint file's SHA-256, the dtype it runs in; not whether it
is sharded, which gathers the same weights), the data spec (mixup included), the
augmentation, the resolved input normalisation (the batch's and the teacher's), the seed, the runtime settings the teacher's numerics depend on (precision, micro-batches,
channels_last), the ranks, the mode (k and T for top-k). ``differences`` compares two keys
field by field, for a refusal that names what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdgraph.errors import SpecError

if TYPE_CHECKING:
    from kdgraph.spec import Spec

__all__ = ["DEFAULT_TOP_K", "HEADER", "TOPK_DTYPE", "cache_key", "cached_epochs", "differences", "file_sha256",
           "read_header", "shard_path", "topk_dtype", "write_header"]

HEADER = "header.json"
FORMAT = 1
# k = 10: 40 bytes per image per epoch (10 fp16 probabilities + 10 uint16 indices). FKD's
# marginal smoothing spreads the mass outside the top k uniformly, so what k drops is the
# shape of the tail alone; a tail's KL term weighs its mass, which for a trained teacher is a
# few per cent past the tenth class (the benchmark prints it). Full fp32 logits of 1000
# classes would be 4000 bytes: 100 times more.
DEFAULT_TOP_K = 10
MAX_CLASSES_TOPK = 65535  # uint16 indices


def topk_dtype(k: int) -> np.dtype:
    """One top-k row: k float16 probabilities ``p``, k uint16 class indices ``i``."""
    return np.dtype([("p", "<f2", (k,)), ("i", "<u2", (k,))])


TOPK_DTYPE = topk_dtype(DEFAULT_TOP_K)


def shard_path(root: Path, epoch: int, rank: int) -> Path:
    return Path(root) / f"e{epoch:04d}-r{rank}.npy"


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(spec: Spec, mode: str, top_k: int | None, world_size: int, data_plan: Any = None) -> dict[str, Any]:
    """What the cached values are a function of, field by field (each a short hash, the
    readable values beside it in the header). ``mode``: full or topk. ``data_plan`` (the
    compiled ``DataPlan``): its resolved normalisation, which the student's model can choose
    (the batch's, and the teacher's own where they differ)."""
    t = spec.teacher
    teacher = {"model": t.model, "kwargs": t.kwargs, "pretrained": t.pretrained,
               "checkpoint_sha256": file_sha256(t.checkpoint) if t.checkpoint is not None else None,
               "dtype": t.dtype}  # a bfloat16 teacher's logits are not a float32 one's
    data = spec.data.model_dump(mode="json")
    augment = data.pop("augment")
    data.pop("test_batch_size", None)  # evaluation only
    rt = spec.runtime
    fields = {
        "teacher": teacher,
        "data": data,
        "augmentation": augment,
        "normalisation": {f: getattr(data_plan, f, None) for f in ("mean", "std", "teacher_mean", "teacher_std")},
        "seed": spec.seed,
        "runtime": {"precision": rt.precision, "micro_batches": rt.micro_batches,
                    "channels_last": str(rt.channels_last)},
        "ranks": world_size,
        "mode": {"mode": mode, **({"k": top_k, "temperature": spec.loss.temperature} if mode == "topk" else {})},
    }
    return {name: {"sha256": _digest(value), "value": value} for name, value in fields.items()}


def differences(built: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The key fields whose hashes differ, each as ``field (then -> now)``."""
    out = []
    for name in wanted:
        if name in ignore:
            continue
        a, b = built.get(name), wanted[name]
        if a is None or a["sha256"] != b["sha256"]:
            out.append(f"{name} ({_short(a and a['value'])} then, {_short(b['value'])} now)")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def read_header(root: Path | str) -> dict[str, Any]:
    path = Path(root) / HEADER
    if not path.is_file():
        raise SpecError("teacher.cache", f"{root}: no teacher cache there (no {HEADER}); build it with "
                        "`kdgraph cache SPEC --epochs N`")
    header = json.loads(path.read_text())
    if header.get("format") != FORMAT:
        raise SpecError("teacher.cache", f"{root}: cache format {header.get('format')}, this kdgraph reads {FORMAT}")
    return header


def write_header(root: Path | str, header: dict[str, Any]) -> None:
    """Atomically: a killed build leaves the old header or the new one."""
    path = Path(root) / HEADER
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **header}, indent=2))
    os.replace(tmp, path)


def cached_epochs(header: dict[str, Any]) -> range:
    """The epochs (0-based) the cache covers: its first ``epochs``."""
    return range(int(header["epochs"]))
