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

Two batch-level transforms share that source of randomness: ``MixupCutmix`` (timm's
``Mixup`` in batch mode, for consistent teaching: one mixed batch that teacher and student
both see) and ``Renormalize`` (the teacher's normalisation of the student's pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["MixupCutmix", "RandomResizedCropFlip", "Renormalize", "crop_boxes", "mix_targets", "sample_seeds",
           "uniforms"]

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


# --- consistent teaching: mixup / cutmix --------------------------------------------------------

_MIX_STREAM = np.uint64(0x6D69787570637574)  # "mixupcut": keeps the batch draws apart from the crop draws
_MIX_DRAWS = 5  # apply?, cutmix?, lambda, box centre row, box centre column


class MixDraw(NamedTuple):
    """What one batch drew: lambda (the share of each image that stays itself, after timm's
    correction for a clipped box) and the cutmix box (top, bottom, left, right; None for mixup
    or no mixing)."""

    lam: float
    box: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class MixupCutmix:
    """timm's ``Mixup`` in ``mode='batch'``, its draws a pure function of (seed, epoch, batch).

    Per batch, as ``timm.data.Mixup._params_per_batch`` / ``_mix_batch``: with probability
    ``prob`` the batch is mixed; if both alphas are > 0, cutmix is chosen with probability
    ``switch_prob``, else mixup; ``lam ~ Beta(alpha, alpha)`` of the chosen one. Mixup:
    ``x' = lam x + (1 - lam) flip(x)``; cutmix: a box of sides ``int(H sqrt(1 - lam))``,
    ``int(W sqrt(1 - lam))`` centred at a uniform pixel and clipped to the image is pasted from
    ``flip(x)``, and (``correct_lam``) lam becomes 1 - box area / image area. Every sample i is
    paired with sample B-1-i (the batch flipped along its first axis). Targets: ``mix_targets``,
    timm's ``mixup_target``.

    Where it differs from timm: the uniforms come from ``sample_seeds`` (a splitmix64 hash of
    (seed, epoch, the batch's first sample index), on a stream of its own) instead of numpy's
    global RNG, and lam is drawn by inverting Beta's CDF (``scipy.special.betaincinv``) rather
    than by numpy's sampler: the same distribution, not the same numbers. Only batch mode (no
    ``elem``/``pair``), no ``cutmix_minmax``; an odd batch is allowed (its middle sample is
    paired with itself) where timm asserts an even one.
    """

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    correct_lam: bool = True

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.mixup_alpha + self.cutmix_alpha <= 0:
            raise ValueError(f"mixup_alpha {self.mixup_alpha} and cutmix_alpha {self.cutmix_alpha}: both >= 0, "
                             "at least one > 0")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def draws(self, seed: int, epochs, first_indices, height: int, width: int) -> list[MixDraw]:
        """The draw of each batch (``epochs`` one or one per batch, ``first_indices`` the first
        sample index of each batch), for an image of ``height`` x ``width``."""
        from scipy.special import betaincinv

        with np.errstate(over="ignore"):
            keys = _mix(sample_seeds(seed, epochs, np.atleast_1d(first_indices)) ^ _MIX_STREAM)
        u = uniforms(keys, _MIX_DRAWS)
        mixed = u[:, 0] < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = u[:, 1] < self.switch_prob
        else:
            cutmix = np.full(len(u), self.cutmix_alpha > 0)
        alpha = np.where(cutmix, self.cutmix_alpha, self.mixup_alpha)
        lam = betaincinv(alpha, alpha, u[:, 2])
        out = []
        for k in range(len(u)):
            if not mixed[k] or lam[k] == 1.0:
                out.append(MixDraw(1.0, None))
            elif cutmix[k]:
                out.append(self._box(float(lam[k]), u[k, 3], u[k, 4], height, width))
            else:
                out.append(MixDraw(float(lam[k]), None))
        return out

    def _box(self, lam: float, u_row: float, u_col: float, height: int, width: int) -> MixDraw:
        """timm's ``rand_bbox`` + ``cutmix_bbox_and_lam`` (np.random.randint(0, n) is floor(u n))."""
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(u_row * height), int(u_col * width)
        top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
        left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
        if self.correct_lam:
            lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return MixDraw(lam, (top, bottom, left, right))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int, epoch: int, indices,
                 num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed x, soft targets (B, num_classes) float32)`` for a batch ``x`` (B, C, H, W) with
        class labels ``y`` (B,) of the samples ``indices`` (their dataset indices, in batch order,
        on the host: a list, numpy array or CPU tensor; only the first is read) in ``epoch``. ``x``
        is not modified. Same arguments, bit-identical outputs."""
        if y.dim() != 1:
            raise ValueError(f"mixup/cutmix mixes class labels (B,), not labels of shape {tuple(y.shape)}")
        lam, box = self.draws(seed, epoch, int(np.asarray(indices).reshape(-1)[0]), x.shape[-2], x.shape[-1])[0]
        if box is not None:
            top, bottom, left, right = box
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        elif lam != 1.0:
            # timm's arithmetic, operation for operation: flip * (1 - lam), then x * lam + that
            x = x.mul(lam).add_(x.flip(0).mul_(1.0 - lam))
        return x, mix_targets(y, num_classes, lam, self.label_smoothing)


def mix_targets(y: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """timm's ``mixup_target``: smoothed one-hots ``(1 - smoothing + smoothing / C)`` on the label,
    ``smoothing / C`` elsewhere, mixed as ``lam * onehot(y) + (1 - lam) * onehot(flip(y))``."""
    off = smoothing / num_classes
    one_hot = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y.long().view(-1, 1),
                                                                               1.0 - smoothing + off)
    return one_hot * lam + one_hot.flip(0) * (1.0 - lam)


# --- teacher-side normalisation -----------------------------------------------------------------

class Renormalize:
    """The teacher's normalisation of the pixels the student sees, from the student's batch.

    With pixels p, the student's input is ``x = (p - m_s) / s_s`` per channel and the teacher
    wants ``(p - m_t) / s_t``; substituting ``p = x s_s + m_s`` gives one affine op per channel,
    ``x * (s_s / s_t) + (m_s - m_t) / s_t``, with scale and shift computed once (in float64,
    stored float32). Means and stds in the same pixel units (kdgraph's plan: 0..1). Where both
    pairs are equal the batch comes back bit for bit (scale 1, shift 0)."""

    def __init__(self, student_mean, student_std, teacher_mean, teacher_std, device: torch.device | str = "cpu"):
        stats = [np.asarray(v, dtype=np.float64).reshape(-1) for v in (student_mean, student_std, teacher_mean,
                                                                       teacher_std)]
        if len({len(v) for v in stats}) != 1:
            raise ValueError("student and teacher mean/std must have one value per channel each, got "
                             + ", ".join(str(len(v)) for v in stats))
        m_s, s_s, m_t, s_t = stats
        if (s_s <= 0).any() or (s_t <= 0).any():
            raise ValueError("std must be > 0 in every channel")
        self.identity = bool((m_s == m_t).all() and (s_s == s_t).all())
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)  # noqa: E731
        self.scale, self.shift = as_tensor(s_s / s_t), as_tensor((m_s - m_t) / s_t)

    def __repr__(self) -> str:
        return (f"Renormalize(scale={[round(v, 6) for v in self.scale.flatten().tolist()]}, "
                f"shift={[round(v, 6) for v in self.shift.flatten().tolist()]})")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) student-normalised batch -> the teacher's normalisation of it: a new tensor,
        or ``x`` itself where both pairs are equal."""
        if x.shape[-3] != self.scale.shape[0]:
            raise ValueError(f"a batch of {x.shape[-3]} channels for mean/std of {self.scale.shape[0]}")
        if self.identity:
            return x
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
