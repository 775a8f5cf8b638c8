"""Build a teacher cache, and replay it: the teacher's logits for a run's training views,
computed once (``kdgraph.teacher_cache`` describes the folder and its key).

    build_cache(spec, epochs=N)      `kdgraph cache SPEC --epochs N`: writes spec.teacher.cache
    TeacherCache(root, rank, ...)    what the Trainer reads, one batch at a time

The builder draws exactly the batches the Trainer will: it builds the run's own data
(``build_data``: same sampler order, same crops and flips per (seed, epoch, index), the same
rank's slice under torchrun) and runs the teacher as the distiller does (its block segments,
each micro-batch alone, under the run's autocast and memory format), so a full cache holds
the live teacher's logits bit for bit. Epochs whose training stage needs the teacher live
(decomposed StableKD stages, feature losses, TPP) are not written: no stage would read them.

One shard per (epoch, rank), written under a temporary name and renamed when whole: a killed
build resumes at the first missing shard. Under torchrun (``torchrun -m kdgraph cache ...``)
each rank writes its own shards and rank 0 the header; training must use as many ranks.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdgraph.compiler import compile_spec
from kdgraph.data import build_data
from kdgraph.errors import KDGraphError
from kdgraph.runtime.config import resolve_config
from kdgraph.runtime.teacher import FrozenTeacher
from kdgraph.runtime.techniques import autocast, init_distributed, resolve_device
from kdgraph.schedules import stage_at
from kdgraph.teacher_cache import (
    DEFAULT_TOP_K,
    MAX_CLASSES_TOPK,
    cache_key,
    differences,
    read_header,
    shard_path,
    topk_dtype,
    write_header,
)

__all__ = ["CacheSummary", "TeacherCache", "build_cache", "split_cached"]


@dataclass(frozen=True)
class CacheSummary:
    root: str
    mode: str
    k: int | None
    epochs: list[int]  # epochs written or found (0-based)
    built: list[int]  # epochs this call wrote
    rows_per_epoch: int  # this rank's
    bytes_per_image: float  # per epoch
    seconds: float  # spent computing (this call)
    teacher_forward_s: float  # of which in the teacher's forward

    def __str__(self) -> str:
        kind = "full fp32 logits" if self.mode == "full" else f"top-{self.k} fp16 probabilities"
        return (f"teacher cache {self.root}: {kind}, epochs {_ranges(self.epochs)} ({len(self.built)} built now, "
                f"{self.seconds:.1f} s), {self.rows_per_epoch} views per epoch, "
                f"{self.bytes_per_image:.0f} bytes per image per epoch")


def _ranges(epochs: list[int]) -> str:
    return ", ".join(str(e + 1) for e in epochs) or "none"


def _without_cache(spec):
    """The spec whose run the cache is built for, compiled as if it named no cache (it may not exist yet)."""
    return spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"cache": None})})


def _weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the teacher's state_dict (names, dtypes, shapes, bytes): which weights made the cache."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _rows(loader) -> int:
    """Training positions of one epoch on this rank (the batches' lengths summed)."""
    return min(loader.samples_per_rank, len(loader) * loader.batch_size)


def build_cache(spec, epochs: int, *, full: bool = False, top_k: int = DEFAULT_TOP_K,
                quiet: bool = False) -> CacheSummary:
    """Write the teacher's outputs for the first ``epochs`` epochs of ``spec``'s run into
    ``spec.teacher.cache``: float32 logits with ``full``, else the ``top_k`` largest
    probabilities at the spec's loss temperature (fp16) and their indices. Resumes a stopped
    build; refuses a folder built for another run (one line naming what differs)."""
    if spec.teacher is None or spec.teacher.cache is None:
        raise KDGraphError("kdgraph cache writes to teacher.cache: set it in the spec (or --set teacher.cache=DIR)")
    if epochs < 1:
        raise KDGraphError(f"--epochs must be at least 1, got {epochs}")
    root = Path(spec.teacher.cache)
    info = init_distributed()
    device = resolve_device(spec.runtime.device, info)
    if spec.runtime.num_threads:
        torch.set_num_threads(spec.runtime.num_threads)
    torch.manual_seed(spec.seed)  # as the Trainer: an untrained teacher's weights are the run's
    random.seed(spec.seed)
    base = _without_cache(spec)
    compiled = compile_spec(base, fetch=("teacher",))
    plan = compiled.plan
    mode = "full" if full else "topk"
    classes = compiled.teacher.num_classes
    if mode == "topk":
        if compiled.teacher.dense or classes is None:
            raise KDGraphError("a top-k cache holds class probabilities of (C,) logits; this teacher's output is "
                               "not: build it with --full")
        if not 1 <= top_k <= MAX_CLASSES_TOPK:
            raise KDGraphError(f"--top-k must be in 1..{MAX_CLASSES_TOPK}, got {top_k}")
        top_k = min(top_k, classes)
    key = cache_key(spec, mode, top_k if mode == "topk" else None, info.world_size)
    root.mkdir(parents=True, exist_ok=True)
    if (root / "header.json").exists():
        old = read_header(root)
        diff = differences(old["key"], key)
        if diff:
            raise KDGraphError(f"{root} holds a cache built for another run (differs: {'; '.join(diff)}); "
                               "choose another teacher.cache or delete it")
        epochs = max(epochs, int(old["epochs"]))
    # Stages that need the teacher live never read the cache: their epochs are not written.
    stage_epochs = [st.epochs for st in plan.stages]
    wanted = [e for e in range(epochs)
              if e >= plan.epochs or plan.stages[stage_at(stage_epochs, e)].program.replayable]

    data = build_data(base, compiled.data, device, info)
    config = resolve_config(base, device, compiled.student.model)
    teacher = FrozenTeacher(compiled.teacher.model, compiled.teacher.segments)
    teacher.apply_(lambda t: t.to(device))
    if config.channels_last:
        teacher.apply_(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    loader = data.train
    rows = _rows(loader)
    shape = tuple(compiled.teacher.logits_shape or ())
    dtype = np.dtype("<f4") if mode == "full" else topk_dtype(top_k)
    row_bytes = dtype.itemsize * (int(np.prod(shape)) if mode == "full" else 1)
    if info.is_main:
        write_header(root, {"key": key, "epochs": epochs, "stored_epochs": wanted, "complete": False,
                            "logits_shape": list(shape), "rows_per_epoch": rows, "batch_size": loader.batch_size,
                            "bytes_per_row": row_bytes, "teacher_weights_sha256": _weights_sha256(teacher.model)})
    todo = [e for e in wanted if not shard_path(root, e, info.rank).exists()]
    head = plan.k
    t0, forward_s = time.perf_counter(), 0.0
    progress = None if quiet or not info.is_main else Progress(
        TextColumn("cache {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True))
    if progress is not None:
        progress.start()
        task = progress.add_task("batches", total=len(todo) * len(loader))
    try:
        for epoch in todo:
            final = shard_path(root, epoch, info.rank)
            tmp = final.with_name(final.name + ".tmp")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                            shape=(rows, *shape) if mode == "full" else (rows,))
            at = 0
            for xb, _ in loader.epoch(epoch):
                if config.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                f0 = time.perf_counter()
                # as Trainer.train_step feeds the distiller: micro-batch by micro-batch, under autocast
                parts = []
                for xm in xb.tensor_split(config.micro_batches):
                    if len(xm):
                        with autocast(config.precision, device):
                            parts.append(teacher.features(xm, {head})[head])
                logits = torch.cat(parts).float()
                forward_s += time.perf_counter() - f0
                n = len(logits)
                if mode == "full":
                    out[at:at + n] = logits.cpu().numpy()
                else:
                    p, i = torch.softmax(logits / spec.loss.temperature, dim=-1).topk(top_k, dim=-1)
                    out["p"][at:at + n] = p.half().cpu().numpy()
                    out["i"][at:at + n] = i.cpu().numpy().astype(np.uint16)
                at += n
                if progress is not None:
                    progress.advance(task)
            if at != rows:
                raise KDGraphError(f"epoch {epoch + 1} gave {at} training views, expected {rows}")
            out.flush()
            del out
            os.replace(tmp, final)  # the shard is whole, or absent
    finally:
        if progress is not None:
            progress.stop()
    if info.enabled:
        torch.distributed.barrier()
    if info.is_main:
        header = read_header(root)
        header.pop("format")
        write_header(root, {**header, "complete": True})
    return CacheSummary(str(root), mode, top_k if mode == "topk" else None, wanted, todo, rows,
                        row_bytes, time.perf_counter() - t0, forward_s)


def split_cached(cached: Any, parts: int) -> list[Any]:
    """A batch's cached teacher output in ``parts`` micro-batches (as ``tensor_split`` splits the batch)."""
    if isinstance(cached, tuple):
        return [tuple(p) for p in zip(*(c.tensor_split(parts) for c in cached))]
    return list(cached.tensor_split(parts))


class TeacherCache:
    """A built cache, read batch by batch: rows ``step * batch_size ..`` of the epoch's shard
    of this rank, memory-mapped (``np.load(mmap_mode='r')``)."""

    def __init__(self, root: Path | str, rank: int, world_size: int, batch_size: int, device: torch.device):
        self.root = Path(root)
        header = read_header(self.root)
        built_for = header["key"]["ranks"]["value"]
        if built_for != world_size:
            raise KDGraphError(f"{self.root} was built on {built_for} rank(s); this run has {world_size}: rebuild it "
                               f"under the same torchrun")
        if not header.get("complete"):
            raise KDGraphError(f"{self.root} is incomplete (its build stopped): run `kdgraph cache` again to finish it")
        if header["batch_size"] != batch_size:
            raise KDGraphError(f"{self.root} was built with batch size {header['batch_size']}, this run has {batch_size}")
        self.mode = header["key"]["mode"]["value"]["mode"]
        self.stored = set(header["stored_epochs"])
        self.rank, self.batch_size, self.device = rank, batch_size, device
        self._shards: dict[int, np.ndarray] = {}

    def _shard(self, epoch: int) -> np.ndarray:
        if epoch not in self._shards:
            path = shard_path(self.root, epoch, self.rank)
            if epoch not in self.stored or not path.exists():
                raise KDGraphError(f"{self.root} holds no epoch {epoch + 1} (rank {self.rank}); rebuild it with "
                                   f"`kdgraph cache SPEC --epochs {epoch + 1}`")
            self._shards = {epoch: np.load(path, mmap_mode="r")}  # one epoch mapped at a time
        return self._shards[epoch]

    def batch(self, epoch: int, step: int, n: int) -> Any:
        """The teacher's output for the ``n`` views of batch ``step`` of ``epoch``: float32
        logits (full), or (fp16 probabilities, int64 indices) of the top k."""
        rows = self._shard(epoch)[step * self.batch_size: step * self.batch_size + n]
        if self.mode == "full":
            return torch.from_numpy(np.array(rows)).to(self.device, non_blocking=True)
        return (torch.from_numpy(np.array(rows["p"])).to(self.device, non_blocking=True),
                torch.from_numpy(rows["i"].astype(np.int64)).to(self.device, non_blocking=True))
