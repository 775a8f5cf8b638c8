"""kdgraph.imagefolder: what an image folder holds, listed without decoding, against the files
written here (their paths, labels, counts, sizes); every layout problem a one-line DataError
naming both sides; decoding (16-bit grey scaled, truncated files) and data.on_bad_image."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdgraph.errors import DataError
from kdgraph.imagefolder import (BadImage, BadImageWarning, bad_image, check_classes_readable, read_image,
                                 scan_imagefolder)

CLASSES = ("ant", "bee", "cat")


def write_folder(root: Path, *, side: int = 16, train: int = 8, val: int = 4, splits=("train", "val")) -> Path:
    """``train`` / ``val`` grey PNGs per class of ``CLASSES``, (side, side + 2) pixels."""
    rng = np.random.default_rng(0)
    for split in splits:
        n = train if split == "train" else val
        for k, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((side, side + 2)) * 100 + 70 * k).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def _move(root: Path, src: str, dst: str) -> None:
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    (root / src).rename(root / dst)


def test_the_listing_is_the_files_written_sorted_by_class_then_name(tmp_path):
    root = write_folder(tmp_path / "images", train=3, val=2)
    folder = scan_imagefolder(root, num_classes=3)
    assert folder.classes == CLASSES and folder.eval_split == "val" and folder.val_files is None
    want = [str(root / "train" / c / f"{i}.png") for c in CLASSES for i in range(3)]
    assert folder.train_files.tolist() == want and folder.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert folder.test_files.tolist() == [str(root / "val" / c / f"{i}.png") for c in CLASSES for i in range(2)]
    assert folder.train_labels.dtype == np.int64 and folder.num_images == 15
    assert folder.first_image_size() == (16, 18)  # (H, W) of the PNG written
    assert str(folder) == f"{root}: 3 classes, 9 train / 6 val images"


def test_val_and_test_with_a_validation_split_give_both(tmp_path):
    root = write_folder(tmp_path / "images", train=2, val=1, splits=("train", "val", "test"))
    plain = scan_imagefolder(root)
    assert plain.eval_split == "val" and plain.val_files is None
    both = scan_imagefolder(root, validation=True)
    assert both.eval_split == "test" and both.test_files[0].startswith(str(root / "test"))
    assert both.val_files.tolist() == [str(root / "val" / c / "0.png") for c in CLASSES]
    assert both.val_labels.tolist() == [0, 1, 2] and both.num_images == 12
    only_test = write_folder(tmp_path / "t", train=2, val=1, splits=("train", "test"))
    assert scan_imagefolder(only_test, validation=True).eval_split == "test"


@pytest.mark.parametrize("make, pattern", [
    (lambda p: None, r"data.root: imagefolder needs a root holding train/<class>/ and val/<class>/"),
    (lambda p: (p.write_text("x"), p)[1], r"data.root: .*images is a file; an image folder is a folder"),
    (lambda p: (p / "train").mkdir(parents=True) or p, r"data.root: .*images must hold train/<class>/ and val/"),
    (lambda p: [(p / s).mkdir(parents=True) for s in ("train", "val")] and p, r"train has no class sub-folders"),
], ids=["no-root", "a-file", "no-eval-split", "no-classes"])
def test_a_root_that_is_no_image_folder_is_one_line(tmp_path, make, pattern):
    root = make(tmp_path / "images")
    with pytest.raises(DataError, match=pattern) as err:
        scan_imagefolder(root)
    assert "\n" not in str(err.value)


def test_num_classes_other_than_the_folders_is_refused(tmp_path):
    root = write_folder(tmp_path / "images", train=1, val=1)
    with pytest.raises(DataError, match=r"data.num_classes: the spec says 2, .*train has 3 class folders "
                                        r"\(ant, bee, cat\)"):
        scan_imagefolder(root, num_classes=2)


def test_a_class_whose_every_file_is_unreadable_is_refused(tmp_path):
    root = write_folder(tmp_path / "images", train=2, val=1)
    check_classes_readable(scan_imagefolder(root))  # all readable: nothing said
    (root / "train" / "bee" / "0.png").write_bytes(b"not a png")  # one of two: the class still reads
    check_classes_readable(scan_imagefolder(root))
    (root / "train" / "bee" / "1.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"every image of class 'bee' in train/ is unreadable \(2 files, e.g. "
                                        r".*bee/0.png\)"):
        check_classes_readable(scan_imagefolder(root))
    with pytest.raises(DataError, match=r"data.input_size: not set, and the first image .*ant/0.png cannot be read"):
        (root / "train" / "ant" / "0.png").write_bytes(b"")
        scan_imagefolder(root).first_image_size()


def test_read_image_converts_and_refuses_a_truncated_file(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)  # channels unlike each other
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(np.asarray(read_image(str(tmp_path / "c.png"), "RGB")), rgb)
    grey = np.asarray(read_image(str(tmp_path / "c.png"), "L"))
    luma = rgb.astype(np.float64) @ np.array([299, 587, 114]) / 1000  # ITU-R 601-2, as PIL documents "L"
    assert grey.shape == (4, 5) and grey.dtype == np.uint8 and np.abs(grey - luma).max() <= 1  # PIL's rounding
    data = (tmp_path / "c.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage):
        read_image(str(tmp_path / "cut.png"), "RGB")


def test_on_bad_image_warns_or_refuses():
    with pytest.warns(BadImageWarning, match=r"skipping unreadable image a/b.png \(OSError: truncated\)"):
        bad_image("a/b.png", "OSError: truncated", "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"data.on_bad_image: cannot decode a/b.png \(OSError: truncated\); .*"
                                            "data.on_bad_image: skip"):
            bad_image("a/b.png", "OSError: truncated", "error")


@pytest.mark.parametrize("breakage, pattern", [
    (lambda r: [p.unlink() for p in (r / "train" / "bee").iterdir()], r"train/bee has no images \(val/bee has 4\)"),
    (lambda r: (r / "train" / "ant" / "notes.txt").write_text("hi"), r"ant/notes\.txt is not an image file.*\.png"),
    (lambda r: (r / "train" / "ant" / "x.png").mkdir(), r"ant/x\.png is a folder inside the class folder"),
    (lambda r: _move(r, "val/cat", "val/cow"), r"only in train/: \['cat'\]; only in val/: \['cow'\]"),
    (lambda r: (r / "train" / "stray.png").write_bytes(b""), r"stray\.png is a file directly in .*train/<class>"),
])
def test_layout_errors_are_one_line_and_name_both_sides(tmp_path, breakage, pattern):
    root = write_folder(tmp_path / "images")
    breakage(root)
    with pytest.raises(DataError, match=pattern) as err:
        scan_imagefolder(root)
    assert "\n" not in str(err.value)


def test_hidden_files_are_not_data(tmp_path):
    root = write_folder(tmp_path / "images")
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"\0")
    assert len(scan_imagefolder(root).train_files) == 24


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image

    from kdgraph.imagefolder import read_image

    pixels = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    grey = np.asarray(read_image(str(tmp_path / "deep.png"), "L"))
    assert grey.dtype == np.uint8 and np.array_equal(grey.ravel(), np.arange(256))
    rgb = np.asarray(read_image(str(tmp_path / "deep.png"), "RGB"))
    assert np.array_equal(rgb[..., 0], grey)
