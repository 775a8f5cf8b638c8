"""Build a teacher cache, and replay it: the teacher's logits for a run's training views,
computed once (``kdgraph.teacher_cache`` describes the folder and its key).

    build_cache(spec, epochs=N)      `kdgraph cache SPEC --epochs N`: writes spec.teacher.cache
    TeacherCache(root, rank, ...)    what the Trainer reads, one batch at a time

The builder draws exactly the batches the Trainer will: it builds the run's own data
(``build_data``: same sampler order, same crops and flips per (seed, epoch, index), the same
rank's slice under torchrun), mixes each batch as the trainer does where ``data.mixup`` is on
(``RuntimeConfig.mix``: the same draw from seed, epoch and position), and runs the teacher as
the distiller does (its own input normalisation, its block segments, each micro-batch alone,
under the run's autocast and memory format), so a full cache holds the live teacher's logits
bit for bit. Epochs whose training stage needs the teacher live
(decomposed StableKD stages, feature losses, TPP) are not written: no stage would read them.

One shard per (epoch, rank), written under a temporary name and renamed when whole: a killed
build resumes at the first missing shard. Under torchrun (``torchrun -m kdgraph cache ...``)
each rank writes its own shards and rank 0 the header; training must use as many ranks.
Replay is ``kdgraph.runtime.replay``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdgraph.compiler import compile_spec
from kdgraph.data import build_data
from kdgraph.errors import KDGraphError
from kdgraph.runtime.config import resolve_config
from kdgraph.runtime.distiller import frozen_teacher
from kdgraph.runtime.teacher import FrozenTeacher
from kdgraph.runtime.techniques import (autocast, channels_last_tensor, init_distributed, resolve_device,
                                        shard_teacher)
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

__all__ = ["CacheSummary", "build_cache"]


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


def _checked_mode(compiled, full: bool, top_k: int) -> tuple[str, int | None]:
    if full:
        return "full", None
    if compiled.teacher.dense or compiled.teacher.num_classes is None:
        raise KDGraphError("a top-k cache holds class probabilities of (C,) logits; this teacher's output is "
                           "not: build it with --full")
    if not 1 <= top_k <= MAX_CLASSES_TOPK:
        raise KDGraphError(f"--top-k must be in 1..{MAX_CLASSES_TOPK}, got {top_k}")
    return "topk", min(top_k, compiled.teacher.num_classes)


def _epochs_to_build(root: Path, key: dict, epochs: int, plan) -> tuple[int, list[int]]:
    """(epochs the cache covers, those written: the stages that read the cache). A folder
    built for another run is refused; one built for more epochs keeps them."""
    if (root / "header.json").exists():
        old = read_header(root)
        diff = differences(old["key"], key)
        if diff:
            raise KDGraphError(f"{root} holds a cache built for another run (differs: {'; '.join(diff)}); "
                               "choose another teacher.cache or delete it")
        epochs = max(epochs, int(old["epochs"]))
    # Stages that need the teacher live never read the cache: their epochs are not written.
    stage_epochs = [st.epochs for st in plan.stages]
    return epochs, [e for e in range(epochs)
                    if e >= plan.epochs or plan.stages[stage_at(stage_epochs, e)].program.replayable]


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
    mode, top_k = _checked_mode(compiled, full, top_k)
    key = cache_key(spec, mode, top_k, info.world_size, compiled.data)
    root.mkdir(parents=True, exist_ok=True)
    epochs, wanted = _epochs_to_build(root, key, epochs, compiled.plan)
    data = build_data(base, compiled.data, device, info)
    config = resolve_config(base, device, compiled.student.model)
    teacher = frozen_teacher(compiled)
    weights_sha256 = _weights_sha256(teacher.model)  # in the teacher's dtype, before any sharding
    teacher.apply_(lambda t: t.to(device))
    if config.channels_last:
        teacher.apply_(channels_last_tensor)
    if compiled.plan.teacher_shard:  # every rank runs as many batches: the gathers pair up
        shard_teacher(teacher, info, device)
    shard = _ShardWriter(teacher, compiled.plan.k, config, mode, top_k, spec.loss.temperature,
                         tuple(compiled.teacher.logits_shape or ()), _rows(data.train),
                         (info.rank, info.world_size, compiled.num_classes or data.num_classes))
    if info.is_main:
        write_header(root, {"key": key, "epochs": epochs, "stored_epochs": wanted, "complete": False,
                            "logits_shape": list(shard.shape), "rows_per_epoch": shard.rows,
                            "batch_size": data.train.batch_size, "bytes_per_row": shard.row_bytes,
                            "teacher_weights_sha256": weights_sha256})
    todo = [e for e in wanted if not shard_path(root, e, info.rank).exists()]
    t0 = time.perf_counter()
    progress = None if quiet or not info.is_main else Progress(
        TextColumn("cache {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True))
    with progress or contextlib.nullcontext():
        task = progress.add_task("batches", total=len(todo) * len(data.train)) if progress else None
        for epoch in todo:
            shard.write(shard_path(root, epoch, info.rank), epoch, data.train.epoch(epoch),
                        lambda: progress.advance(task) if progress else None)
    if info.enabled:
        torch.distributed.barrier()
    if info.is_main:
        header = read_header(root)
        header.pop("format")
        write_header(root, {**header, "complete": True})
    return CacheSummary(str(root), mode, top_k, wanted, todo, shard.rows, shard.row_bytes,
                        time.perf_counter() - t0, shard.forward_s)


class _ShardWriter:
    """Writes one epoch's shard: the teacher run as the distiller runs it, on every batch."""

    def __init__(self, teacher: FrozenTeacher, head: int, config, mode: str, top_k: int | None,
                 temperature: float, shape: tuple[int, ...], rows: int, where: tuple[int, int, int | None]):
        self.teacher, self.head, self.config = teacher, head, config
        self.rank, self.world_size, self.num_classes = where  # for the mix's batch positions
        self.mode, self.top_k, self.temperature = mode, top_k, temperature
        self.shape, self.rows = shape, rows
        self.dtype = np.dtype("<f4") if mode == "full" else topk_dtype(top_k)
        self.row_bytes = self.dtype.itemsize * (int(np.prod(shape)) if mode == "full" else 1)
        self.forward_s = 0.0

    def logits(self, xb: torch.Tensor) -> torch.Tensor:
        """As Trainer.train_step feeds the distiller: micro-batch by micro-batch, under autocast."""
        cfg = self.config
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        parts = []
        for xm in xb.tensor_split(cfg.micro_batches):
            if len(xm):
                with autocast(cfg.precision, cfg.device):
                    parts.append(self.teacher.features(xm, {self.head})[self.head])
        return torch.cat(parts).float()

    def write(self, final: Path, epoch: int, batches, advance) -> None:
        """Every batch of ``batches`` (``epoch``'s) into ``final``, under a temporary name until
        it is whole; each batch mixed first where the run mixes (``RuntimeConfig.mix``), as the
        trainer mixes the batch its teacher reads."""
        tmp = final.with_name(final.name + ".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype,
                                        shape=(self.rows, *self.shape) if self.mode == "full" else (self.rows,))
        at = 0
        for step, (xb, yb) in enumerate(batches):
            xb, _ = self.config.mix(xb, yb, epoch, step * self.world_size + self.rank, self.num_classes)
            f0 = time.perf_counter()
            logits = self.logits(xb)
            self.forward_s += time.perf_counter() - f0
            n = len(logits)
            if self.mode == "full":
                out[at:at + n] = logits.cpu().numpy()
            else:
                p, i = torch.softmax(logits / self.temperature, dim=-1).topk(self.top_k, dim=-1)
                out["p"][at:at + n] = p.half().cpu().numpy()
                out["i"][at:at + n] = i.cpu().numpy().astype(np.uint16)
            at += n
            advance()
        if at != self.rows:
            raise KDGraphError(f"{final.name}: the epoch gave {at} training views, expected {self.rows}")
        out.flush()
        del out
        os.replace(tmp, final)  # the shard is whole, or absent
