"""kdgraph.segmentation.data on tiny VOC- and Cityscapes-layout folders written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdgraph.errors import DataError
from kdgraph.segmentation.data import (JointAugment, SegmentationDataset, SegmentationStream, check_mask_ids,
                                       joint_augment, read_mask, scan_segmentation, segmentation_augment,
                                       segmentation_classes)


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


# ----------------------------------------------------------------- data.dataset: voc | cityscapes


def _stream(root, split="train", num_classes=21, augment=None, seed=5, keep=None):
    return SegmentationStream(scan_segmentation(root, "voc", split), (24, 32), num_classes, augment, seed, keep=keep)


def test_streamed_samples_are_resized_then_augmented_from_seed_epoch_index(tmp_path):
    """Resized: the mask of a 12x16 file at 24x32 is each label repeated 2x2 (nearest), the image
    torch's antialiased bilinear resize of the decoded pixels (0..255); augmented: joint_augment of
    that pair drawn from (seed, epoch, file index); a batch is its samples stacked."""
    masks = _write_voc(tmp_path)
    plain = _stream(tmp_path)
    image, mask = plain.sample(1, epoch=0)
    want = np.repeat(np.repeat(masks["2007_000001"], 2, 0), 2, 1)
    assert mask.dtype == torch.int64 and mask.numpy().tolist() == want.tolist()
    pixels = np.asarray(Image.open(tmp_path / "JPEGImages" / "2007_000001.jpg").convert("RGB"), np.float32)
    resized = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(24, 32),
                                              mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(image, resized)
    assert image.max() > 1.5  # 0..255: the loader's Normalizer scales

    aug = JointAugment((24, 32))
    ds = _stream(tmp_path, augment=aug)
    got = ds[(1, 3)]
    want_image, want_mask = joint_augment(resized, mask, aug, 5, 3, 1)
    assert torch.equal(got[0], want_image) and torch.equal(got[1], want_mask)
    assert not all(torch.equal(ds[(i, 4)][1], ds[(i, 3)][1]) for i in range(3))  # another epoch, other draws
    xb, yb, bad = ds.__getitems__([(2, 3), (1, 3)])
    assert bad == () and torch.equal(xb[1], got[0]) and torch.equal(yb[1], got[1]) and xb.shape == (2, 3, 24, 32)
    kept = _stream(tmp_path, augment=aug, keep=np.array([2, 1]))  # position 1 reads file 1: its draws too
    assert len(kept) == 2 and torch.equal(kept[(1, 3)][1], got[1])


def test_a_mask_id_out_of_range_is_a_one_line_error_and_ignore_index_is_not(tmp_path):
    _write_voc(tmp_path)  # ids 1..20 and the 255 border
    _stream(tmp_path, num_classes=21).check_masks()  # 255 is ignore_index: no error
    with pytest.raises(DataError, match=r"2007_0000\d\d.png: the mask holds class id \d+.* 5 classes \(0..4\) and "
                                        r"ignore_index 255"):
        _stream(tmp_path, num_classes=5).check_masks()
    with pytest.raises(DataError, match="the mask holds class id"):
        _stream(tmp_path, num_classes=1).sample(0, 0)
    with pytest.raises(DataError, match="class id 7 .and 1 more ids."):
        check_mask_ids(np.array([[0, 7], [9, 255]]), 3, 255, "m.png")
    check_mask_ids(np.array([[0, 2], [-1, -1]]), 3, -1, "m.png")  # another ignore_index


def test_the_classes_of_a_folder():
    assert segmentation_classes("cityscapes", None, 7) == 19 and segmentation_classes("cityscapes", 19, None) == 19
    with pytest.raises(DataError, match="cityscapes masks map to its 19 train ids, got 20"):
        segmentation_classes("cityscapes", 20, None)
    assert segmentation_classes("voc", 4, 6) == 4 and segmentation_classes("voc", None, 6) == 6
    assert segmentation_classes("voc", None, None) == 21
    assert segmentation_augment("none", (8, 8)) is None and segmentation_augment("crop", (8, 8)).flip == 0
    assert segmentation_augment("auto", (8, 8)) == JointAugment((8, 8), flip=0.5)


def _data_spec(where, **kw):
    from kdgraph.spec.schema import DataSpec

    return DataSpec(**{"dataset": "voc", "root": str(where), "input_size": (3, 24, 32), "batch_size": 2, **kw})


def test_the_plan_lists_both_splits_and_refuses_what_it_cannot_read(tmp_path):
    from kdgraph.segmentation.data import plan_segmentation

    _write_voc(tmp_path / "voc")
    plan = plan_segmentation(_data_spec(tmp_path / "voc"), (3, 24, 32), {"stats": "s"})
    assert (plan.loader, plan.train_images, plan.test_images) == ("stream", 3, 1) and "3 train / 1 val" in plan.reason
    for kw, size, match in (({}, (1, 24, 32), "read as RGB"), ({"val_fraction": 0.1}, (3, 24, 32), "val split is"),
                            ({"root": None}, (3, 24, 32), "set data.root"),
                            ({"root": str(tmp_path / "none")}, (3, 24, 32), "JPEGImages is missing"),
                            ({"dataset": "cityscapes", "num_classes": 5}, (3, 24, 32), "19 train ids")):
        with pytest.raises(DataError, match=match):
            plan_segmentation(_data_spec(tmp_path / "voc", **kw), size, {})
    later = plan_segmentation(_data_spec(tmp_path / "none"), (3, 24, 32), {}, missing_ok=True)
    assert later.train_images is None and "does not exist yet" in later.reason


def test_the_runs_loaders_stream_normalised_batches_of_the_train_and_val_splits(tmp_path):
    """Batches: (sample / 255 - mean) / std of the samples the sampler's order names; mean/std the
    resized training images' own; data.fraction keeps that share of train/ by seed."""
    from types import SimpleNamespace

    from kdgraph.segmentation.data import plan_segmentation, segmentation_data
    from kdgraph.spec.schema import RuntimeSpec
    from kdgraph.stream import StreamLoader

    _write_voc(tmp_path)
    spec = _data_spec(tmp_path, augment="crop+flip", fraction=0.7)
    plan = plan_segmentation(spec, (3, 24, 32), {"stats": "the training split's statistics"})
    run = SimpleNamespace(data=spec, runtime=RuntimeSpec(num_workers=0), seed=3)
    data = segmentation_data(run, plan, torch.device("cpu"), SimpleNamespace(rank=0, world_size=1), predicted=21)
    assert isinstance(data.train, StreamLoader) and data.num_classes == 21
    train = data.train.dataset
    assert len(train) == 2 and train.seed == 3 and train.augment == JointAugment((24, 32))
    everything = _stream(tmp_path)
    x = torch.stack([everything.sample(i, 0)[0] for i in range(3)]) / 255.0
    x = x[torch.as_tensor(train.files)]
    torch.testing.assert_close(torch.tensor(data.mean), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(data.std), x.std(dim=(0, 2, 3)))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))
    order = data.train.sampler.order(2).tolist()
    (xb, yb), = list(data.train.epoch(2))
    raw = [train[(i, 2)] for i in order]
    torch.testing.assert_close(xb, (torch.stack([r[0] for r in raw]) / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    assert torch.equal(yb, torch.stack([r[1] for r in raw]))
    (tx, ty), = list(data.test.epoch(0))
    assert tx.shape == (1, 3, 24, 32) and torch.equal(ty[0], _stream(tmp_path, "val").sample(0, 0)[1])
    assert data.train.state_dict(2, 0)["num_samples"] == 2
