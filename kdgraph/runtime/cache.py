"""Build a teacher cache, and replay it: the teacher's logits for a run's training views,
computed once (``kdgraph.teacher_cache`` describes the folder and its key).

    build_cache(spec, epochs=N)      `kdgraph cache SPEC --epochs N`: writes the spec's teacher.cache
    TeacherCache(root, rank, ...)    what the Trainer reads, one batch at a time

The builder draws exactly the batches the Trainer will: it builds the run's own data (its
task's ``build_data``; a causal LM's windows from (seed, epoch, index), its token file made
outside the run's folder; images: same sampler order, same crops and flips per (seed, epoch, index), the same
rank's slice under torchrun), mixes each batch as the trainer does where ``data.mixup`` is on
(``RuntimeConfig.mix``: the same draw from seed, epoch and position), and runs the teacher as
the distiller does (its own input normalisation, its block segments, each micro-batch alone,
under the run's autocast and memory format), so a full cache holds the live teacher's logits
bit for bit. Epochs whose training stage needs the teacher live
(decomposed StableKD stages, feature losses, TPP) are not written: no stage would read them.

One shard per (epoch, rank), streamed to a temporary name, its SHA-256 taken from the rows as
they are written (no second read), the checksum written beside it, then the shard renamed
whole: a killed build resumes at the first missing shard. A build holds ``CACHE/.lock-r{rank}``
(``fcntl.flock``: the kernel drops it with a killed build, whose pid left there is reported as
taken over); a second build into the same folder is refused. The header is written first as
incomplete (it names the key, so a resumed build or another run's build is told apart) and
last, atomically, complete with every shard's checksum. Under torchrun (``torchrun -m kdgraph cache ...``)
each rank writes its own shards and rank 0 the header; training must use as many ranks.
Replay is ``kdgraph.runtime.replay``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdgraph.errors import KDGraphError
from kdgraph.lm.token_losses import topk_kl
from kdgraph.runtime.builder import CACHE, TRAIN, build_run, plan_records
from kdgraph.runtime.config import resolve_config
from kdgraph.runtime.replay import teacher_weights_sha256, train_data_sha256
from kdgraph.runtime.distiller import frozen_teacher
from kdgraph.runtime.teacher import FrozenTeacher
from kdgraph.runtime.techniques import (autocast, channels_last_tensor, init_distributed, resolve_device,
                                        shard_teacher)
from kdgraph.schedules import stage_at
from kdgraph.tasks.create import create_task
from kdgraph.teacher_cache import (
    DEFAULT_TOP_K,
    HEADER,
    MAX_CACHE_EPOCHS,
    MAX_CLASSES_TOPK,
    cache_key,
    checksum_path,
    differences,
    read_header,
    shard_path,
    token_width,
    topk_dtype,
    write_header,
)

__all__ = ["BuildLock", "CacheSummary", "build_cache"]


@dataclass(frozen=True)
class CacheSummary:
    root: str
    mode: str
    k: int | None
    epochs: list[int]  # epochs written or found (0-based)
    built: list[int]  # epochs this call wrote
    rows_per_epoch: int  # this rank's
    bytes_per_image: float  # per epoch; a causal LM's: per token position
    seconds: float  # spent computing (this call)
    teacher_forward_s: float  # of which in the teacher's forward
    notes: tuple[str, ...] = ()  # what the user should know (a stale lock taken over)
    per: str = "image"  # what bytes_per_image counts: an image (a view), or a token of a causal LM's windows
    topk_kl: float | None = None  # top-k: mean KL(p || p~) over the positions this call wrote, nats

    def __str__(self) -> str:
        kind = "full fp32 logits" if self.mode == "full" else f"top-{self.k} fp16 probabilities"
        views = "windows" if self.per == "token" else "views"
        kl = "" if self.topk_kl is None else (f"; top-{self.k} replay's mean KL to the full distribution "
                                              f"{self.topk_kl:.4g} nats per {self.per} (built now)")
        return "".join(f"note: {n}\n" for n in self.notes) + (
            f"teacher cache {self.root}: {kind}, epochs {_ranges(self.epochs)} ({len(self.built)} built now, "
            f"{self.seconds:.1f} s), {self.rows_per_epoch} {views} per epoch, "
            f"{self.bytes_per_image:.6g} bytes per {self.per} per epoch{kl}")


def _ranges(epochs: list[int]) -> str:
    return ", ".join(str(e + 1) for e in epochs) or "none"


def _rows(loader) -> int:
    """Training positions of one epoch on this rank (the batches' lengths summed)."""
    return min(loader.samples_per_rank, len(loader) * loader.batch_size)


def _logits_shape(compiled, width: int | None) -> tuple[int, ...]:
    """The teacher's logits per row: [C] (or [C, H, W]), a causal LM's (T, V) cut to the
    student's ``width`` (``token_width``). A teacher narrower than the student is refused."""
    if width is None:
        return tuple(compiled.teacher.logits_shape or ())
    seq, vocab = compiled.teacher.output_shape[1:]
    if vocab < width:
        raise KDGraphError(f"the teacher's logits have {vocab} ids, the student's {width}: the teacher gives no "
                           "target for the rest")
    return int(seq), width


def _checked_mode(compiled, shape: tuple[int, ...], full: bool, top_k: int) -> tuple[str, int | None]:
    if full:
        return "full", None
    if compiled.task != "causal_lm" and (compiled.teacher.per_pixel or compiled.teacher.num_classes is None):
        raise KDGraphError("a top-k cache holds class probabilities of (C,) logits or a causal LM's (T, V) ones; "
                           "this teacher's output is neither: build it with --full")
    if not 1 <= top_k <= MAX_CLASSES_TOPK:
        raise KDGraphError(f"--top-k must be in 1..{MAX_CLASSES_TOPK}, got {top_k}")
    return "topk", min(top_k, shape[-1])


_OURS = re.compile(r"^(e\d{4,}-r\d+\.npy(\.tmp|\.sha256|\.sha256\.tmp)?|header\.json(\.tmp)?|\.lock-r\d+)$")


def _check_folder(root: Path) -> None:
    """A cache folder is kdgraph's alone: a file there, or a folder holding someone else's
    files and no cache header, is refused before anything is written."""
    if root.exists() and not root.is_dir():
        raise KDGraphError(f"teacher.cache: {root} is a file; name a folder for the cache")
    if (root / HEADER).exists():
        read_header(root)  # a damaged or foreign header is refused before the lock is made there
    elif root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if not _OURS.match(p.name))
        if foreign:
            raise KDGraphError(f"teacher.cache: {root} holds files that are not a teacher cache's "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); name an empty "
                               "or new folder")


class BuildLock:
    """``root/.lock-r{rank}``, held with ``flock`` for the build: a second build of the same
    rank into the folder is refused naming the holder; the kernel releases the lock of a killed
    build, and the pid it left in the file is reported as taken over. Never deleted (deleting a
    lock file races with a build opening it); emptied on release."""

    def __init__(self, root: Path, rank: int):
        self.path = root / f".lock-r{rank}"
        self.note: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise KDGraphError(f"{self.path.parent}: another `kdgraph cache` ({holder}) is building into this "
                                   "folder; wait for it to finish or choose another teacher.cache") from None
            raise KDGraphError(f"{self.path}: cannot lock it ({exc.strerror})") from None
        left = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if left:  # its writer died holding it: the kernel released the flock
            self.note = f"took over the lock {self.path} left by a build that is no longer running ({left})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None


def _epochs_to_build(root: Path, key: dict, epochs: int, plan) -> tuple[int, list[int], dict | None]:
    """(epochs the cache covers, those written: the stages that read the cache, the header
    found). A folder built for another run is refused; one built for more epochs keeps them."""
    old = None
    if (root / HEADER).exists():
        old = read_header(root)
        diff = differences(old["key"], key)
        if diff:
            raise KDGraphError(f"{root} holds a cache built for another run (differs: {'; '.join(diff)}); "
                               "choose another teacher.cache or delete it")
        epochs = max(epochs, int(old["epochs"]))
    # Stages that need the teacher live never read the cache: their epochs are not written.
    stage_epochs = [st.epochs for st in plan.stages]
    return epochs, [e for e in range(epochs)
                    if e >= plan.epochs or plan.stages[stage_at(stage_epochs, e)].program.replayable], old


def build_cache(spec, epochs: int, *, full: bool = False, top_k: int = DEFAULT_TOP_K,
                quiet: bool = False) -> CacheSummary:
    """Write the teacher's outputs for the first ``epochs`` epochs of ``spec``'s run into
    ``spec.teacher.cache``: float32 logits with ``full``, else the ``top_k`` largest
    probabilities at the spec's loss temperature (fp16) and their indices. Resumes a stopped
    build; refuses a folder built for another run (one line naming what differs), one another
    build is writing, and one holding someone else's files. The run is compiled as ``CACHE``
    needs it: the teacher live (the cache may not exist yet), seeded as the Trainer seeds it
    (an untrained teacher's weights are the run's)."""
    trained = plan_records(spec, TRAIN)  # the training run that will replay the cache built here
    named = trained.teacher
    if named is None or named.cache is None:
        raise KDGraphError("kdgraph cache writes to teacher.cache: set it in the spec (or --set teacher.cache=DIR)")
    if not 1 <= epochs <= MAX_CACHE_EPOCHS:
        raise KDGraphError(f"--epochs must be in 1..{MAX_CACHE_EPOCHS} (a cache covers a run's epochs), got {epochs}")
    root = Path(named.cache)
    _check_folder(root)
    info = init_distributed()
    device = resolve_device(trained.runtime.device, info)
    compiled = build_run(spec, CACHE)
    width = token_width(compiled.run, compiled.student)
    mode, top_k = _checked_mode(compiled, _logits_shape(compiled, width), full, top_k)
    key = cache_key(compiled.run, mode, top_k, info.world_size, compiled.data, compiled.teacher, width)
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with BuildLock(root, info.rank) as lock:
            summary = _build(root, compiled, key, epochs, (mode, top_k), info, device, quiet)
        return CacheSummary(**{**summary.__dict__, "notes": (lock.note,) if lock.note else ()})
    except OSError as exc:  # a full disk, a read-only folder: the shards written so far are kept
        raise KDGraphError(f"{root}: cannot write the teacher cache ({exc.strerror or exc}"
                           f"{': ' + exc.filename if exc.filename else ''}); free space or fix the folder and run "
                           "the same command again: it resumes") from None
    finally:
        if created:
            _remove_if_unused(root, info.rank)


def _remove_if_unused(root: Path, rank: int) -> None:
    """A folder this build created and left holding nothing but its empty lock: removed (a
    refused build leaves no empty cache folder behind)."""
    lock = root / f".lock-r{rank}"
    with contextlib.suppress(OSError):
        if [p.name for p in root.iterdir()] == [lock.name] and lock.stat().st_size == 0:
            lock.unlink()
            root.rmdir()


def _build(root: Path, compiled, key: dict, epochs: int, mode_k: tuple[str, int | None], info, device,
           quiet: bool) -> CacheSummary:
    """The build, under the folder's lock: the header first (incomplete), every missing shard,
    then the header again, complete with every shard's checksum."""
    run = compiled.run
    epochs, wanted, old = _epochs_to_build(root, key, epochs, compiled.plan)
    weights = teacher_weights_sha256(compiled.teacher.model)  # as built, before teacher.dtype casts them
    if old is not None and old["teacher_weights_sha256"] != weights:
        raise KDGraphError(f"{root} holds a cache built from other teacher weights (SHA-256 "
                           f"{old['teacher_weights_sha256']} then, {weights} now); choose another teacher.cache")
    task = create_task(run, compiled)
    task.writes_output = False  # the run's folder is the run's: a text's token file is made elsewhere
    data = task.build_data(run, compiled.data, device, info)
    data_sha256 = train_data_sha256(data.train)
    if old is not None and old.get("train_data_sha256") not in (None, data_sha256):
        raise KDGraphError(f"{root} holds a cache built from other training data (the decoded training split's "
                           f"SHA-256 {old['train_data_sha256']} then, {data_sha256} now); choose another teacher.cache")
    shard = _writer(compiled, resolve_config(run, device, compiled.student.model), mode_k, run.loss.temperature,
                    data, info, device, token_width(run, compiled.student))
    header = {"key": key, "epochs": epochs, "stored_epochs": wanted, "complete": False,
              "logits_shape": list(shard.shape), "rows_per_epoch": shard.rows,
              "batch_size": data.train.batch_size, "bytes_per_row": shard.row_bytes,
              "teacher_weights_sha256": weights, "train_data_sha256": data_sha256}
    if info.is_main:
        write_header(root, header)
    todo = [e for e in wanted if not shard.is_whole(shard_path(root, e, info.rank))]
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
    if info.is_main:  # written last: complete, with the checksum of every shard of every rank
        write_header(root, {**header, "complete": True,
                            "shards": _checksums(root, wanted, info.world_size, shard)})
    return CacheSummary(str(root), mode_k[0], mode_k[1], wanted, todo, shard.rows, shard.row_bytes / shard.positions,
                        time.perf_counter() - t0, shard.forward_s, per="token" if shard.tokens else "image",
                        topk_kl=shard.kl[0] / shard.kl[1] if shard.kl[1] else None)


def _writer(compiled, config, mode_k, temperature: float, data, info, device, width: int | None) -> _ShardWriter:
    """The teacher as the distiller runs it (its dtype, device, memory format, shards), in a writer."""
    teacher = frozen_teacher(compiled)
    teacher.apply_(lambda t: t.to(device))
    if config.channels_last:
        teacher.apply_(channels_last_tensor)
    if compiled.plan.teacher_shard:  # every rank runs as many batches: the gathers pair up
        shard_teacher(teacher, info, device)
    return _ShardWriter(teacher, compiled.plan.k, config, mode_k[0], mode_k[1], temperature,
                        _logits_shape(compiled, width), _rows(data.train),
                        (info.rank, info.world_size, compiled.num_classes or data.num_classes), tokens=width is not None)


def _checksums(root: Path, epochs: list[int], world_size: int, shard: _ShardWriter) -> dict[str, str]:
    """Every shard's checksum, from the file its writer left beside it."""
    out = {}
    for e in epochs:
        for r in range(world_size):
            path = shard_path(root, e, r)
            if not shard.is_whole(path):
                raise KDGraphError(f"{path}: missing or not whole after the build (rank {r}); run the same "
                                   "command again")
            out[path.name] = checksum_path(path).read_text().strip()
    return out


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TOPK_CHUNK = 2048  # positions whose top k are taken at once (a few float32 copies of their logits)


class _ShardWriter:
    """Writes one epoch's shard: the teacher run as the distiller runs it, on every batch."""

    def __init__(self, teacher: FrozenTeacher, head: int, config, mode: str, top_k: int | None,
                 temperature: float, shape: tuple[int, ...], rows: int, where: tuple[int, int, int | None],
                 tokens: bool = False):
        self.teacher, self.head, self.config = teacher, head, config
        self.rank, self.world_size, self.num_classes = where  # for the mix's batch positions
        self.mode, self.top_k, self.temperature = mode, top_k, temperature
        self.shape, self.rows, self.tokens = shape, rows, tokens
        per_row = shape if mode == "full" else shape[:-1]  # top-k: one record per position
        self.dtype = np.dtype("<f4") if mode == "full" else topk_dtype(top_k, shape[-1])
        self.array_shape = (rows, *per_row)
        self.row_bytes = self.dtype.itemsize * int(np.prod(per_row))
        self.positions = int(np.prod(shape[:-1])) if tokens else 1  # a causal LM's row: a window of T tokens
        self.kl = [0.0, 0]  # top-k: KL(p || p~) summed over the positions written, and their count
        self.forward_s = 0.0

    def is_whole(self, path: Path) -> bool:
        """Renamed in place with its checksum beside it, and of the size its rows take (a shard
        damaged since is told by its checksum at replay)."""
        try:
            sha = checksum_path(path).read_text().strip()
            return bool(_HEX64.match(sha)) and path.stat().st_size >= self.rows * self.row_bytes
        except OSError:
            return False

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

    def rows_of(self, logits: torch.Tensor, where: str) -> np.ndarray:
        """One batch's rows: float32 logits, or the top-k probabilities at T and their indices
        (per position: per token of a causal LM's windows, whose logits are cut to the student's
        ids first), ``TOPK_CHUNK`` positions at a time, the reconstruction's KL to the full
        distribution summed on the way. A teacher whose output is not finite is refused here,
        not replayed as NaN losses."""
        if not bool(torch.isfinite(logits).all()):
            raise KDGraphError(f"the teacher's output is not finite at {where}: its weights or its dtype "
                               "(teacher.dtype) overflow; nothing cached from it")
        logits = logits[..., :self.shape[-1]] if self.tokens else logits
        if self.mode == "full":
            return np.ascontiguousarray(logits.cpu().numpy(), dtype=self.dtype)
        flat = logits.reshape(-1, logits.shape[-1])
        out = np.empty(len(flat), dtype=self.dtype)
        for at in range(0, len(flat), TOPK_CHUNK):
            kl, p, i = topk_kl(flat[at:at + TOPK_CHUNK], self.top_k, self.temperature)
            self.kl[0] += float(kl.double().sum())
            self.kl[1] += len(kl)
            out["p"][at:at + len(p)], out["i"][at:at + len(p)] = p.cpu().numpy(), i.cpu().numpy()
        return out.reshape(logits.shape[:-1])

    def write(self, final: Path, epoch: int, batches, advance) -> None:
        """Every batch of ``batches`` (``epoch``'s) into ``final``: streamed to a temporary
        name, hashed as written, the checksum beside it, then renamed whole. Each batch mixed
        first where the run mixes (``RuntimeConfig.mix``), as the trainer mixes the batch its
        teacher reads."""
        tmp, h, at = final.with_name(final.name + ".tmp"), hashlib.sha256(), 0
        sha = checksum_path(final)
        sha_tmp = sha.with_name(sha.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": self.array_shape})
                for step, (xb, yb) in enumerate(batches):
                    xb, _ = self.config.mix(xb, yb, epoch, step * self.world_size + self.rank, self.num_classes)
                    f0 = time.perf_counter()
                    logits = self.logits(xb)
                    self.forward_s += time.perf_counter() - f0
                    rows = self.rows_of(logits, f"epoch {epoch + 1}, batch {step}").tobytes()
                    f.write(rows)
                    h.update(rows)
                    at += len(logits)
                    advance()
            if at != self.rows:
                raise KDGraphError(f"{final.name}: the epoch gave {at} training views, expected {self.rows}")
            sha_tmp.write_text(h.hexdigest() + "\n")
            os.replace(sha_tmp, sha)
        except BaseException:
            tmp.unlink(missing_ok=True)  # ours; a full disk gets its space back
            sha_tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)  # the shard is whole, or absent
