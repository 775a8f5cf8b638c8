"""Segmentation data: image + mask folders in the two common layouts, read one file at a time.

VOC layout (``layout="voc"``)::

    root/JPEGImages/<id>.jpg
    root/SegmentationClass/<id>.png          palette ("P") or grey ("L") PNG: the value is the class,
                                             255 the ignored border
    root/ImageSets/Segmentation/<split>.txt  one <id> a line

Cityscapes layout (``layout="cityscapes"``)::

    root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png

Cityscapes' label ids (0..33) become its 19 train ids (``CITYSCAPES_TRAIN_IDS``); every other id
(void, and the classes not evaluated) becomes ``ignore_index``.

Training samples go through ``joint_augment``: one random scale, crop and horizontal flip drawn
from (seed, epoch, index) alone and applied identically to image and mask (the image resized
bilinearly, the mask by nearest neighbour at the same pixel centres (``nearest-exact``), so no
label is invented; padding of the mask is ``ignore_index``). The same (seed, epoch, index) gives the same sample in any worker, process
or resumed run; nothing else is random. The dataset holds file paths only (``SegmentationFolder``):
pixels are decoded in ``__getitem__``, so a large set streams through a DataLoader.

``data.dataset: voc`` or ``cityscapes`` (``data.root`` the folder) trains on its ``train`` split and
evaluates its ``val`` split: ``plan_segmentation`` lists both in `kdgraph plan`;
``segmentation_data`` (the dense task's ``build_data``) streams them with ``kdgraph.stream``'s
``StreamLoader`` through ``SegmentationStream``: every image and mask resized to ``data.input_size``,
training samples then ``joint_augment``-ed (``data.augment``: auto or crop+flip scale, crop and flip,
crop without the flip, none), every id of a mask checked against the classes (``data.num_classes``,
else the student's, else VOC's 21; Cityscapes: its 19 train ids) or ``ignore_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kdgraph.errors import DataError
from kdgraph.segmentation import IGNORE_INDEX

if TYPE_CHECKING:
    from kdgraph.data import Data
    from kdgraph.ir import DataPlan

__all__ = ["CITYSCAPES_TRAIN_IDS", "JointAugment", "SegmentationDataset", "SegmentationFolder", "SegmentationStream",
           "check_mask_ids", "joint_augment", "plan_segmentation", "read_mask", "read_pair", "scan_cityscapes",
           "scan_segmentation", "scan_voc", "segmentation_augment", "segmentation_classes", "segmentation_data"]

# Cityscapes label id -> train id (cityscapesScripts' labels table; ids not listed are ignored)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


@dataclass(frozen=True)
class SegmentationFolder:
    """One split of a segmentation folder: image and mask paths, paired by position."""

    root: Path
    layout: str  # "voc" or "cityscapes"
    split: str
    images: tuple[str, ...]
    masks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"data.root: {path} is missing; a {what}")


def scan_voc(root: Path | str, split: str) -> SegmentationFolder:
    """The ``split`` of a VOC-layout folder, listed from ImageSets/Segmentation/<split>.txt."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass"):
        _need_dir(root / sub, "VOC-layout folder has JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"data.root: {listing} is missing; it lists the ids of the {split} split, one a line")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"data.root: {listing} lists no image")
    images, masks = [], []
    for i in ids:
        image, mask = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
        for path in (image, mask):
            if not path.is_file():
                raise DataError(f"data.root: {path} is missing ({listing.name} lists {i!r})")
        images.append(str(image))
        masks.append(str(mask))
    return SegmentationFolder(root, "voc", split, tuple(images), tuple(masks))


def scan_cityscapes(root: Path | str, split: str) -> SegmentationFolder:
    """The ``split`` of a Cityscapes-layout folder: every leftImg8bit image with its gtFine labelIds."""
    root = Path(root)
    image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for path in (image_dir, mask_dir):
        _need_dir(path, "Cityscapes-layout folder has leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/")
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"data.root: {image_dir} holds no <city>/*_leftImg8bit.png")
    masks = []
    for image in images:
        name = image.name[: -len("_leftImg8bit.png")]
        mask = mask_dir / image.parent.name / f"{name}_gtFine_labelIds.png"
        if not mask.is_file():
            raise DataError(f"data.root: {mask} is missing (the labels of {image})")
        masks.append(str(mask))
    return SegmentationFolder(root, "cityscapes", split, tuple(map(str, images)), tuple(masks))


def scan_segmentation(root: Path | str, layout: str, split: str) -> SegmentationFolder:
    """``scan_voc`` or ``scan_cityscapes`` as ``layout`` says."""
    scanners = {"voc": scan_voc, "cityscapes": scan_cityscapes}
    if layout not in scanners:
        raise DataError(f"unknown segmentation layout {layout!r}; layouts: {', '.join(scanners)}")
    return scanners[layout](root, split)


def read_mask(path: str, layout: str, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The (H, W) int64 class indices of the mask at ``path``: a VOC palette/grey PNG's values as
    they are (255 stays the ignored border), Cityscapes label ids mapped to train ids (others ->
    ``ignore_index``). A colour (RGB) mask is refused: its colours are not class indices."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DataError(f"{path}: a {im.mode} mask; masks hold class indices (palette 'P' or grey 'L' PNG)")
        values = np.asarray(im, dtype=np.int64)
    if layout == "cityscapes":
        table = np.full(max(256, int(values.max(initial=0)) + 1), ignore_index, dtype=np.int64)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            table[label_id] = train_id
        return table[values]
    if ignore_index != IGNORE_INDEX:
        values = np.where(values == IGNORE_INDEX, ignore_index, values)
    return values


@dataclass(frozen=True)
class JointAugment:
    """Random scale in [scale_min, scale_max], a crop_size crop (padded where smaller), a
    horizontal flip with probability ``flip`` (0 or 0.5 in practice)."""

    crop_size: tuple[int, int]
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: float = 0.5


def _draws(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one generator of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index), 0x5E6]))


def joint_augment(image: torch.Tensor, mask: torch.Tensor, aug: JointAugment, seed: int, epoch: int,
                  index: int, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (C, H, W) float and ``mask`` (H, W) int64, scaled, cropped and flipped alike; a pure
    function of its arguments. Padding: 0 in the image, ``ignore_index`` in the mask."""
    g = _draws(seed, epoch, index)
    scale = float(g.uniform(aug.scale_min, aug.scale_max))
    h, w = mask.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size != (h, w):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    ch, cw = aug.crop_size
    pad_h, pad_w = max(0, ch - size[0]), max(0, cw - size[1])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ignore_index)
    top = int(g.integers(0, mask.shape[0] - ch + 1))
    left = int(g.integers(0, mask.shape[1] - cw + 1))
    image, mask = image[:, top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]
    if g.random() < aug.flip:
        image, mask = image.flip(-1), mask.flip(-1)
    return image.contiguous(), mask.contiguous()


class SegmentationDataset(torch.utils.data.Dataset):
    """(image (3, H, W) float in 0..1, mask (H, W) int64) pairs of a ``SegmentationFolder``, decoded
    one at a time; with ``augment``, each sample is ``joint_augment``-ed from (seed, epoch, index)
    (``set_epoch`` before each epoch)."""

    def __init__(self, folder: SegmentationFolder, augment: JointAugment | None = None, seed: int = 0,
                 ignore_index: int = IGNORE_INDEX):
        self.folder, self.augment, self.seed, self.ignore_index = folder, augment, int(seed), int(ignore_index)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_pair(self.folder, index, self.ignore_index)
        image = image / 255.0
        if self.augment is not None:
            image, mask = joint_augment(image, mask, self.augment, self.seed, self.epoch, index, self.ignore_index)
        return image.contiguous(), mask


def read_pair(folder: SegmentationFolder, index: int, ignore_index: int = IGNORE_INDEX
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``index`` of ``folder``: the image (3, H, W) float32 in 0..255 and its mask (H, W)
    int64 (``read_mask``); a file that does not decode, or a mask of another size, is a DataError."""
    from kdgraph.imagefolder import BadImage, read_image

    path = folder.images[index]
    try:
        pixels = np.asarray(read_image(path, "RGB"), dtype=np.float32)
    except BadImage as exc:
        raise DataError(f"cannot decode {path} ({exc})") from None
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    mask = torch.from_numpy(read_mask(folder.masks[index], folder.layout, ignore_index))
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise DataError(f"{folder.masks[index]}: mask {tuple(mask.shape)} and image "
                        f"{tuple(image.shape[1:])} differ in size")
    return image, mask


# ----------------------------------------------------------------- data.dataset: voc | cityscapes

TRAIN_SPLIT, EVAL_SPLIT = "train", "val"  # both layouts' labelled splits (their test splits have no masks)
VOC_CLASSES = 21  # background + VOC's 20 object classes
CITYSCAPES_CLASSES = len(set(CITYSCAPES_TRAIN_IDS.values()))  # 19
STATS_IMAGES = 64  # training images the mean/std are estimated from, where no model or spec gives them


def check_mask_ids(mask: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int, path: str) -> None:
    """Every id of ``mask`` is a class (0..num_classes-1) or ``ignore_index``; else a one-line DataError."""
    values = np.unique(np.asarray(mask))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        more = f" (and {bad.size - 1} more ids)" if bad.size > 1 else ""
        raise DataError(f"{path}: the mask holds class id {int(bad[0])}{more}, but the data has {num_classes} "
                        f"classes (0..{num_classes - 1}) and ignore_index {ignore_index}; set data.num_classes "
                        "(and the models' num_classes) or fix the mask")


def segmentation_classes(layout: str, given: int | None, predicted: int | None) -> int:
    """The classes of a ``layout`` folder: Cityscapes' 19 train ids; for VOC-style folders
    ``data.num_classes``, else the student's (``predicted``), else VOC's 21."""
    if layout == "cityscapes":
        if given is not None and given != CITYSCAPES_CLASSES:
            raise DataError(f"data.num_classes: cityscapes masks map to its {CITYSCAPES_CLASSES} train ids, "
                            f"got {given}")
        return CITYSCAPES_CLASSES
    return int(given or predicted or VOC_CLASSES)


def segmentation_augment(name: str, size: tuple[int, int]) -> JointAugment | None:
    """``data.augment`` of an image + mask folder: none; crop (a random scale in 0.5..2 and a
    ``size`` crop); crop+flip and auto (also a horizontal flip of half the samples)."""
    if name == "none":
        return None
    if name not in ("auto", "crop", "crop+flip"):
        raise DataError(f"data.augment: {name} is not an augmentation of image + mask folders; "
                        "valid: auto, none, crop, crop+flip")
    return JointAugment(tuple(size), flip=0.0 if name == "crop" else 0.5)


class SegmentationStream(torch.utils.data.Dataset):
    """A ``SegmentationFolder`` read a batch at a time for ``kdgraph.stream.StreamLoader``, whose
    ``EpochSampler`` hands it (index, epoch) keys: each image resized to ``size`` (bilinear,
    antialiased) and its mask alike (``nearest-exact``), then, with ``augment``, ``joint_augment``-ed
    from (seed, epoch, file index) to a ``size`` crop. Images come as float32 in 0..255 (the
    loader's ``Normalizer`` scales them), masks as int64 whose ids are checked against
    ``num_classes``. ``keep``: the files of the folder it reads (None: all)."""

    def __init__(self, folder: SegmentationFolder, size: tuple[int, int], num_classes: int,
                 augment: JointAugment | None = None, seed: int = 0, ignore_index: int = IGNORE_INDEX,
                 keep: np.ndarray | None = None):
        self.folder, self.size, self.num_classes = folder, (int(size[0]), int(size[1])), int(num_classes)
        self.augment, self.seed, self.ignore_index = augment, int(seed), int(ignore_index)
        self.files = np.arange(len(folder)) if keep is None else np.asarray(keep, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, index: int, epoch: int, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, mask) of position ``index`` in ``epoch``; ``augment=False``: resized only."""
        i = int(self.files[index])
        image, mask = read_pair(self.folder, i, self.ignore_index)
        check_mask_ids(mask, self.num_classes, self.ignore_index, self.folder.masks[i])
        if tuple(mask.shape) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            mask = F.interpolate(mask[None, None].float(), size=self.size, mode="nearest-exact")[0, 0].long()
        if augment and self.augment is not None:
            image, mask = joint_augment(image, mask, self.augment, self.seed, epoch, i, self.ignore_index)
        return image.contiguous(), mask.contiguous()

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(images, masks, no unreadable files: a file that does not decode is an error) of ``keys``."""
        pairs = [self.sample(index, epoch) for index, epoch in keys]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), ()

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(*key)

    def check_masks(self) -> None:
        """Read every mask once, before training: an id out of range is said before a step runs
        (Cityscapes' masks map to train ids or ignore_index, so only VOC-style masks are read)."""
        if self.folder.layout == "cityscapes":
            return
        for i in self.files.tolist():
            path = self.folder.masks[i]
            check_mask_ids(read_mask(path, self.folder.layout, self.ignore_index), self.num_classes,
                           self.ignore_index, path)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...], str]:
        """Per-channel mean and std (0..1 pixel units) of up to STATS_IMAGES evenly spaced images,
        resized, not augmented; and where they came from."""
        n = len(self)
        picks = np.unique(np.linspace(0, n - 1, min(n, STATS_IMAGES)).round().astype(int))
        x = torch.stack([self.sample(int(i), 0, augment=False)[0] for i in picks]) / 255.0
        return (tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()),
                f"the training split's statistics ({len(picks)} of {n:,} images)")


def plan_segmentation(data_spec, input_size: tuple[int, int, int], normalisation: dict,
                      missing_ok: bool = False) -> DataPlan:
    """The data plan of ``data.dataset: voc | cityscapes``: the folder's train and val splits
    listed and checked (a missing folder, image or mask is a one-line DataError in `kdgraph
    plan`), always streamed; ``normalisation``: the compiler's mean/std choice (DataPlan's fields).
    With ``missing_ok`` (planning), a root that does not exist yet is left to the run."""
    from kdgraph.ir import DataPlan

    layout = data_spec.dataset
    if input_size[0] != 3:
        raise DataError(f"data.input_size: {layout} images are read as RGB; set [3, H, W], got {list(input_size)}")
    if data_spec.val_fraction > 0:
        raise DataError(f"data.val_fraction: {layout}'s val split is evaluated; nothing is held out of train (set 0)")
    segmentation_classes(layout, data_spec.num_classes, None)
    if data_spec.root is None:
        raise DataError(f"data.root: {layout} reads an image + mask folder; set data.root to it")
    norm = {**normalisation, "crop_pct": None}  # no centre crop: evaluation resizes to input_size
    if missing_ok and not Path(data_spec.root).exists():
        return DataPlan(layout, "stream", f"{data_spec.root} does not exist yet", tuple(input_size), **norm)
    train, val = (scan_segmentation(data_spec.root, layout, split) for split in (TRAIN_SPLIT, EVAL_SPLIT))
    reason = (f"{layout}: {len(train):,} {TRAIN_SPLIT} / {len(val):,} {EVAL_SPLIT} image + mask pairs, read file by "
              f"file and resized to {input_size[1]}x{input_size[2]}")
    return DataPlan(layout, "stream", reason, tuple(input_size), len(train), len(val), **norm)


def segmentation_data(run, plan: DataPlan, device: torch.device, dist_info, channels_last: bool = False,
                      ignore_index: int = IGNORE_INDEX, predicted: int | None = None) -> Data:
    """The run's data (``kdgraph.data.Data``) of a voc / cityscapes folder (``run``: the run
    record, ``plan``: ``plan_segmentation``'s): the train loader (``data.fraction`` of the train
    split, chosen by seed; joint-augmented; sharded over ranks) and the test loader (the val
    split, every image, resized), both ``StreamLoader``s that normalise on the device. Every
    VOC-style mask is checked before training (``check_masks``)."""
    from kdgraph.data import Data, random_subset
    from kdgraph.stream import Normalizer, StreamLoader, WorkerOptions, resolve_workers

    d, rt = run.data, run.runtime
    size = tuple(plan.input_size[1:])
    num_classes = segmentation_classes(d.dataset, d.num_classes, predicted)
    num_workers = resolve_workers(rt.num_workers, device)
    train_folder, test_folder = (scan_segmentation(d.root, d.dataset, split) for split in (TRAIN_SPLIT, EVAL_SPLIT))
    keep = None if d.fraction >= 1.0 else random_subset(len(train_folder), d.fraction, run.seed).numpy()
    common = {"size": size, "num_classes": num_classes, "seed": run.seed, "ignore_index": ignore_index}
    train_ds = SegmentationStream(train_folder, augment=segmentation_augment(d.augment, size), keep=keep, **common)
    test_ds = SegmentationStream(test_folder, **common)
    for ds in (train_ds, test_ds):
        ds.check_masks()
    mean, std, stats = (plan.mean, plan.std, plan.stats) if plan.mean else train_ds.stats()
    normalizer = Normalizer(mean, std, device, channels_last)
    pin = device.type == "cuda" if rt.pin_memory == "auto" else rt.pin_memory
    workers = WorkerOptions(num_workers, pin, rt.persistent_workers, rt.prefetch_factor,
                            low_priority=device.type == "cpu")
    train = StreamLoader(train_ds, d.batch_size, shuffle=True, seed=run.seed, device=device,
                         drop_last=len(train_ds) // dist_info.world_size >= d.batch_size, rank=dist_info.rank,
                         world_size=dist_info.world_size, workers=workers, normalizer=normalizer)
    test = StreamLoader(test_ds, d.test_batch_size or d.batch_size, shuffle=False, seed=run.seed, device=device,
                        workers=workers, normalizer=normalizer)
    return Data(plan, train, test, num_classes, tuple(mean), tuple(std), stats)
