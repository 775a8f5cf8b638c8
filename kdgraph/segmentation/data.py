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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdgraph.errors import DataError
from kdgraph.segmentation import IGNORE_INDEX

__all__ = ["CITYSCAPES_TRAIN_IDS", "JointAugment", "SegmentationDataset", "SegmentationFolder", "joint_augment", "read_mask",
           "scan_cityscapes", "scan_voc", "scan_segmentation"]

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
        from kdgraph.imagefolder import BadImage, read_image

        path = self.folder.images[index]
        try:
            pixels = np.asarray(read_image(path, "RGB"), dtype=np.float32)
        except BadImage as exc:
            raise DataError(f"cannot decode {path} ({exc})") from None
        image = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)
        mask = torch.from_numpy(read_mask(self.folder.masks[index], self.folder.layout, self.ignore_index))
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise DataError(f"{self.folder.masks[index]}: mask {tuple(mask.shape)} and image "
                            f"{tuple(image.shape[1:])} differ in size")
        if self.augment is not None:
            image, mask = joint_augment(image, mask, self.augment, self.seed, self.epoch, index, self.ignore_index)
        return image.contiguous(), mask
