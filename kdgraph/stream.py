"""The streaming path: an image folder's files decoded and transformed by DataLoader workers
(StreamLoader), for folders too large to hold in memory (``kdgraph.data`` holds the others,
and builds a run's data from the path the compiler's data plan chose).

    stream_loaders(spec, plan, folder, keep, ...)   the train, test (and validation) loaders

An image folder whose decoded splits (uint8 at input_size) exceed
``data.memory_budget_mb`` is streamed (``data.loader`` forces either way): workers
decode the files of a batch and transform them (training: timm's random-resized crop and
flip, for the whole batch at once, kdgraph.transforms; evaluation: timm's resize to
input_size / crop_pct and centre crop), and send uint8 batches that the training process
copies to its device a batch ahead (``prefetched``: a side stream on CUDA) and normalises
there in one op, in the step's layout (``Normalizer``).

The streamed batches are as reproducible as the in-memory ones. The main process draws
the epoch's order from (seed, epoch), like DeviceLoader, and shards it by stride like
DistributedSampler; each sample's crop and flip are drawn from a hash of (seed, epoch,
index). So a batch is a function of the position alone, not of the worker count
or their scheduling, and a resumed run starts its sampler at the saved (epoch, step)
without decoding the samples before it. Nothing random is carried between batches:
the checkpoint's ``data`` entry (position, seed, sample count) is all a resume needs,
and lets it refuse a folder that changed since.
"""

from __future__ import annotations

import functools
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdgraph.errors import DataError, SpecError
from kdgraph.imagefolder import BadImage, ImageFolder, bad_image, read_image
from kdgraph.registry import AUGMENTATIONS
from kdgraph.transforms import RandomResizedCropFlip, sample_seeds

if TYPE_CHECKING:
    from kdgraph.ir import DataPlan
    from kdgraph.spec.schema import Spec

__all__ = ["EpochSampler", "Normalizer", "StreamDataset", "StreamLoader", "available_cpus", "eval_transform",
           "prefetched", "resolve_workers", "stream_loaders", "train_transform"]

STATS_SAMPLES = 512  # training images the streaming path estimates mean/std from, when it must


# ------------------------------------------------------------------------- transforms


def train_transform(input_size: tuple[int, int, int], augment: str, crop_pct: float,
                    crop_scale: tuple[float, float]):
    """The training augmentation, to uint8: timm's random-resized crop (area ``crop_scale``)
    and horizontal flip (crop+flip), drawn per sample from (seed, epoch, index) a batch at a
    time (kdgraph.transforms); no colour jitter. ``augment`` none: the evaluation transform."""
    augmentation = AUGMENTATIONS.get(augment)
    if not augmentation.crop:
        return eval_transform(input_size, (0.0,) * input_size[0], (1.0,) * input_size[0], crop_pct, normalize=False)
    return RandomResizedCropFlip(input_size[1:], tuple(crop_scale), flip=augmentation.flip)


def eval_transform(input_size: tuple[int, int, int], mean, std, crop_pct: float, *, normalize: bool = True):
    """timm's evaluation transform: resize the shorter side to side / crop_pct (bilinear),
    centre-crop input_size, normalise (``normalize=False``: uint8, normalised a batch at a
    time by ``Normalizer``, as timm's prefetcher does)."""
    from timm.data import create_transform

    return create_transform(input_size, is_training=False, crop_pct=crop_pct, interpolation="bilinear",
                            mean=tuple(mean), std=tuple(std), use_prefetcher=not normalize)


class Normalizer:
    """uint8 image batches to normalised float32 on their device, in one op: ``x * scale + shift``
    (``addcmul``; on CUDA one kernel that reads the uint8 input as float, on the CPU after a float
    copy of the batch) with ``scale = 1 / (255 std)`` and ``shift = -mean / std`` computed in
    float64, stored float32. That is
    torchvision's ToTensor and Normalize, ``(x / 255 - mean) / std``, to float32 rounding (two
    roundings instead of three, a few ulps apart), in one pass over the batch instead of four.
    The output is allocated in the step's layout (``channels_last``, else plain NCHW strides) and
    written by that kernel: no float copy, no separate layout copy. Workers decode and augment
    only, and send a quarter of the bytes."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
        self.scale, self.shift = as_tensor(1.0 / (255.0 * std)), as_tensor(-mean / std)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale, out=out)


_END = object()  # prefetched's marker of an empty iterator


def prefetched(batches: Iterator[Any], load: Callable[[Any], Any], device: torch.device) -> Iterator[Any]:
    """``load(batch)`` for every batch, one batch ahead of the consumer.

    On CUDA the next batch's ``load`` (its copy to the device, non-blocking from pinned memory,
    and its normalisation) is queued on a side stream while the step runs on the current one.
    Before a batch is handed over, the main stream waits for the side stream (``wait_stream``)
    and its tensors are marked as used by the main stream (``record_stream``): without that, the
    caching allocator could give their memory to the side stream's next batch while the step
    still reads them. Elsewhere the very same loop runs without streams, and the batches are
    identical to ``map(load, batches)``."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def ahead(batch):
        if side is None:
            return load(batch)
        with torch.cuda.stream(side):
            return load(batch)

    def handover(loaded):
        if side is not None:
            main = torch.cuda.current_stream(device)
            main.wait_stream(side)
            for t in loaded:
                t.record_stream(main)
        return loaded

    it = iter(batches)
    first = next(it, _END)
    if first is _END:
        return
    pending = ahead(first)
    for batch in it:
        ready = handover(pending)
        pending = ahead(batch)  # queued before the step on ``ready``: the two overlap
        yield ready
    yield handover(pending)


# ----------------------------------------------------------------------- streaming


Batch = tuple[torch.Tensor, torch.Tensor, tuple[tuple[str, str], ...]]


class StreamDataset(torch.utils.data.Dataset):
    """Files decoded and transformed on demand, a batch per call (``__getitems__``, which a
    DataLoader's fetcher calls with a batch's keys). Keys are (index, epoch). A training
    transform (RandomResizedCropFlip) draws each sample's crop from (seed, epoch, index), so
    a sample is the same in any worker and any batch; an evaluation transform (timm's, to
    uint8) is applied per image. Files that cannot be decoded are left out of the batch and
    listed as (path, reason)."""

    def __init__(self, files: np.ndarray, labels: np.ndarray, num_classes: int, channels: int, transform,
                 *, seed: int):
        if len(files) != len(labels) or not len(files):
            raise DataError(f"StreamDataset needs as many labels as files, at least one: {len(files)} / {len(labels)}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
        self.files = files  # numpy str array: workers read it without touching refcounts
        self.labels = labels
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Batch:
        """(uint8 images, labels, unreadable (path, reason) pairs) of the samples ``keys``."""
        images, indices, epochs, bad = [], [], [], []
        for index, epoch in keys:
            path = str(self.files[index])
            try:
                images.append(read_image(path, self.mode))
            except BadImage as exc:
                bad.append((path, str(exc)))
                continue
            indices.append(index)
            epochs.append(epoch)
        if not images:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), tuple(bad)
        indices = np.array(indices, dtype=np.int64)
        if isinstance(self.transform, RandomResizedCropFlip):
            x = self.transform(images, sample_seeds(self.seed, np.array(epochs), indices))
        else:
            x = torch.stack([self.transform(im) for im in images])
        return x, torch.from_numpy(self.labels[indices]), tuple(bad)

    def __getitem__(self, key: tuple[int, int]):
        """One sample: (image, label), or (None, (path, reason)) for an unreadable file."""
        x, y, bad = self.__getitems__([key])
        return (None, bad[0]) if bad else (x[0], int(y[0]))


def _as_is(batch: Batch) -> Batch:
    """The DataLoader's collate_fn: StreamDataset.__getitems__ returns whole batches."""
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys for one rank, from a position on.

    The epoch's order is DeviceLoader's: a permutation drawn from (seed, epoch) (or 0..n-1
    without ``shuffle``), padded by wrapping around (or truncated with ``drop_last``) to a
    multiple of ``world_size``, and rank r takes every world_size-th position from r, as
    DistributedSampler does. ``set_position(epoch, step)`` is called before each pass
    (persistent workers re-iterate the same sampler); iteration starts at ``step`` without
    touching earlier samples.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.total = (n // world_size if drop_last else -(-n // world_size)) * world_size
        self.samples_per_rank = self.total // world_size
        if self.samples_per_rank == 0:
            raise DataError(f"{n} samples cannot be split over {world_size} ranks")
        spr = self.samples_per_rank
        self.num_batches = spr // batch_size if drop_last else -(-spr // batch_size)
        if self.num_batches == 0:
            raise DataError(f"data.batch_size: {batch_size} is larger than the {spr} samples per rank and "
                            "drop_last is on")
        self.epoch, self.step = 0, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        if not 0 <= step <= self.num_batches:
            raise DataError(f"step {step} is outside an epoch of {self.num_batches} batches")
        self.epoch, self.step = epoch, step

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for the whole epoch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        order = order.repeat(-(-self.total // self.n))[: self.total]
        return order[self.rank : self.total : self.world_size]

    def __len__(self) -> int:
        return self.num_batches - self.step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, bs = self.epoch, self.batch_size
        order = self.order(epoch).tolist()
        for step in range(self.step, self.num_batches):
            yield [(i, epoch) for i in order[step * bs : min((step + 1) * bs, self.samples_per_rank)]]


def _worker_init(_worker_id: int, low_priority: bool = False) -> None:
    # Ctrl-C reaches the whole process group: a worker that died of it would turn the training
    # process's clean stop (checkpoint, resume hint) into "worker exited unexpectedly". The
    # training process stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if low_priority:
        try:  # Linux: run only on a core nothing else wants
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.nice(10)


MAX_AUTO_WORKERS = 8
WORKERS_PER_CPU = 2  # the most runtime.num_workers may ask for per available CPU (or MAX_AUTO_WORKERS)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(num_workers: int | str, device: torch.device) -> int:
    """``runtime.num_workers``; auto: 2 on the CPU (the workers share the training's cores, at
    idle priority), else the CPUs of this rank (the node's over LOCAL_WORLD_SIZE) less one for
    the training process, at least 1 and at most MAX_AUTO_WORKERS (timm's default is 4, the
    torchvision reference scripts' 16)."""
    if num_workers != "auto":
        limit = max(MAX_AUTO_WORKERS, WORKERS_PER_CPU * available_cpus())
        if int(num_workers) > limit:
            raise SpecError("runtime.num_workers", f"{num_workers} worker processes for the {available_cpus()} CPUs "
                            "this process may use: each is a process of its own, with its own memory, and more than "
                            f"a few per CPU only wait for one; allowed: 0 to {limit}, or auto")
        return int(num_workers)
    if device.type == "cpu":
        return 2
    ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min(MAX_AUTO_WORKERS, available_cpus() // ranks_here - 1))


@dataclass(frozen=True)
class WorkerOptions:
    num_workers: int = 2
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # Training on the CPU, workers and the training threads share the cores; workers decode
    # faster than a CPU step consumes (bench/data_throughput.py), so they run at idle priority
    # and fill the prefetch queue from what the step leaves.
    low_priority: bool = False


class StreamLoader:
    """DeviceLoader's interface (``len``, ``epoch(e, start_step)``, ``state_dict``) over a
    StreamDataset: an EpochSampler feeds a torch DataLoader whose workers decode and
    transform; batches are moved to ``device`` as they arrive. Unreadable files are
    skipped with one warning each (``bad`` maps path -> reason) or refused (``on_bad_image``)."""

    def __init__(self, dataset: StreamDataset, batch_size: int, *, shuffle: bool, seed: int,
                 device: torch.device | str = "cpu", drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 workers: WorkerOptions = WorkerOptions(), on_bad_image: str = "skip",
                 normalizer: Normalizer | None = None, prefetch: bool = True):
        self.dataset = dataset
        self.normalizer = normalizer  # for a dataset whose transform gives uint8 (normalize=False)
        self.prefetch = prefetch  # the next batch copied and normalised ahead (``prefetched``)
        self.device = torch.device(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.world_size = world_size
        self.on_bad_image = on_bad_image
        self.sampler = EpochSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                    rank=rank, world_size=world_size)
        self.samples_per_rank = self.sampler.samples_per_rank
        self.num_workers = n = workers.num_workers
        # generator: each pass draws a worker base seed from it, which would otherwise come from
        # the global RNG and shift dropout draws after a resume (the samples' draws do not use it)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, collate_fn=_as_is, num_workers=n,
            pin_memory=workers.pin_memory, persistent_workers=workers.persistent_workers and n > 0,
            prefetch_factor=workers.prefetch_factor if n > 0 else None,
            worker_init_fn=functools.partial(_worker_init, low_priority=workers.low_priority) if n > 0 else None,
            generator=torch.Generator().manual_seed(seed))
        self.bad: dict[str, str] = {}

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_position(epoch, start_step)
        if self.prefetch:
            yield from prefetched(self._host_batches(), self._to_device, self.device)
        else:
            yield from map(self._to_device, self._host_batches())

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The workers' batches (pinned where ``pin_memory``), unreadable files handled."""
        for xb, yb, bad in self._loader:
            for path, reason in bad:
                if path not in self.bad:
                    bad_image(path, reason, self.on_bad_image)
                    self.bad[path] = reason
            if not len(yb):
                raise DataError(f"no image of a batch could be read ({', '.join(p for p, _ in bad)}); "
                                "is data.root readable?")
            yield xb, yb

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xb, yb = (t.to(self.device, non_blocking=True) for t in batch)
        return (self.normalizer(xb) if self.normalizer is not None else xb), yb

    def state_dict(self, epoch: int, step: int) -> dict[str, Any]:
        """The position and what fixes the batches there: (seed, epoch, index) draw everything."""
        return {"loader": "stream", "epoch": epoch, "step": step, "seed": self.seed, "num_samples": len(self.dataset),
                "batch_size": self.batch_size, "world_size": self.world_size}


# ---------------------------------------------------------------------------- build


def stream_loaders(spec: Spec, plan: DataPlan, folder: ImageFolder, keep: np.ndarray | None, num_workers: int,
                   device: torch.device, dist_info: Any, channels_last: bool = False,
                   val: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[StreamLoader, StreamLoader, StreamLoader | None, tuple[float, ...],
                              tuple[float, ...], str]:
    """The streamed train loader (the training files ``keep`` selects, all without it;
    sharded over ranks), test loader (the whole split) and validation loader (``val``'s
    (files, labels), read as the test split is; None without ``val``) of ``folder``,
    with the mean, std (0..1 units) and where they came from. ``num_workers``: see
    ``resolve_workers``; ``channels_last``: the layout of the normalised batches (Normalizer)."""
    d = spec.data
    c = plan.input_size[0]
    mean, std, stats = plan.mean, plan.std, plan.stats
    if mean is None:
        mean, std, stats = _estimate_stats(folder, plan, d.on_bad_image)
    augment = d.augment if d.augment != "auto" else "crop+flip"
    files, labels = folder.train_files, folder.train_labels
    if keep is not None:
        files, labels = files[keep], labels[keep]
    rt = spec.runtime
    pin = device.type == "cuda" if rt.pin_memory == "auto" else rt.pin_memory
    workers = WorkerOptions(num_workers, pin, rt.persistent_workers, rt.prefetch_factor,
                            low_priority=device.type == "cpu")
    n_classes = len(folder.classes)
    train_ds = StreamDataset(files, labels, n_classes, c,
                             train_transform(plan.input_size, augment, plan.crop_pct, d.crop_scale), seed=spec.seed)
    test_ds = StreamDataset(folder.test_files, folder.test_labels, n_classes, c,
                            eval_transform(plan.input_size, mean, std, plan.crop_pct, normalize=False), seed=spec.seed)
    val_ds = None if val is None else StreamDataset(
        val[0], val[1], n_classes, c,
        eval_transform(plan.input_size, mean, std, plan.crop_pct, normalize=False), seed=spec.seed)
    normalizer = Normalizer(mean, std, device, channels_last)
    per_rank = len(files) // dist_info.world_size
    train = StreamLoader(train_ds, d.batch_size, shuffle=True, seed=spec.seed, device=device,
                         drop_last=per_rank >= d.batch_size, rank=dist_info.rank,
                         world_size=dist_info.world_size, workers=workers, on_bad_image=d.on_bad_image,
                         normalizer=normalizer)
    test, val = (None if ds is None else
                 StreamLoader(ds, d.test_batch_size or d.batch_size, shuffle=False, seed=spec.seed, device=device,
                              workers=workers, on_bad_image=d.on_bad_image, normalizer=normalizer)
                 for ds in (test_ds, val_ds))
    return train, test, val, tuple(mean), tuple(std), stats


def _estimate_stats(folder: ImageFolder, plan: DataPlan, on_bad_image: str):
    """Per-channel mean/std (0..1 units) of up to STATS_SAMPLES evenly spaced training images,
    after the evaluation resize and crop: the streaming path never decodes the whole split."""
    c = plan.input_size[0]
    to_tensor = eval_transform(plan.input_size, (0.0,) * c, (1.0,) * c, plan.crop_pct)
    n = len(folder.train_files)
    picks = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLES)).round().astype(int))
    xs = []
    for i in picks.tolist():
        try:
            xs.append(to_tensor(read_image(str(folder.train_files[i]), "L" if c == 1 else "RGB")))
        except BadImage as exc:
            with warnings.catch_warnings():  # the training pass warns about it once, and counts it
                warnings.simplefilter("ignore")
                bad_image(str(folder.train_files[i]), str(exc), on_bad_image)
    if not xs:
        raise DataError(f"data.root: none of {len(picks)} training images under {folder.root} could be read")
    x = torch.stack(xs)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return (tuple(mean.tolist()), tuple(std.tolist()),
            f"the training split's statistics ({len(xs)} of {n:,} images)")
