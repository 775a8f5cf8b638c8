"""Image folders, ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (or ``test/``):
listed and checked without decoding anything, then decoded one file at a time.

``scan_imagefolder`` is the one place that decides what an image folder holds, for both the
in-memory and the streaming path (and for ``kdgraph plan``, which reads no pixels). Every
problem of the layout is a one-line DataError that names what was found and what was
expected: a missing split, a file or folder where images belong, an empty class folder,
classes that differ between the splits, a ``num_classes`` that disagrees with the folders.
Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are not data and are passed over.

A file that is listed but cannot be decoded is only found when it is read: ``read_image``
raises BadImage, and the caller skips it with a BadImageWarning naming the file (counted
in the run's summary) or refuses it, as ``data.on_bad_image`` says.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdgraph.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "BadImage", "BadImageWarning", "ImageFolder", "bad_image", "check_classes_readable",
           "read_image", "scan_imagefolder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
EVAL_SPLITS = ("val", "test")


class BadImage(Exception):
    """A listed file that PIL cannot decode (truncated, corrupt, not the format its name says)."""


class BadImageWarning(UserWarning):
    """An unreadable image was skipped (data.on_bad_image: skip)."""


@dataclass(frozen=True, eq=False)
class ImageFolder:
    """What an image folder holds: class names (sorted folder names; label = position) and,
    per split, file paths (sorted by class, then name) with their labels."""

    root: Path
    eval_split: str  # "val" or "test", whichever the root holds
    classes: tuple[str, ...]
    train_files: np.ndarray  # str paths; numpy, not a list: forked workers share it without refcount writes
    train_labels: np.ndarray  # int64
    test_files: np.ndarray
    test_labels: np.ndarray
    val_files: np.ndarray | None = None  # val/, where a validation split is asked for and test/ is there too
    val_labels: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        return len(self.train_files) + len(self.test_files) + (0 if self.val_files is None else len(self.val_files))

    def first_image_size(self) -> tuple[int, int]:
        """(H, W) of the first training image, read from its header only."""
        from PIL import Image

        try:
            with Image.open(self.train_files[0]) as im:
                w, h = im.size
        except Exception as exc:  # PIL raises several unrelated types for a bad header
            raise DataError(f"data.input_size: not set, and the first image {self.train_files[0]} cannot be read "
                            f"to take its size ({exc}); set data.input_size: [C, H, W]") from None
        return h, w

    def __str__(self) -> str:
        return (f"{self.root}: {len(self.classes)} classes, {len(self.train_files):,} train / "
                f"{len(self.test_files):,} {self.eval_split} images")


def scan_imagefolder(root: Path | str | None, num_classes: int | None = None, validation: bool = False) -> ImageFolder:
    """List and check ``root``; raises DataError naming both sides of any disagreement. With
    ``validation`` (data.val_fraction > 0) a root holding both val/ and test/ gives val/ as the
    validation split and test/ as the test split; otherwise val/ (else test/) is the one split
    evaluated."""
    if root is None:
        raise DataError("data.root: imagefolder needs a root holding train/<class>/ and val/<class>/ (or test/)")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"data.root: {root} is a file; an image folder is a folder holding train/<class>/ and "
                        "val/<class>/ (or test/<class>/)")
    train_dir = root / "train"
    eval_dir = next((root / d for d in EVAL_SPLITS if (root / d).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise DataError(f"data.root: {root} must hold train/<class>/ and val/<class>/ (or test/<class>/)")
    val_dir = None
    if validation and all((root / d).is_dir() for d in EVAL_SPLITS):
        val_dir, eval_dir = root / "val", root / "test"
    train_classes = _class_folders(train_dir)
    if not train_classes:
        raise DataError(f"data.root: {train_dir} has no class sub-folders")
    for other in (d for d in (eval_dir, val_dir) if d is not None):
        eval_classes = _class_folders(other)
        if train_classes != eval_classes:
            only_train = sorted(set(train_classes) - set(eval_classes))
            only_eval = sorted(set(eval_classes) - set(train_classes))
            raise DataError(f"data.root: train/ and {other.name}/ hold different classes: only in train/: "
                            f"{only_train or 'none'}; only in {other.name}/: {only_eval or 'none'}")
    if num_classes is not None and num_classes != len(train_classes):
        shown = ", ".join(train_classes[:6]) + (", ..." if len(train_classes) > 6 else "")
        raise DataError(f"data.num_classes: the spec says {num_classes}, {train_dir} has {len(train_classes)} "
                        f"class folders ({shown})")
    splits = {}
    pairs = ((train_dir, eval_dir), (eval_dir, train_dir)) + (() if val_dir is None else ((val_dir, train_dir),))
    for split_dir, other_dir in pairs:
        files, labels = [], []
        for label, cls in enumerate(train_classes):
            images = _images(split_dir / cls)
            if not images:
                other = len(_images(other_dir / cls))
                raise DataError(f"data.root: {split_dir / cls} has no images ({other_dir.name}/{cls} has {other})")
            files += images
            labels += [label] * len(images)
        splits[split_dir.name] = (np.array(files), np.array(labels, dtype=np.int64))
    (train_files, train_labels), (test_files, test_labels) = splits["train"], splits[eval_dir.name]
    val = splits.get("val") if val_dir is not None else (None, None)
    return ImageFolder(root, eval_dir.name, tuple(train_classes), train_files, train_labels, test_files, test_labels,
                       *val)


def _visible(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _class_folders(split_dir: Path) -> list[str]:
    classes = []
    for entry in _visible(split_dir):
        if not entry.is_dir():
            raise DataError(f"data.root: {entry.path} is a file directly in {split_dir}/; images go in class "
                            f"folders, {split_dir}/<class>/<image>")
        classes.append(entry.name)
    return classes


def _images(folder: Path) -> list[str]:
    """The image files of one class folder (an absent folder has none)."""
    if not folder.is_dir():
        return []
    images = []
    for entry in _visible(folder):
        if entry.is_dir():  # also a folder named x.png: a folder is never an image
            raise DataError(f"data.root: {entry.path} is a folder inside the class folder {folder}; class "
                            f"folders hold image files only ({', '.join(IMAGE_SUFFIXES)})")
        if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"data.root: {entry.path} is not an image file: class folders hold "
                            f"{', '.join(IMAGE_SUFFIXES)} files only; move it out of {folder}")
        images.append(entry.path)
    return images


def check_classes_readable(folder: ImageFolder) -> None:
    """Refuse a class none of whose files opens as an image, in either split, reading headers
    only (one file per healthy class): streamed, such a class would train on zero images with
    a warning per file. A file whose header opens but whose data is truncated is found when
    it is decoded, as before."""
    from PIL import Image

    splits = [("train", folder.train_files, folder.train_labels),
              (folder.eval_split, folder.test_files, folder.test_labels)]
    if folder.val_files is not None:
        splits.append(("val", folder.val_files, folder.val_labels))
    for split, files, labels in splits:
        for label, cls in enumerate(folder.classes):
            named = files[labels == label].tolist()
            for path in named:
                try:
                    with Image.open(path):
                        break
                except Exception:  # noqa: BLE001 - PIL raises several unrelated types for a bad header
                    continue
            else:
                raise DataError(f"data.root: every image of class {cls!r} in {split}/ is unreadable ({len(named)} "
                                f"files, e.g. {named[0]}); fix or replace them, or remove the class folder from "
                                f"train/ and {folder.eval_split}/")


def read_image(path: str, mode: str):
    """The decoded PIL image at ``path`` in ``mode`` ('L' or 'RGB'); BadImage when it cannot be."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes: truncated data fails here, not later
            if im.mode.startswith("I"):  # 16-bit grey (PNG): PIL's convert clips 0..65535 to 255
                im = _to_8_bit(im)
            return im if im.mode == mode else im.convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from None


def _to_8_bit(im):
    """A 16-bit (or 32-bit integer) grey image scaled to 8-bit 'L': 65535 is white, as 255 is."""
    from PIL import Image

    pixels = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or pixels.max(initial=0) <= 65535 else float(2**32 - 1)
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def bad_image(path: str, reason: str, policy: str) -> None:
    """Apply data.on_bad_image to an unreadable file: warn (skip) or raise DataError (error)."""
    if policy == "error":
        raise DataError(f"data.on_bad_image: cannot decode {path} ({reason}); fix or remove the file, or set "
                        "data.on_bad_image: skip to train without it")
    warnings.warn(f"skipping unreadable image {path} ({reason}); it is counted in summary.json "
                  "(data.on_bad_image: error refuses such files)", BadImageWarning, stacklevel=2)
