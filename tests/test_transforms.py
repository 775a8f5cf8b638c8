"""kdgraph.transforms, the streaming crop and its draws: boxes against timm's ``get_params``
(distribution and fallback), pixels against torchvision's ``resized_crop``, the draws a pure
function of (seed, epoch, index); the whole-image crop worked out by hand. (``MixupCutmix``
against timm's ``Mixup`` and ``mix_targets`` against timm's ``mixup_target``: tests/test_mixup.py;
``Renormalize``: tests/test_renormalize.py.)"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kdgraph.transforms import RandomResizedCropFlip, crop_boxes, sample_seeds, uniforms


def test_a_crop_of_the_whole_area_at_the_images_own_aspect_is_the_whole_image():
    """scale (1, 1) and a ratio range holding W/H: every try fits exactly at (0, 0, H, W)."""
    n = 50
    u = uniforms(sample_seeds(2, 0, np.arange(n)), 23)
    top, left, h, w = crop_boxes(np.full(n, 30), np.full(n, 30), u, (1.0, 1.0), (1.0, 1.0))
    assert (top == 0).all() and (left == 0).all() and (h == 30).all() and (w == 30).all()
    tf = RandomResizedCropFlip((30, 30), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    image = Image.fromarray(np.arange(900, dtype=np.uint8).reshape(30, 30) % 251)
    assert np.array_equal(tf([image], sample_seeds(0, 0, [0]))[0, 0].numpy(), np.asarray(image))


def test_draw_k_does_not_depend_on_how_many_are_drawn():
    seeds = sample_seeds(11, 2, np.arange(7))
    assert np.array_equal(uniforms(seeds, 5), uniforms(seeds, 23)[:, :5])


def test_non_square_output_and_mixed_input_sizes():
    """(H, W) output from images of different sizes and aspects, each equal to torchvision's
    resized_crop at its box (PIL takes sizes as (W, H): a swap would show here)."""
    import torchvision.transforms.functional as TF

    from kdgraph.transforms import RandomResizedCropFlip, sample_seeds

    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)) for h, w in ((9, 30), (40, 12), (17, 17))]
    tf = RandomResizedCropFlip((6, 10), flip=False)
    seeds = sample_seeds(0, 1, np.arange(3))
    x = tf(images, seeds)
    assert x.shape == (3, 1, 6, 10) and x.dtype == torch.uint8
    for k, (top, left, h, w, _) in enumerate(zip(*tf.boxes(images, seeds))):
        want = TF.resized_crop(images[k], int(top), int(left), int(h), int(w), [6, 10], TF.InterpolationMode.BILINEAR)
        assert np.array_equal(x[k, 0].numpy(), np.asarray(want))


def test_crop_boxes_follow_timms_get_params():
    """The batch's box sampler against timm's RandomResizedCropAndInterpolation.get_params:
    the same distribution of area, aspect and position (10,000 draws each, quantiles
    within 0.03), and the same centre-crop fallback where no try can fit."""
    import random

    from timm.data.transforms import RandomResizedCropAndInterpolation

    from kdgraph.transforms import RandomResizedCropFlip, crop_boxes, sample_seeds, uniforms

    n, H, W, scale, ratio = 10_000, 28, 40, (0.08, 1.0), (3 / 4, 4 / 3)
    u = uniforms(sample_seeds(0, 0, np.arange(n)), 23)
    top, left, h, w = crop_boxes(np.full(n, H), np.full(n, W), u, scale, ratio)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    random.seed(0)
    image = Image.new("L", (W, H))
    theirs = np.array([RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(n)])

    def features(i, j, hh, ww):
        return {"area": hh * ww / (H * W), "log aspect": np.log(ww / hh), "top": (i + hh / 2) / H,
                "left": (j + ww / 2) / W}

    ours, ref = features(top, left, h, w), features(*theirs.T)
    for name in ours:
        q_ours = np.quantile(ours[name], np.linspace(0.1, 0.9, 9))
        q_ref = np.quantile(ref[name], np.linspace(0.1, 0.9, 9))
        spread = np.ptp(ref[name])
        assert np.abs(q_ours - q_ref).max() <= 0.03 * spread, name
    flipped = RandomResizedCropFlip((8, 8)).boxes([image] * n, sample_seeds(0, 0, np.arange(n)))[-1]
    assert abs(flipped.mean() - 0.5) < 0.02  # timm's RandomHorizontalFlip(0.5)
    # nothing fits (the whole area at an aspect the image does not have): timm's centre crop
    for size in ((10, 40), (40, 10), (20, 20)):
        image = Image.new("L", size)
        want = RandomResizedCropAndInterpolation.get_params(image, (1.0, 1.0), ratio)
        got = crop_boxes(np.array([size[1]]), np.array([size[0]]), uniforms(sample_seeds(1, 0, [0]), 23),
                         (1.0, 1.0), ratio)
        assert tuple(int(v[0]) for v in got) == want


def test_flip_is_independent_of_the_crop():
    """The flip is a draw of its own: over 20,000 samples its rate is one half whatever the crop
    came out as (the crop's top and left within the room the image leaves, its area, its aspect).
    A flip reading one of the crop's draws (the top's, say) would flip nearly every crop in one
    half of the range and almost none in the other."""
    from kdgraph.transforms import RandomResizedCropFlip, sample_seeds

    n, H, W = 20_000, 48, 64
    top, left, h, w, flipped = RandomResizedCropFlip((8, 8)).boxes([Image.new("L", (W, H))] * n,
                                                                  sample_seeds(4, 1, np.arange(n)))
    assert abs(flipped.mean() - 0.5) < 0.02
    features = {}
    for name, at, room in (("top", top, H - h), ("left", left, W - w)):
        placed = room >= 4  # room to place the crop in: its position was drawn
        assert placed.sum() > n // 2, name
        features[name] = (at[placed] / room[placed], flipped[placed])
    features["area"] = (h * w / (H * W), flipped)
    features["log aspect"] = (np.log(w / h), flipped)
    for name, (value, flips) in features.items():
        low = value < np.median(value)
        for half, rate in (("low", flips[low].mean()), ("high", flips[~low].mean())):
            assert abs(rate - 0.5) < 0.03, f"flip rate {rate:.3f} where the crop's {name} is {half}"


def test_sample_seeds_and_uniforms():
    """Draws depend on (seed, epoch, index) and nothing else, and look uniform."""
    from kdgraph.transforms import sample_seeds, uniforms

    a = sample_seeds(7, 3, np.arange(1000))
    assert np.array_equal(a, sample_seeds(7, np.full(1000, 3), np.arange(1000)))
    assert np.array_equal(a[10:20], sample_seeds(7, 3, np.arange(10, 20)))
    for other in (sample_seeds(8, 3, np.arange(1000)), sample_seeds(7, 4, np.arange(1000))):
        assert not np.isin(a, other).any()
    assert len(np.unique(a)) == 1000
    u = uniforms(a, 23)
    assert u.shape == (1000, 23) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1
