"""Replay a teacher cache (``kdgraph.teacher_cache``; built by ``kdgraph.runtime.cache``): the
teacher's output for each training batch, read from its epoch's shard, which is checked before
any row of it is used:

- the ``.npy`` header's dtype and shape against the cache header's (float64 zeros of the right
  shape, a shard of another mode or k, a pickled object in a shard's place: refused);
- its size (a truncated shard: refused);
- the SHA-256 of its rows against the checksum the build wrote (overwritten bytes: refused),
  hashed while the rows are read: one read of the shard, into memory where it is at most
  ``READ_WHOLE_BYTES`` (one epoch of one rank: 51 MB of ImageNet's top-10), else hashed
  streaming and then memory-mapped (the second read served from the page cache where it fits);
- and, once per run, the teacher's weights: the teacher is built again as the cache's builder
  built it (on the CPU, its checkpoint or pretrained weights loaded) and its state_dict's
  SHA-256 compared with the header's ``teacher_weights_sha256``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdgraph.errors import KDGraphError
from kdgraph.teacher_cache import read_header, shard_dtype, shard_path, shard_shape

__all__ = ["READ_WHOLE_BYTES", "TeacherCache", "read_shard", "split_cached", "teacher_weights_sha256",
           "train_data_sha256"]

READ_WHOLE_BYTES = 1 << 30
_BLOCK = 1 << 22


def split_cached(cached: Any, parts: int) -> list[Any]:
    """A batch's cached teacher output in ``parts`` micro-batches (as ``tensor_split`` splits the batch)."""
    if isinstance(cached, tuple):
        return [tuple(p) for p in zip(*(c.tensor_split(parts) for c in cached))]
    return list(cached.tensor_split(parts))


def teacher_weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a teacher's state_dict as built (names, dtypes, shapes, bytes; before
    teacher.dtype casts it): which weights made the cache."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def train_data_sha256(loader: Any) -> str | None:
    """SHA-256 of the training split as decoded and held in memory (images, labels, their
    shapes and dtypes): the bytes the teacher's views are cut from; a loader's own
    ``data_sha256()`` where it has one (a causal LM's: its split's tokens). None for a streamed
    split (its files are keyed by their stat, ``teacher_cache.data_files``). Hashed in chunks
    from the loader's device."""
    if callable(getattr(loader, "data_sha256", None)):
        return loader.data_sha256()
    x, y = getattr(loader, "x", None), getattr(loader, "y", None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}{y.dtype}{tuple(y.shape)}".encode())
    for t in (x, y):
        flat, step = t.detach().reshape(-1), (64 << 20) // t.element_size()
        for at in range(0, flat.numel(), step):
            h.update(flat[at:at + step].cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _describe(dtype: np.dtype, shape: tuple[int, ...]) -> str:
    return f"{np.lib.format.dtype_to_descr(dtype)} {tuple(shape)}"


def _check_npy_header(f, where: str, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """The shard's .npy header is the cache header's dtype and shape (parsed, never unpickled),
    and its rows fill the file exactly; returns the bytes of rows."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f".npy format version {version}")
        got_shape, fortran, got_dtype = read[version](f)
    except (ValueError, SyntaxError, OSError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise KDGraphError(f"{where}: not a .npy array ({first}); it was replaced after the build: rebuild the "
                           "cache") from None
    if got_dtype != dtype or tuple(got_shape) != tuple(shape) or fortran:
        order = " (Fortran order)" if fortran else ""
        raise KDGraphError(f"{where}: holds {_describe(got_dtype, got_shape)}{order}, the cache header says "
                           f"{_describe(dtype, shape)}: rebuild the cache")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    have = os.fstat(f.fileno()).st_size - f.tell()
    if have != nbytes:
        raise KDGraphError(f"{where}: {have:,} bytes of rows, {nbytes:,} expected "
                           f"({'truncated' if have < nbytes else 'bytes appended'}): rebuild the cache")
    return nbytes


def read_shard(path: Path, dtype: np.dtype, shape: tuple[int, ...], sha256: str | None) -> np.ndarray:
    """The rows of one shard, checked (dtype, shape, size, checksum) before they are returned:
    read once into memory while hashed, or, above ``READ_WHOLE_BYTES``, hashed streaming and
    then memory-mapped."""
    where = f"{path} (teacher cache shard)"
    if sha256 is None:
        raise KDGraphError(f"{where}: the cache header holds no checksum for it; rebuild the cache")
    with open(path, "rb") as f:
        nbytes = _check_npy_header(f, where, dtype, shape)
        offset, h = f.tell(), hashlib.sha256()
        whole = nbytes <= READ_WHOLE_BYTES
        rows = np.empty(shape, dtype=dtype) if whole else None
        view = memoryview(rows.reshape(-1).view(np.uint8)) if whole else None
        at = 0
        while at < nbytes:
            n = min(_BLOCK, nbytes - at)
            block = view[at:at + n] if whole else bytearray(n)
            got = f.readinto(block)
            if got != n:
                raise KDGraphError(f"{where}: ended after {at + (got or 0):,} of {nbytes:,} bytes of rows "
                                   "(changed while read): rebuild the cache")
            h.update(block)
            at += n
    if h.hexdigest() != sha256:
        raise KDGraphError(f"{where}: its rows' SHA-256 is {h.hexdigest()}, the build wrote {sha256}: the shard "
                           "changed after it was built; rebuild the cache")
    return rows if whole else np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class TeacherCache:
    """A built cache, read batch by batch: rows ``step * batch_size ..`` of the epoch's shard
    of this rank, checked (``read_shard``) when the epoch's shard is first read. ``run``: the
    run's ``RunRecord``, to check the teacher's weights against the header's (once, here); ``data``: the
    run's training loader, whose decoded split must be the one the cache was built from."""

    def __init__(self, root: Path | str, rank: int, world_size: int, batch_size: int, device: torch.device,
                 run: Any = None, data: Any = None):
        self.root = Path(root)
        header = read_header(self.root)
        built_for = header["key"]["ranks"]["value"]
        if built_for != world_size:
            raise KDGraphError(f"{self.root} was built on {built_for} rank(s); this run has {world_size}: rebuild it "
                               f"under the same torchrun")
        if not header["complete"]:
            raise KDGraphError(f"{self.root} is incomplete (its build stopped): run `kdgraph cache` again to finish "
                               "it")
        if header["batch_size"] != batch_size:
            raise KDGraphError(f"{self.root} was built with batch size {header['batch_size']}, this run has "
                               f"{batch_size}")
        self.mode = header["key"]["mode"]["value"]["mode"]
        self.stored = set(header["stored_epochs"])
        self.dtype, self.shape = shard_dtype(header), shard_shape(header)
        self.checksums: dict[str, str] = header.get("shards", {})
        self.rank, self.batch_size, self.device = rank, batch_size, device
        self._shards: dict[int, np.ndarray] = {}
        if run is not None:
            self.check_teacher(run, header["teacher_weights_sha256"])
        built_from, now = header.get("train_data_sha256"), train_data_sha256(data) if data is not None else None
        if built_from is not None and now is not None and built_from != now:
            raise KDGraphError(f"{self.root} was built from other training data (the decoded training split's SHA-256 "
                               f"{built_from} then, {now} now): rebuild it with `kdgraph cache SPEC --epochs N`")

    def check_teacher(self, run: Any, want: str) -> None:
        """The teacher's weights, built as the cache's builder built them, are those it cached
        (``run``: the run's ``RunRecord``, its teacher source and seed)."""
        from kdgraph.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)  # an untrained teacher's weights: the builder's draw
            model = build_model(run.teacher, run.source_dir, role="teacher", fetch=True)
        got = teacher_weights_sha256(model)
        if got != want:
            raise KDGraphError(f"{self.root} was built from other teacher weights (SHA-256 {want} then, {got} now): "
                               "rebuild it with `kdgraph cache SPEC --epochs N`")

    def _shard(self, epoch: int) -> np.ndarray:
        if epoch not in self._shards:
            path = shard_path(self.root, epoch, self.rank)
            if epoch not in self.stored or not path.exists():
                raise KDGraphError(f"{self.root} holds no epoch {epoch + 1} (rank {self.rank}); rebuild it with "
                                   f"`kdgraph cache SPEC --epochs {epoch + 1}`")
            self._shards = {}  # one epoch held at a time
            self._shards[epoch] = read_shard(path, self.dtype, self.shape, self.checksums.get(path.name))
        return self._shards[epoch]

    def batch(self, epoch: int, step: int, n: int) -> Any:
        """The teacher's output for the ``n`` views of batch ``step`` of ``epoch``: float32
        logits (full), or (fp16 probabilities, int64 indices) of the top k."""
        rows = self._shard(epoch)[step * self.batch_size: step * self.batch_size + n]
        if self.mode == "full":
            return torch.from_numpy(np.array(rows)).to(self.device, non_blocking=True)
        return (torch.from_numpy(np.array(rows["p"])).to(self.device, non_blocking=True),
                torch.from_numpy(rows["i"].astype(np.int64)).to(self.device, non_blocking=True))
