"""The streaming path's training augmentation, one batch of decoded images per call:
timm's random-resized crop and horizontal flip, as uint8.

The arithmetic is timm's ``RandomResizedCropAndInterpolation`` + ``RandomHorizontalFlip``:
the box is drawn by the same algorithm (ten tries of an area fraction uniform in ``scale``
and an aspect ratio log-uniform in ``ratio``, the first that fits placed uniformly, else a
centre crop clamped to ``ratio``), and the pixels are PIL's crop followed by its bilinear
resize, bit for bit what ``torchvision.transforms.functional.resized_crop`` gives. What
differs is where the randomness comes from. Per sample, timm reads Python's and torch's
global RNGs; making a sample depend on its position alone then means reseeding both for
every sample, and with a chain of transform objects that costs more than decoding the file
(bench/data_throughput.py). Here every draw is a counter-based hash of (seed, epoch, index,
draw number), computed for the whole batch at once with numpy: the same sample in any
worker, any batch, after any resume, and no global RNG touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["RandomResizedCropFlip", "crop_boxes", "sample_seeds", "uniforms"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TRIES = 10  # torchvision's and timm's tries before the centre-crop fallback
_DRAWS = 2 * _TRIES + 3  # area and ratio per try, then top, left and flip


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters neighbouring inputs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epochs, indices) -> np.ndarray:
    """The uint64 stream key of each sample ``indices`` (of ``epochs``, one or one each) under
    ``seed``; epochs and indices are non-negative."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed % 2**64) + _GOLDEN)
        base = _mix(base ^ (np.asarray(epochs, dtype=np.uint64) * _GOLDEN))
        return _mix(base ^ (np.asarray(indices, dtype=np.uint64) + _GOLDEN))


def uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """(len(seeds), n) floats uniform in [0, 1): draw k of sample s is a hash of (seeds[s], k)."""
    with np.errstate(over="ignore"):
        counters = (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        z = _mix(np.asarray(seeds, dtype=np.uint64)[:, None] + counters)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(heights: np.ndarray, widths: np.ndarray, u: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, height, width) of each sample's random-resized crop, from its draws ``u``
    (at least 2 * 10 + 2 columns): timm's ``get_params`` for all samples at once (with
    torchvision's extra check that a side is not 0)."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    area = (heights * widths)[:, None].astype(np.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :_TRIES])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, _TRIES:2 * _TRIES])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round half to even, as Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(len(heights))
    found = fits[rows, first]
    h, w = h[rows, first], w[rows, first]
    # no try fits: the whole image, its aspect clamped to ratio, centred
    in_ratio = widths / heights
    lo_r, hi_r = min(ratio), max(ratio)
    fw = np.where(in_ratio > hi_r, np.round(heights * hi_r).astype(np.int64), widths)
    fh = np.where(in_ratio < lo_r, np.round(widths / lo_r).astype(np.int64), heights)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    # random.randint(0, n) is uniform on n + 1 values
    top = np.where(found, np.floor(u[:, 2 * _TRIES] * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
    left = np.where(found, np.floor(u[:, 2 * _TRIES + 1] * (widths - w + 1)).astype(np.int64), (widths - w) // 2)
    return top, left, h, w


class RandomResizedCropFlip:
    """timm's training crop (+ flip) for a batch: ``(images, seeds) -> uint8 (N, C, H, W)``.

    ``images`` are PIL images of one mode ('L' or 'RGB'), any sizes; ``seeds`` their
    ``sample_seeds``. ``boxes`` says what was drawn, for a caller (or a test) to check."""

    def __init__(self, size: tuple[int, int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True):
        self.size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = flip

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"

    def boxes(self, images, seeds: np.ndarray) -> tuple[np.ndarray, ...]:
        """(top, left, height, width, flipped) per image."""
        u = uniforms(seeds, _DRAWS)
        heights = np.array([im.height for im in images], dtype=np.int64)
        widths = np.array([im.width for im in images], dtype=np.int64)
        top, left, h, w = crop_boxes(heights, widths, u, self.scale, self.ratio)
        flipped = u[:, -1] < 0.5 if self.flip else np.zeros(len(images), dtype=bool)
        return top, left, h, w, flipped

    def __call__(self, images, seeds: np.ndarray) -> torch.Tensor:
        from PIL import Image

        top, left, h, w, flipped = self.boxes(images, seeds)
        out_h, out_w = self.size
        channels = len(images[0].getbands()) if images else 1
        # (N, C, H, W) with the canonical strides: a (N, H, W, 1) array permuted would carry
        # strides that also read as channels_last, and on such batches a CPU training step
        # (torch 2.14.1) aborted in backward with a corrupted heap
        out = np.empty((len(images), channels, out_h, out_w), dtype=np.uint8)
        for k, im in enumerate(images):
            t, l_ = int(top[k]), int(left[k])
            box = (l_, t, l_ + int(w[k]), t + int(h[k]))
            pixels = np.asarray(im.crop(box).resize((out_w, out_h), Image.BILINEAR))
            out[k] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        out[flipped] = out[flipped, :, :, ::-1]
        return torch.from_numpy(out)
