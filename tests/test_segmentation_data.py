"""kdgraph.segmentation.data on tiny VOC- and Cityscapes-layout folders written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdgraph.errors import DataError
from kdgraph.segmentation.data import (JointAugment, SegmentationDataset, joint_augment, read_mask,
                                       scan_segmentation)


def _voc_mask(g, h=12, w=16):
    mask = np.zeros((h, w), np.uint8)
    mask[2:8, 3:10] = g.integers(1, 21)
    mask[1, :] = 255  # an object border
    return mask


def _write_voc(root, n=4, palette=True):
    g = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    masks = {}
    for i in range(n):
        name = f"2007_{i:06d}"
        Image.fromarray(g.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        masks[name] = _voc_mask(g)
        im = Image.fromarray(masks[name], "L")
        if palette:
            im = im.convert("P")
            im.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
        im.save(root / "SegmentationClass" / f"{name}.png")
    names = sorted(masks)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(names[3] + "\n")
    return masks


def test_voc_layout_reads_the_split_and_palette_masks_as_class_indices(tmp_path):
    masks = _write_voc(tmp_path)
    train, val = scan_segmentation(tmp_path, "voc", "train"), scan_segmentation(tmp_path, "voc", "val")
    assert len(train) == 3 and len(val) == 1 and val.images[0].endswith("2007_000003.jpg")
    ds = SegmentationDataset(val)
    image, mask = ds[0]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert mask.dtype == torch.int64 and mask.numpy().tolist() == masks["2007_000003"].tolist()
    assert (mask == 255).sum() == 16  # the border stays the ignored label
    remapped = read_mask(val.masks[0], "voc", ignore_index=-1)
    assert (remapped == -1).sum() == 16 and not (remapped == 255).any()


def test_voc_layout_problems_are_one_line_errors(tmp_path):
    _write_voc(tmp_path)
    with pytest.raises(DataError, match="test.txt is missing"):
        scan_segmentation(tmp_path, "voc", "test")
    (tmp_path / "SegmentationClass" / "2007_000001.png").unlink()
    with pytest.raises(DataError, match="2007_000001.png is missing .train.txt lists"):
        scan_segmentation(tmp_path, "voc", "train")
    with pytest.raises(DataError, match="unknown segmentation layout 'coco'"):
        scan_segmentation(tmp_path, "coco", "train")
    Image.new("RGB", (16, 12), (255, 0, 0)).save(tmp_path / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(DataError, match="a RGB mask; masks hold class indices"):
        SegmentationDataset(scan_segmentation(tmp_path, "voc", "val"))[0]


def test_cityscapes_label_ids_become_train_ids_and_the_rest_is_ignored(tmp_path):
    for split in ("train",):
        for city in ("aachen", "bremen"):
            (tmp_path / "leftImg8bit" / split / city).mkdir(parents=True)
            (tmp_path / "gtFine" / split / city).mkdir(parents=True)
            ids = np.array([[7, 8, 26, 0], [33, 9, 23, 1]], np.uint8)  # road, sidewalk, car, unlabeled / bicycle, parking, sky, ego
            Image.fromarray(ids, "L").save(tmp_path / "gtFine" / split / city / f"{city}_000000_000019_gtFine_labelIds.png")
            Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(
                tmp_path / "leftImg8bit" / split / city / f"{city}_000000_000019_leftImg8bit.png")
    folder = scan_segmentation(tmp_path, "cityscapes", "train")
    assert len(folder) == 2 and "aachen" in folder.images[0]
    _, mask = SegmentationDataset(folder)[1]
    assert mask.tolist() == [[0, 1, 13, 255], [18, 255, 10, 255]]
    (tmp_path / "gtFine" / "train" / "bremen" / "bremen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="bremen_000000_000019_gtFine_labelIds.png is missing"):
        scan_segmentation(tmp_path, "cityscapes", "train")


def _blocks(h=24, w=32):
    """A mask of 8x8 blocks of classes 0..11, and an image whose every channel is the class."""
    mask = torch.arange(12).view(3, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
    return mask.float().expand(3, h, w).clone(), mask


def test_joint_augment_is_a_pure_function_of_seed_epoch_index():
    image, mask = _blocks()
    aug = JointAugment(crop_size=(16, 16))
    a = joint_augment(image, mask, aug, seed=1, epoch=2, index=3)
    b = joint_augment(image, mask, aug, seed=1, epoch=2, index=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [joint_augment(image, mask, aug, *k) for k in ((2, 2, 3), (1, 3, 3), (1, 2, 4))]
    assert all(not torch.equal(a[1], o[1]) or not torch.equal(a[0], o[0]) for o in others)


@pytest.mark.parametrize("index", range(12))
def test_crop_and_flip_move_image_and_mask_alike(index):
    """At scale 1 nothing is resampled: every mask pixel equals the image pixel over it."""
    image, mask = _blocks()
    aug = JointAugment(crop_size=(20, 28), scale_min=1.0, scale_max=1.0, flip=0.5)
    img, m = joint_augment(image, mask, aug, seed=0, epoch=0, index=index)
    assert img.shape == (3, 20, 28) and m.shape == (20, 28)
    assert torch.equal(img[0].long(), m) and torch.equal(img[1], img[0])


@pytest.mark.parametrize("index", range(12))
def test_scaled_masks_keep_their_labels_and_stay_aligned_with_the_image(index):
    """Nearest-neighbour masks invent no label; away from block edges the bilinear image agrees
    with the mask; a crop larger than the scaled image is padded with ignore_index."""
    image, mask = _blocks()
    aug = JointAugment(crop_size=(32, 40), scale_min=0.5, scale_max=2.0)
    img, m = joint_augment(image, mask, aug, seed=5, epoch=1, index=index)
    assert img.shape == (3, 32, 40) and m.shape == (32, 40)
    assert set(m.unique().tolist()) <= set(range(12)) | {255}
    labelled = m != 255
    interior = labelled.clone()
    pad = torch.nn.functional.pad(m.float(), (2, 2, 2, 2), value=-1.0)  # the crop's edge is no interior
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            interior &= pad[2 + dy:34 + dy, 2 + dx:42 + dx] == m
    assert interior.any()
    assert torch.allclose(img[0][interior], m[interior].float(), atol=1e-4)
    assert (img[:, ~labelled] == 0).all()  # padding: 0 in the image where the mask is ignored


def test_the_dataset_draws_from_its_epoch(tmp_path):
    _write_voc(tmp_path)
    ds = SegmentationDataset(scan_segmentation(tmp_path, "voc", "train"), JointAugment((8, 8)), seed=3)
    first = [ds[i][1] for i in range(3)]
    assert all(torch.equal(a, ds[i][1]) for i, a in enumerate(first))
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i][1]) for i, a in enumerate(first))
