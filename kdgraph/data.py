"""A run's data: datasets held in memory with a loader that keeps them on the device, or an
image folder streamed (``kdgraph.stream``), as the compiler's data plan chose.

    build_data(spec, plan, device, dist_info) -> Data   the train and test loaders

kdgraph's datasets are small (digits, Fashion-MNIST, CIFAR-size, image folders of a
few thousand files), so a whole split is one tensor: ``create_dataset`` loads it once and
converts it to the spec's ``input_size``, keeping integer pixels as integers (uint8: a
quarter of float32's bytes); ``DeviceLoader`` moves it to the device once and cuts batches
there, with batched on-device augmentation, normalising each batch after its crop and flip
(the very operations of normalising the whole split first, so the same numbers). Every
random choice (subset, order, crops, flips) is a pure function of the run seed and the
epoch, so a resumed run sees exactly the batches an uninterrupted run would. An image
folder too large for memory is streamed instead (the compiler's data pass decides, from
``data.memory_budget_mb`` and ``data.loader``).

Datasets are built by name from the ``DATASETS`` registry (``kdgraph.registry``; the
built-in ones are registered here); a name with a colon (``torchvision:CIFAR10``) is
looked up by its prefix and the loader reads the rest.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kdgraph.errors import DataError
from kdgraph.imagefolder import BadImage, bad_image, check_classes_readable, read_image, scan_imagefolder
from kdgraph.registry import AUGMENTATIONS, DATASETS, dataset_choices, register_dataset
from kdgraph.spec.schema import DataSpec
from kdgraph.stream import StreamLoader, resolve_workers, stream_loaders

if TYPE_CHECKING:
    from kdgraph.ir import DataPlan
    from kdgraph.spec.schema import Spec

__all__ = [
    "DATASETS",
    "Data",
    "Dataset",
    "DeviceLoader",
    "RawSplits",
    "build_data",
    "build_loaders",
    "channel_stats",
    "class_balanced_subset",
    "validation_split",
    "create_dataset",
    "normalize",
    "register_dataset",
]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HELP = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist` "
    f"(files land in {FASHION_MNIST_ROOT}), or set data.root to a folder holding "
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
    "and t10k-labels-idx1-ubyte[.gz]"
)
# torchvision datasets of grey digits/clothes: a horizontal flip changes their meaning.
_NO_FLIP_TORCHVISION = {"MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST", "USPS"}


class RawSplits(NamedTuple):
    """What a dataset loader returns: both splits at the dataset's own size, any value
    scale (normalisation comes later), images N x C x H x W, labels int64. Images whose
    source is integer pixels stay integers (uint8 where they fit): ``create_dataset`` keeps
    them so; float images (synthetic) stay float."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    default_augment: str
    pixel_max: float = 255.0  # the raw value of a white pixel (digits: 16)
    skipped: tuple[str, ...] = ()  # files that could not be decoded (data.on_bad_image: skip)
    val_x: torch.Tensor | None = None  # a validation split of the dataset's own (an image folder's val/)
    val_y: torch.Tensor | None = None


LoaderFn = Callable[[DataSpec, int], RawSplits]
"""``fn(data_spec, seed) -> RawSplits``."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits in memory (CPU), converted to ``input_size`` (C, H, W), in raw values:
    the smallest exact integer type for integer pixels (uint8 for 0..255 and digits' 0..16),
    float32 otherwise (float sources, or pixels resampled to another size). ``mean``/``std``
    (raw value scale) normalise them per channel, a batch at a time (``normalize``): the
    full training split's statistics (before ``fraction``, so every run of a dataset
    normalises its test split the same way), or the ones given."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_size: tuple[int, int, int]
    default_augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_max: float = 255.0
    skipped: tuple[str, ...] = ()
    val_x: torch.Tensor | None = None  # the validation split held out of train (data.val_fraction), or None
    val_y: torch.Tensor | None = None

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images of this dataset (any N x C x H x W part of a split) as the model sees them."""
        return normalize(x, *(torch.tensor(v, dtype=torch.float32, device=x.device) for v in self.norm))

    def __str__(self) -> str:
        c, h, w = self.input_size
        return (
            f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test, {c}x{h}x{w}, "
            f"{self.num_classes} classes, default augment {self.default_augment}"
        )


# Input sizes known without reading the files, so that `kdgraph plan` never loads data.
NATIVE_INPUT_SIZES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "synthetic": (3, 32, 32),
    "fashion-mnist-masks": (1, 28, 28), "fashion-mnist-seg": (1, 28, 28),
    "torchvision:MNIST": (1, 28, 28), "torchvision:FashionMNIST": (1, 28, 28),
    "torchvision:CIFAR10": (3, 32, 32), "torchvision:CIFAR100": (3, 32, 32),
}


def resolve_input_size(data_spec: DataSpec) -> tuple[int, int, int]:
    """data.input_size, or the dataset's own size where it is known without loading it."""
    if data_spec.dataset == "text":  # a window of seq_len tokens: a 1 x seq_len grid (kdgraph.compiler.exported)
        if data_spec.seq_len is None:
            raise DataError("data.seq_len: text needs the tokens per window; set data.seq_len: N")
        return (1, 1, int(data_spec.seq_len))
    if data_spec.input_size is not None:
        return tuple(int(v) for v in data_spec.input_size)
    if data_spec.dataset in NATIVE_INPUT_SIZES:
        return NATIVE_INPUT_SIZES[data_spec.dataset]
    raise DataError(f"data.input_size: {data_spec.dataset} has no fixed size; set data.input_size: [C, H, W]")


def create_dataset(data_spec: DataSpec, seed: int,
                   norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Dataset:
    """Load ``data_spec.dataset``, convert it to ``data_spec.input_size`` and keep a class-balanced
    ``data_spec.fraction`` of the training split (chosen by ``seed``). The images stay raw (see
    Dataset), so the peak while loading is about the bytes held; ``norm`` = (mean, std) per
    channel in the dataset's raw value scale where given, else the training split's."""
    name = data_spec.dataset
    key = name.split(":", 1)[0]
    if key not in DATASETS:
        raise DataError(f"data.dataset: unknown dataset {name!r}; valid: {', '.join(dataset_choices())}")
    raw = DATASETS.get(key)(data_spec, seed)
    train_x, test_x = _compact(raw.train_x), _compact(raw.test_x)
    train_y, test_y = raw.train_y.long(), raw.test_y.long()
    num_classes = raw.num_classes
    want_classes = data_spec.num_classes
    if want_classes is not None and want_classes != num_classes:
        raise DataError(f"data.num_classes: {name} has {num_classes} classes, the spec says {want_classes}")
    _check_labels(name, "train", train_y, num_classes)
    _check_labels(name, "test", test_y, num_classes)
    own_val = None
    if raw.val_x is not None:
        _check_labels(name, "val", raw.val_y.long(), num_classes)
        own_val = (_compact(raw.val_x), raw.val_y.long())

    size = tuple(data_spec.input_size) if data_spec.input_size is not None else tuple(train_x.shape[1:])
    mode = data_spec.resize
    if train_y.dim() == 3:  # per-pixel labels (masks) follow their images to the new grid
        train_y, test_y = (_masks_to_size(y, size, name, mode) for y in (train_y, test_y))
    train_x, test_x = _to_size(train_x, size, name, mode), _to_size(test_x, size, name, mode)
    if own_val is not None:
        own_val = (_to_size(own_val[0], size, name, mode), own_val[1])

    if norm is None:
        mean, std = channel_stats(train_x)
    else:
        mean, std = (tuple(torch.tensor(v, dtype=torch.float32).tolist()) for v in norm)
        if len(mean) != size[0] or len(std) != size[0]:
            raise DataError(f"data.mean/std: {len(mean)} and {len(std)} values for {size[0]} channels")
    train_x, train_y, val_x, val_y = _hold_out(data_spec, train_x, train_y, seed, own_val)

    return Dataset(
        name=name,
        train_x=train_x.contiguous(),
        train_y=train_y,
        test_x=test_x.contiguous(),
        test_y=test_y,
        num_classes=num_classes,
        input_size=(int(size[0]), int(size[1]), int(size[2])),
        default_augment=raw.default_augment,
        mean=mean,
        std=std,
        pixel_max=float(raw.pixel_max),
        skipped=raw.skipped,
        val_x=val_x,
        val_y=val_y,
    )


def _hold_out(data_spec: DataSpec, x: torch.Tensor, y: torch.Tensor, seed: int, own_val: tuple | None = None
              ) -> tuple:
    """(train x, train y, val x, val y): the validation split (``data.val_fraction``; None, None
    without one) held out of the training split first, then ``data.fraction`` of the rest; a
    dataset's own validation split (``own_val``: an image folder's val/) is taken as it is."""
    val_x, val_y = own_val if own_val is not None else (None, None)
    if data_spec.val_fraction > 0 and own_val is None:
        rest, held = validation_split(y, data_spec.val_fraction, seed)
        val_x, val_y, x, y = x[held].contiguous(), y[held], x[rest], y[rest]
    if data_spec.fraction < 1.0:
        keep = (class_balanced_subset(y, data_spec.fraction, seed) if y.dim() == 1
                else random_subset(len(y), data_spec.fraction, seed))
        x, y = x[keep], y[keep]
    return x, y, val_x, val_y


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - mean) / std`` per channel in float32 (mean, std: float32, C x 1 x 1), into ``out``
    where given. Raw images of any integer type are read as float32 exactly by the subtraction
    (on CUDA inside its kernel; on the CPU through a float copy of the batch), so this is, bit
    for bit, float32 images minus mean, divided by std: the float path's two operations."""
    return torch.sub(x, mean, out=out).div_(std)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (Bessel-corrected, at least 1e-6) of N x C x H x W images, as
    float32 values. Integer images: exact sums (``_integer_sums``, no float copy of the split),
    then the mean and variance in exact arithmetic, rounded once; float images: torch's float32
    reductions over the whole split, as before integers were kept."""
    if x.is_floating_point():
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return tuple(mean.tolist()), tuple(std.tolist())
    n = x.numel() // x.shape[1]
    sums = _integer_sums(x)
    means = [Fraction(a, n) for a, _ in sums]
    stds = [max(math.sqrt(Fraction(n * b - a * a, n * max(n - 1, 1))), 1e-6) for a, b in sums]
    as32 = lambda v: tuple(torch.tensor([float(f) for f in v], dtype=torch.float32).tolist())  # noqa: E731
    return as32(means), as32(stds)


def _integer_sums(x: torch.Tensor) -> list[tuple[int, int]]:
    """(sum of values, sum of squared values) per channel of integer images, exact (Python ints:
    the squares of a few million 8-bit images pass int64's range once multiplied by n)."""
    if x.dtype == torch.uint8:  # a histogram per channel, a chunk at a time: a few MB besides x
        values = torch.arange(256, dtype=torch.long)
        hists = [sum(torch.bincount(part.flatten(), minlength=256) for part in _chunks(x[:, ch]))
                 for ch in range(x.shape[1])]
        return [(int((h * values).sum()), int((h * values * values).sum())) for h in hists]
    s1 = s2 = torch.zeros(x.shape[1], dtype=torch.long)
    for part in _chunks(x):
        wide = part.long()
        s1, s2 = s1 + wide.sum(dim=(0, 2, 3)), s2 + wide.square().sum(dim=(0, 2, 3))
    return list(zip(s1.tolist(), s2.tolist()))


CHUNK_ELEMENTS = 1 << 20  # values per chunk of a whole-split operation in a wider type (8 MB in int64)


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x`` split along its first dimension into parts of about CHUNK_ELEMENTS values."""
    return x.split(max(1, CHUNK_ELEMENTS // max(1, x[0].numel())))


def _compact(x: torch.Tensor) -> torch.Tensor:
    """Integer images in the smallest integer type that holds their values (uint8 for 0..255),
    float images as float32 (what the float path always used)."""
    if x.is_floating_point() or x.dtype == torch.bool:
        return x.float()
    if x.dtype == torch.uint8 or not x.numel():
        return x
    lo, hi = int(x.min()), int(x.max())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if torch.iinfo(dtype).min <= lo and hi <= torch.iinfo(dtype).max:
            return x.to(dtype)
    return x.float()


def _check_labels(name: str, split: str, labels: torch.Tensor, num_classes: int) -> None:
    """Every label of ``split`` in 0..num_classes-1: out of range, cross-entropy would fail on
    the GPU with a device-side assert, or index past the logits on the CPU."""
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        values = labels[bad]
        raise DataError(f"{name}: the {split} split has {int(bad.sum())} label(s) outside 0..{num_classes - 1} "
                        f"(num_classes {num_classes}), from {int(values.min())} to {int(values.max())}")


def class_balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices keeping ``round(fraction * n_c)`` (at least 1) samples of every class c."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(keep).sort().values


VAL_SEED_OFFSET = 7_919  # the validation split's draw is not the one data.fraction's subset makes


def validation_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices), both sorted, disjoint, covering every sample:
    ``round(val_fraction * n_c)`` samples of every class c (at least 1, and at least 1 left for
    training) go to validation, drawn from ``seed``; per-pixel labels (no class per sample):
    ``round(val_fraction * n)`` of all samples."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed + VAL_SEED_OFFSET)
    groups = ([torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
              if labels.dim() == 1 else [torch.arange(len(labels))])
    held = []
    for idx in groups:
        if len(idx) < 2:
            cls = f"class {int(labels[idx[0]])}" if labels.dim() == 1 else "the training split"
            raise DataError(f"data.val_fraction: {cls} has {len(idx)} training sample, none to hold out for "
                            "validation; set data.val_fraction: 0")
        k = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    val = torch.cat(held).sort().values
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[val] = False
    return torch.nonzero(rest).flatten(), val


def random_subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of ``round(fraction * n)`` (at least 1) samples: per-pixel labels have no
    class per sample to balance."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max(1, round(fraction * n))].sort().values


def _masks_to_size(y: torch.Tensor, size: tuple[int, ...], name: str, mode: str) -> torch.Tensor:
    """N x H x W per-pixel labels to ``size``'s grid: nearest resampling, or padding with
    background (0) where images are padded."""
    h, w = int(size[1]), int(size[2])
    if tuple(y.shape[1:]) == (h, w):
        return y
    if mode == "pad":
        dh, dw = h - y.shape[1], w - y.shape[2]
        if dh < 0 or dw < 0:
            raise DataError(f"data.resize: pad cannot shrink {name}'s masks to {h}x{w}")
        return F.pad(y, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    return F.interpolate(y[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()


def _to_size(x: torch.Tensor, size: tuple[int, ...], name: str, mode: str = "resample") -> torch.Tensor:
    """Convert N x C x H x W images to ``size`` = (C, H, W):
    1 -> 3 channels by repeat, 3 -> 1 by the channel mean, H x W by bilinear resampling
    (antialiased) or, with ``mode`` pad, by centring on a black (raw value 0) canvas. Integer
    images stay integers where the conversion is exact (pad, repeat); the channel mean and
    resampling give float32, computed a chunk at a time."""
    if len(size) != 3:
        raise DataError(f"data.input_size must be (C, H, W), got {size}")
    c, h, w = (int(v) for v in size)
    if x.shape[1] != c and (x.shape[1], c) not in ((1, 3), (3, 1)):
        raise DataError(f"data.input_size: cannot turn {name}'s {x.shape[1]} channels into {c}")
    if x.shape[1] == 3 and c == 1:
        x = torch.cat([part.float().mean(dim=1, keepdim=True) for part in _chunks(x)])
    if tuple(x.shape[2:]) != (h, w) and mode == "pad":
        dh, dw = h - x.shape[2], w - x.shape[3]
        if dh < 0 or dw < 0:
            raise DataError(f"data.resize: pad cannot shrink {name}'s {x.shape[2]}x{x.shape[3]} images to "
                            f"{h}x{w}; use resize: resample or a larger data.input_size")
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    elif tuple(x.shape[2:]) != (h, w):
        # chunks keep the peak memory of resizing 60k images small
        x = torch.cat([F.interpolate(part.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
                       for part in _chunks(x)])
    if x.shape[1] == 1 and c == 3:  # after resizing: a third of the work
        x = x.repeat(1, 3, 1, 1)
    return x


# ----------------------------------------------------------------------------- loaders


def _load_digits(data_spec: DataSpec, seed: int) -> RawSplits:
    """scikit-learn's bundled 8x8 digits (values 0..16); a fixed stratified 80/20 split
    (random_state 0, independent of the run seed): every run has the same test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # integers 0..16 (stored as float64 by scikit-learn)
    if not np.array_equal(images[:, 0], d.images):
        raise DataError("digits: scikit-learn's images are no longer integers 0..16")
    tr_x, te_x, tr_y, te_y = train_test_split(images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return RawSplits(
        torch.from_numpy(tr_x), torch.from_numpy(tr_y).long(), torch.from_numpy(te_x), torch.from_numpy(te_y).long(), 10, "crop",
        pixel_max=16.0,
    )


def read_idx(path: str) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or not), decoded straight into one new array that
    the caller owns: the peak is the array's size, not that plus the file's bytes and a copy."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise DataError(f"{path} is not an IDX file of unsigned bytes")
            sizes = f.read(4 * head[3])
            dims = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(head[3]))
            want = int(np.prod(dims))
            # deflate shrinks at most ~1032:1: a header claiming more cannot be right (and must not
            # allocate it)
            if want > Path(path).stat().st_size * (1032 if path.endswith(".gz") else 1):
                raise DataError(f"{path}: header says {dims}, the file is too small to hold it")
            arr = np.empty(want, dtype=np.uint8)
            view, got = memoryview(arr), 0
            while got < want and (n := f.readinto(view[got:got + (1 << 20)])):  # gzip reads a copy: 1 MB at a time
                got += n
            extra = len(f.read(1))
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); fetch the file again") from None
    if got != want or extra:
        held = "more" if extra else f"{got:,}"
        raise DataError(f"{path}: header says {dims} ({want:,} values), the file holds {held}")
    return arr.reshape(dims)


def _find_file(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        direct = root / name
        if direct.is_file():
            return direct
    for name in (stem, stem + ".gz"):
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    return None


def _load_fashion_mnist(data_spec: DataSpec, seed: int) -> RawSplits:
    """Fashion-MNIST from its four IDX files (gzipped or not), searched under data.root
    (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)."""
    root = Path(data_spec.root) if data_spec.root is not None else FASHION_MNIST_ROOT
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = {s: _find_file(root, s) if root.is_dir() else None for s in stems}
    missing = [s for s, p in paths.items() if p is None]
    if missing:
        raise DataError(f"fashion-mnist: {', '.join(missing)} not found under {root}; {FASHION_MNIST_HELP}")
    tr_x, tr_y, te_x, te_y = (torch.from_numpy(read_idx(str(paths[s]))) for s in stems)
    return RawSplits(tr_x[:, None], tr_y.long(), te_x[:, None], te_y.long(), 10, "crop+flip")


FOREGROUND_THRESHOLD = 25  # raw pixel value (of 255) above which a Fashion-MNIST pixel is the garment


def _fashion_masks(data_spec: DataSpec, seed: int, semantic: bool) -> RawSplits:
    """Fashion-MNIST images with per-pixel labels (N x H x W): the garment's pixels (raw value
    above FOREGROUND_THRESHOLD) are 1 and the background 0 (``fashion-mnist-masks``), or the
    garment's pixels carry its class 1..10 (``fashion-mnist-seg``, 11 classes). No augmentation
    by default: crops and flips move images only."""
    raw = _load_fashion_mnist(data_spec, seed)

    def masks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fg = (x[:, 0] > FOREGROUND_THRESHOLD).long()
        return fg * (y[:, None, None] + 1) if semantic else fg

    return RawSplits(raw.train_x, masks(raw.train_x, raw.train_y), raw.test_x, masks(raw.test_x, raw.test_y),
                     11 if semantic else 2, "none")


def _load_fashion_masks(data_spec: DataSpec, seed: int) -> RawSplits:
    """Foreground masks of Fashion-MNIST: 2 classes per pixel (see ``_fashion_masks``)."""
    return _fashion_masks(data_spec, seed, semantic=False)


def _load_fashion_seg(data_spec: DataSpec, seed: int) -> RawSplits:
    """Garment masks of Fashion-MNIST: background + 10 garment classes per pixel."""
    return _fashion_masks(data_spec, seed, semantic=True)


def _load_imagefolder(data_spec: DataSpec, seed: int) -> RawSplits:
    """root/train/<class>/*.png|jpg and root/val/<class>/... (or root/test), checked by
    scan_imagefolder and read with PIL into memory at data.input_size (default: the first
    training image's size, RGB). Unreadable files are skipped with a warning, or refused
    (data.on_bad_image)."""
    from PIL import Image

    folder = scan_imagefolder(data_spec.root, data_spec.num_classes, validation=data_spec.val_fraction > 0)
    if data_spec.input_size is not None:
        c, h, w = data_spec.input_size
    else:
        (h, w), c = folder.first_image_size(), 3
    if c not in (1, 3):
        raise DataError(f"data.input_size: imagefolder reads 1 (grey) or 3 (RGB) channels, got {c}")
    mode = "L" if c == 1 else "RGB"
    policy = data_spec.on_bad_image
    skipped: list[str] = []

    def read(files: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Decoded straight into one uint8 array (no list of images then a stacked copy), so that
        # the decoded size data.memory_budget_mb is compared with is the peak; unreadable files
        # leave their rows unused at the end.
        out = np.empty((len(files), c, h, w), dtype=np.uint8)
        ys = []
        for f, label in zip(files.tolist(), labels.tolist()):
            try:
                im = read_image(f, mode)
            except BadImage as exc:
                bad_image(f, str(exc), policy)
                skipped.append(f)
                continue
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            pixels = np.asarray(im)
            out[len(ys)] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
            ys.append(label)
        xs = out[:len(ys)]
        if not len(xs):
            raise DataError(f"data.root: none of the {len(files)} images listed under {folder.root} could be read")
        lost = sorted(set(labels.tolist()) - set(ys))  # a class with no readable image cannot be learned or scored
        if lost:
            cls = folder.classes[lost[0]]
            split = folder.eval_split if files is folder.test_files else ("val" if files is folder.val_files
                                                                           else "train")
            named = [f for f, label in zip(files.tolist(), labels.tolist()) if label == lost[0]]
            more = f" (and {len(lost) - 1} more classes)" if len(lost) > 1 else ""
            raise DataError(f"data.root: every image of class {cls!r} in {split}/ is unreadable{more} ({len(named)} "
                            f"files, e.g. {named[0]}); fix or replace them, or remove the class folder from train/ "
                            f"and {folder.eval_split}/")
        return torch.from_numpy(xs), torch.tensor(ys, dtype=torch.long)

    tr_x, tr_y = read(folder.train_files, folder.train_labels)
    te_x, te_y = read(folder.test_files, folder.test_labels)
    va_x, va_y = (None, None) if folder.val_files is None else read(folder.val_files, folder.val_labels)
    return RawSplits(tr_x, tr_y, te_x, te_y, len(folder.classes), "crop+flip", skipped=tuple(skipped),
                     val_x=va_x, val_y=va_y)


def _load_torchvision(data_spec: DataSpec, seed: int) -> RawSplits:
    """``torchvision:NAME``: torchvision.datasets.NAME(root, train=..., download=False)
    (or split="train"/"test"), with its files already under data.root."""
    import torchvision

    _, _, cls_name = data_spec.dataset.partition(":")
    cls = getattr(torchvision.datasets, cls_name, None)
    if cls is None or not isinstance(cls, type):
        raise DataError(f"data.dataset: torchvision.datasets has no dataset {cls_name!r}")
    if data_spec.root is None:
        raise DataError(f"data.root: {data_spec.dataset} needs the folder holding its files (kdgraph never downloads)")
    root = str(data_spec.root)

    def build(train: bool):
        try:
            try:
                return cls(root, train=train, download=False)
            except TypeError:
                return cls(root, split="train" if train else "test", download=False)
        except TypeError:
            instead = {"ImageFolder": "imagefolder", "DatasetFolder": "imagefolder", "FakeData": "synthetic"}
            hint = f"; use dataset: {instead[cls_name]}" if cls_name in instead else ""
            raise DataError(f"data.dataset: torchvision.datasets.{cls_name} does not take (root, train=, download=) "
                            f"or (root, split=, download=), as the datasets torchvision: reads do (MNIST, "
                            f"FashionMNIST, CIFAR10, CIFAR100, SVHN, STL10, ...){hint}") from None
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise DataError(
                f"data.root: {cls_name} files not found under {root} ({e}); kdgraph never downloads: "
                f"fetch them with torchvision.datasets.{cls_name}({root!r}, download=True) where you have network"
            ) from e

    train_ds = build(True)
    splits = []
    for ds in (train_ds, build(False)):
        data = getattr(ds, "data", None)
        labels = getattr(ds, "targets", getattr(ds, "labels", None))
        if data is not None and labels is not None:
            x = torch.as_tensor(np.asarray(data))  # uint8 pixels mostly: kept so by create_dataset
            if x.ndim == 3:  # N x H x W grey
                x = x[:, None]
            elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # N x H x W x C
                x = x.permute(0, 3, 1, 2)
            y = torch.as_tensor(np.asarray(labels)).long()
        else:
            items = [ds[i] for i in range(len(ds))]
            x = torch.from_numpy(np.stack([np.asarray(im) for im, _ in items]))
            x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
            y = torch.tensor([int(t) for _, t in items], dtype=torch.long)
        splits.append((x.contiguous(), y))
    (tr_x, tr_y), (te_x, te_y) = splits
    classes = getattr(train_ds, "classes", None)
    num_classes = len(classes) if classes else int(max(tr_y.max(), te_y.max()) + 1)
    augment = "crop" if cls_name in _NO_FLIP_TORCHVISION else "crop+flip"
    return RawSplits(tr_x, tr_y, te_x, te_y, num_classes, augment)


def _load_synthetic(data_spec: DataSpec, seed: int) -> RawSplits:
    """Standard-normal images of data.input_size (default 3x32x32) with uniform labels:
    data.samples for training, samples // 4 for testing, drawn from ``seed``."""
    c, h, w = data_spec.input_size if data_spec.input_size is not None else (3, 32, 32)
    num_classes = data_spec.num_classes if data_spec.num_classes is not None else 10
    n_train = int(data_spec.samples)
    n_test = max(1, n_train // 4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, c, h, w, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    return RawSplits(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, "none", pixel_max=1.0)


register_dataset("digits", _load_digits)
register_dataset("fashion-mnist", _load_fashion_mnist)
register_dataset("imagefolder", _load_imagefolder)
register_dataset("synthetic", _load_synthetic)
register_dataset("torchvision", _load_torchvision)
# Per-pixel labels, after the image-classification datasets.
register_dataset("fashion-mnist-masks", _load_fashion_masks)
register_dataset("fashion-mnist-seg", _load_fashion_seg)


def _refuse_text_images(data_spec: DataSpec, seed: int) -> RawSplits:
    """``text`` is read as token windows, never as image splits (``kdgraph.lm``): a caller that
    asks for images of it is refused in one line."""
    raise DataError("data.dataset: text holds token windows for a causal LM, not images; `kdgraph plan` plans "
                    "such a pair, and training it comes with the causal-LM task (issue 36)")


register_dataset("text", _refuse_text_images)


# ------------------------------------------------------------------------ device loader


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class DeviceLoader:
    """Batches of an in-memory split that lives on ``device``.

    ``epoch(e, start_step)`` yields (xb, yb) for epoch e from step ``start_step`` on. The
    order (a permutation when ``shuffle``) and the augmentation of every sample are drawn
    on the CPU from a generator seeded by (seed, epoch) alone, once per epoch, and moved to
    the device in one copy: a run resumed at (epoch, step) gets exactly the batches the
    uninterrupted run got, on any device.

    Sharding (``rank``/``world_size``, like DistributedSampler): every rank draws the same
    permutation and takes its strided slice; the permutation is padded by wrapping around
    (or truncated when ``drop_last``) to a multiple of ``world_size``, so every rank runs
    the same number of batches. ``drop_last`` also drops a final incomplete batch.

    Augmentation, batched on the device: ``crop`` pads by ``max(1, H // 8)`` with raw 0 (a
    black border) and takes a random H x W window; ``crop+flip`` also mirrors half of the
    samples horizontally. Then each batch is normalised, ``(x - mean) / std`` per channel
    with ``norm`` = (mean, std) in x's raw units (none: x as float32), into a float32 batch
    laid out as the step wants it (``channels_last``): raw images (uint8 for most datasets)
    are what the device holds, normalised batches what it yields.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        augment: str = "none",
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        channels_last: bool = False,
    ):
        if augment not in AUGMENTATIONS:
            raise DataError(f"data.augment: unknown augmentation {augment!r}; "
                            f"valid: auto, {', '.join(AUGMENTATIONS.names())}")
        if x.ndim != 4 or len(x) != len(y):
            raise DataError(f"DeviceLoader needs N x C x H x W images and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        n = len(x)
        total = (n // world_size if drop_last else -(-n // world_size)) * world_size
        self.samples_per_rank = total // world_size
        self._total = total
        if self.samples_per_rank == 0:
            raise DataError(f"{n} samples cannot be split over {world_size} ranks")
        spr = self.samples_per_rank
        self._num_batches = spr // batch_size if drop_last else -(-spr // batch_size)
        if self._num_batches == 0:
            raise DataError(
                f"data.batch_size: {batch_size} is larger than the {spr} samples per rank and drop_last is on"
            )
        c, h, _ = x.shape[1:]
        self.pad = max(1, h // 8)
        self.norm = norm
        if norm is not None and not len(norm[0]) == len(norm[1]) == c:
            raise DataError(f"DeviceLoader: mean/std of {len(norm[0])} and {len(norm[1])} values for {c} channels")
        self._mean, self._std = (None, None) if norm is None else (
            torch.tensor(v, dtype=torch.float32, device=self.device).view(-1, 1, 1) for v in norm)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def state_dict(self, epoch: int, step: int) -> dict[str, Any]:
        """The position and what fixes the order there: (seed, epoch) draw every random choice."""
        return {"loader": "memory", "epoch": epoch, "step": step, "seed": self.seed, "num_samples": len(self.y),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample order and per-position (crop offsets, flip) for the epoch, on the device."""
        n = len(self.y)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        # draws for every padded position in a fixed order, whatever the rank
        augmentation = AUGMENTATIONS.get(self.augment)
        offsets = torch.randint(0, 2 * self.pad + 1, (self._total, 2), generator=g) if augmentation.crop else None
        flips = torch.rand(self._total, generator=g) < 0.5 if augmentation.flip else None
        order = order.repeat(-(-self._total // n))[: self._total]  # wrap-around padding / drop_last truncation
        mine = slice(self.rank, self._total, self.world_size)
        pick = lambda t: None if t is None else t[mine].to(self.device, non_blocking=True)  # noqa: E731
        return pick(order), pick(offsets), pick(flips)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb, _ in self.epoch_indexed(epoch, start_step):
            yield xb, yb

    def epoch_indexed(self, epoch: int, start_step: int = 0
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``epoch``'s batches with the dataset index of each sample (on the host): what keys a
        per-sample draw (a denoiser's timestep and noise)."""
        order, offsets, flips = self.epoch_plan(epoch)
        host = order.cpu()
        bs = self.batch_size
        for step in range(start_step, self._num_batches):
            sl = slice(step * bs, min((step + 1) * bs, self.samples_per_rank))
            idx = order[sl]
            xb = self.x[idx]
            if offsets is not None:
                xb = self.crop_flip(xb, offsets[sl], None if flips is None else flips[sl])
            yield self.normalize(xb), self.y[idx], host[sl]

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """A raw batch as the model sees it: float32 in the loader's layout, ``(x - mean) / std``.
        The output is allocated in that layout and written by the normalisation itself (no
        separate float or layout copy)."""
        out = torch.empty(xb.shape, dtype=torch.float32, device=xb.device, memory_format=self.memory_format)
        return out.copy_(xb) if self._mean is None else normalize(xb, self._mean, self._std, out=out)

    def crop_flip(self, xb: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """Random crop from the zero-padded raw batch by one gather: row/column indices per
        sample, the column indices reversed for flipped samples (no per-sample Python loop).
        Padding before normalising: a raw 0 becomes the normalised value of black."""
        b, c, h, w = xb.shape
        p = self.pad
        padded = F.pad(xb, (p, p, p, p))
        dev = xb.device
        rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # B x H
        cols_fwd = torch.arange(w, device=dev)
        cols = offsets[:, 1:2] + cols_fwd  # B x W
        if flips is not None:
            cols = torch.where(flips[:, None], offsets[:, 1:2] + (w - 1 - cols_fwd), cols)
        return padded[
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]


def build_loaders(
    data_spec: DataSpec, seed: int, device: torch.device | str, rank: int = 0, world_size: int = 1,
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None, channels_last: bool = False,
) -> tuple[DeviceLoader, DeviceLoader, Dataset]:
    """(train loader, test loader, dataset). Train: shuffled, augmented (``auto`` = the
    dataset's default), last incomplete batch dropped when a full batch exists (BatchNorm
    dislikes tiny batches). Test: in order, no augmentation, every sample. Both normalise
    with the dataset's mean/std. ``norm``: see create_dataset."""
    ds = create_dataset(data_spec, seed, norm)
    augment = data_spec.augment if data_spec.augment != "auto" else ds.default_augment
    if ds.train_y.dim() > 1 and augment != "none":
        raise DataError(f"data.augment: {augment} crops or flips images but not {ds.name}'s per-pixel labels; "
                        "use augment: none")
    per_rank = len(ds.train_y) // world_size
    train = DeviceLoader(
        ds.train_x,
        ds.train_y,
        data_spec.batch_size,
        shuffle=True,
        augment=augment,
        seed=seed,
        device=device,
        drop_last=per_rank >= data_spec.batch_size,
        rank=rank,
        world_size=world_size,
        norm=ds.norm,
        channels_last=channels_last,
    )
    test = DeviceLoader(
        ds.test_x,
        ds.test_y,
        data_spec.test_batch_size or data_spec.batch_size,
        shuffle=False,
        augment="none",
        seed=seed,
        device=device,
        drop_last=False,
        rank=rank,
        world_size=world_size,
        norm=ds.norm,
        channels_last=channels_last,
    )
    return train, test, ds


# ------------------------------------------------------------------------- a run's data


@dataclass
class Data:
    """A run's loaders and what it normalised with (mean/std in 0..1 pixel units)."""

    plan: DataPlan
    train: DeviceLoader | StreamLoader
    test: DeviceLoader | StreamLoader
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats: str
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable files seen by the in-memory path
    val: DeviceLoader | StreamLoader | None = None  # held out of train (data.val_fraction), or None

    @property
    def eval_split(self) -> str:
        """What evaluation during training (and the best checkpoint) reads: "val" or "test"."""
        return "test" if self.val is None else "val"

    @property
    def eval_loader(self) -> DeviceLoader | StreamLoader:
        """The validation split where there is one, else the test split."""
        return self.test if self.val is None else self.val

    def bad_images(self) -> dict[str, str]:
        bad = dict(self.skipped)
        for loader in (self.train, self.test, self.val):
            if isinstance(loader, StreamLoader):
                bad.update(loader.bad)
        return bad

    def test_samples(self) -> int:
        """Samples an evaluation covers: the test split less the unreadable files seen in it."""
        n = self.test.samples_per_rank
        return n - len(self.test.bad) if isinstance(self.test, StreamLoader) else n

    def state_dict(self, epoch: int, step: int) -> dict[str, Any]:
        return {**self.train.state_dict(epoch, step), "bad_images": sorted(self.bad_images())}

    def check_resume(self, state: dict[str, Any] | None, where: str) -> None:
        """Refuse a checkpoint whose data differ (another sample count, seed or batch size)."""
        if state is None:  # checkpoints before the streaming path
            return
        now = self.train.state_dict(state["epoch"], state["step"])
        diff = [f"{k} {state[k]} then, {now[k]} now" for k in ("loader", "num_samples", "seed", "batch_size",
                                                               "world_size") if state.get(k) != now[k]]
        if diff:
            raise DataError(f"{where} was written for other training data ({'; '.join(diff)}); resume with the "
                            "data it was trained on, or start over with --force")
        self.skipped.update({p: "seen before the resume" for p in state.get("bad_images", ())})

    def record(self) -> dict[str, Any]:
        """What summary.json says about the data."""
        bad = self.bad_images()
        out = {"loader": self.plan.loader, "reason": self.plan.reason, "mean": [round(v, 6) for v in self.mean],
               "std": [round(v, 6) for v in self.std], "stats": self.stats}
        if self.plan.loader == "stream":
            out.update(crop_pct=self.plan.crop_pct, workers=self.train.num_workers)
        out.update(bad_images=len(bad), bad_files=sorted(bad)[:20])
        return out


def build_data(spec: Spec, plan: DataPlan, device: torch.device, dist_info: Any,
               channels_last: bool = False) -> Data:
    """The train loader (sharded over ranks) and the test loader (the whole split, for the
    main rank's evaluation) of ``plan``; both yield normalised float32 batches, channels_last
    where ``channels_last`` (the layout the step uses, written by the normalisation)."""
    d = spec.data
    if plan.loader == "memory":
        # image folders are read in 0..255; the plan's mean/std are in 0..1
        norm = (tuple(255 * m for m in plan.mean), tuple(255 * s for s in plan.std)) if plan.mean else None
        train, _, ds = build_loaders(d, spec.seed, device, dist_info.rank, dist_info.world_size, norm=norm,
                                     channels_last=channels_last)
        test, val = (None if x is None else DeviceLoader(x, y, d.test_batch_size or d.batch_size, shuffle=False,
                                                         device=device, norm=ds.norm, channels_last=channels_last)
                     for x, y in ((ds.test_x, ds.test_y), (ds.val_x, ds.val_y)))
        scale = ds.pixel_max  # 0..1 pixel units for every dataset (digits: 0..16, others 0..255)
        return Data(plan, train, test, ds.num_classes, tuple(m / scale for m in ds.mean),
                    tuple(s / scale for s in ds.std), plan.stats, {f: "unreadable" for f in ds.skipped}, val)
    num_workers = resolve_workers(spec.runtime.num_workers, device)  # checked before any image is decoded
    folder = scan_imagefolder(d.root, d.num_classes, validation=d.val_fraction > 0)
    check_classes_readable(folder)
    own = folder.val_files is not None  # val/ is the validation split: nothing is held out of train/
    keep, held = _streamed_hold_out(d, torch.from_numpy(folder.train_labels), spec.seed, own)
    val = (folder.val_files, folder.val_labels) if own else \
        None if held is None else (folder.train_files[held], folder.train_labels[held])
    train, test, val, mean, std, stats = stream_loaders(spec, plan, folder, keep, num_workers, device, dist_info,
                                                        channels_last, val)
    return Data(plan, train, test, len(folder.classes), mean, std, stats, val=val)


def _streamed_hold_out(d: DataSpec, labels: torch.Tensor, seed: int, own_val: bool
                       ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(training files kept, validation files) of an image folder as indices into train/, as
    ``_hold_out`` chooses them in memory (None: all of train/; none held out)."""
    rest = held = None
    if d.val_fraction > 0 and not own_val:
        rest, held = validation_split(labels, d.val_fraction, seed)
    keep = rest
    if d.fraction < 1.0:
        sub = class_balanced_subset(labels if rest is None else labels[rest], d.fraction, seed)
        keep = sub if rest is None else rest[sub]
    return (None if keep is None else keep.numpy()), (None if held is None else held.numpy())
