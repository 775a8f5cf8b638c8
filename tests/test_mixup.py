"""Mixup/CutMix for consistent teaching against timm's ``Mixup`` (batch mode): the lambda
distribution (quantiles, KS test), the cutmix box and its corrected lambda, the mixed pixels
and the soft targets for the same lambda; and the draws as a pure function of (seed, epoch,
batch)."""

from unittest import mock

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from kdgraph.transforms import MixupCutmix, mix_targets, sample_seeds, uniforms

H = W = 8
N = 4000
CONFIGS = {
    "mixup-0.2": dict(mixup_alpha=0.2),
    "mixup-1": dict(mixup_alpha=1.0, prob=0.7),
    "cutmix-1": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5),
}


def timm_lambdas(cfg: dict, n: int) -> np.ndarray:
    """lambda of n batches drawn by timm's own Mixup (numpy's global RNG, seeded here)."""
    mix = Mixup(num_classes=10, **cfg)
    np.random.seed(1234)
    x = torch.zeros(2, 1, H, W)
    return np.array([mix._mix_batch(x.clone()) for _ in range(n)])


def our_lambdas(cfg: dict, n: int, seed: int = 0) -> np.ndarray:
    """lambda of n batches of one epoch (batch k starts at sample index 2k)."""
    return np.array([d.lam for d in MixupCutmix(**cfg).draws(seed, 0, np.arange(n) * 2, H, W)])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lambda_distribution_matches_timm(name):
    ours, theirs = our_lambdas(CONFIGS[name], N), timm_lambdas(CONFIGS[name], N)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    q = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    np.testing.assert_allclose(np.quantile(ours, q), np.quantile(theirs, q), atol=0.05)
    # the share of unmixed batches (lambda exactly 1) is 1 - prob
    prob = CONFIGS[name].get("prob", 1.0)
    assert np.mean(ours == 1.0) == pytest.approx(1 - prob, abs=0.03)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 12)])
def test_cutmix_box_and_corrected_lambda_are_timms(h, w):
    """For the same lambda and box centre (np.random.randint(0, n) = floor(u n)), timm's
    rand_bbox gives our box and cutmix_bbox_and_lam our corrected lambda, 1 - box area / image area."""
    mix = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0)
    g = np.random.default_rng(0)
    for lam, u_row, u_col in g.uniform(0, 1, (300, 3)):
        draw = mix._box(float(lam), u_row, u_col, h, w)
        with mock.patch("numpy.random.randint", side_effect=[int(u_row * h), int(u_col * w)]):
            box, corrected = cutmix_bbox_and_lam((1, h, w), float(lam))
        assert draw.box == tuple(int(v) for v in box)
        assert draw.lam == corrected
        top, bottom, left, right = draw.box
        assert draw.lam == 1 - (bottom - top) * (right - left) / (h * w)


def test_cutmix_corrected_lambda_matches_timms_on_average():
    """Clipping makes the box smaller than 1 - lambda asks: the corrected lambda's mean is
    timm's (same image size), above Beta(1, 1)'s 0.5."""
    cfg = dict(mixup_alpha=0.0, cutmix_alpha=1.0)
    ours, theirs = our_lambdas(cfg, N), timm_lambdas(cfg, N)
    assert ours.mean() == pytest.approx(theirs.mean(), abs=0.02)
    assert ours.mean() > 0.52


def batch(b=6, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, H, W, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_pixels_are_timms_for_the_same_draw(name):
    """timm's _mix_batch, handed our lambda (and for cutmix our box), mixes the same pixels bit
    for bit, and its mixup_target gives our soft targets."""
    cfg = CONFIGS[name]
    mix = MixupCutmix(**cfg)
    x, y = batch()
    indices = np.array([40, 3, 17, 8, 22, 5])
    kinds = set()
    for epoch in range(12):
        draw = mix.draws(7, epoch, indices[0], H, W)[0]
        got_x, got_t = mix(x, y, 7, epoch, indices, 10)
        timm_mix = Mixup(num_classes=10, label_smoothing=mix.label_smoothing, **cfg)
        ref = x.clone()
        cutmix = draw.box is not None
        kinds.add("cutmix" if cutmix else "none" if draw.lam == 1.0 else "mixup")
        with mock.patch("timm.data.mixup.cutmix_bbox_and_lam", return_value=(draw.box, draw.lam)), \
                mock.patch.object(timm_mix, "_params_per_batch", return_value=(0.5 if cutmix else draw.lam, cutmix)):
            lam = timm_mix._mix_batch(ref)
        assert lam == draw.lam
        assert torch.equal(got_x, ref)
        assert torch.equal(got_t, mixup_target(y, 10, lam, mix.label_smoothing))
    assert kinds - {"none"}  # some batch was mixed


@pytest.mark.parametrize("lam,smoothing", [(1.0, 0.0), (0.3, 0.1), (0.77, 0.0), (0.5, 0.2)])
def test_soft_targets_are_timms_mixup_target(lam, smoothing):
    y = torch.tensor([0, 3, 9, 3, 1])
    assert torch.equal(mix_targets(y, 10, lam, smoothing), mixup_target(y, 10, lam, smoothing))


def test_same_inputs_give_bit_identical_outputs_and_leave_x_alone():
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9)
    x, y = batch()
    before = x.clone()
    for epoch in range(6):
        a = mix(x, y, 11, epoch, [5, 1, 2, 3, 4, 0], 10)
        b = mix(x.clone(), y.clone(), 11, epoch, [5, 1, 2, 3, 4, 0], 10)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(x, before)


def test_draws_change_with_epoch_seed_and_batch():
    mix = MixupCutmix(mixup_alpha=1.0)  # continuous lambda (cutmix's corrected one is discrete)
    base = [d.lam for d in mix.draws(0, 0, np.arange(50), H, W)]
    assert [d.lam for d in mix.draws(0, 1, np.arange(50), H, W)] != base
    assert [d.lam for d in mix.draws(1, 0, np.arange(50), H, W)] != base
    assert len(set(base)) == 50  # each batch its own draw


def test_draws_are_independent_of_the_crop_draws_of_the_same_sample():
    """The batch key is hashed onto its own stream: its uniforms are not the crop's of its first sample."""
    crop = uniforms(sample_seeds(0, 0, np.arange(500)), 5)
    lam = our_lambdas(dict(mixup_alpha=1.0), 500)  # Beta(1, 1): lambda is the uniform itself
    ours_first = lam[np.arange(250)]
    assert abs(np.corrcoef(ours_first, crop[np.arange(0, 500, 2)][:, 2])[0, 1]) < 0.2
    assert not np.isin(lam, crop).any()


def test_prob_zero_leaves_the_batch_and_smooths_the_labels():
    mix = MixupCutmix(mixup_alpha=1.0, prob=0.0, label_smoothing=0.1)
    x, y = batch()
    got_x, got_t = mix(x, y, 0, 0, range(6), 10)
    assert torch.equal(got_x, x)
    assert torch.equal(got_t, mixup_target(y, 10, 1.0, 0.1))


def test_odd_batch_pairs_the_middle_sample_with_itself():
    x, y = batch(b=5)
    got_x, got_t = MixupCutmix(mixup_alpha=1.0)(x, y, 0, 0, range(5), 10)
    torch.testing.assert_close(got_x[2], x[2])
    assert got_t[2, y[2]].item() == pytest.approx(1 - 0.1 + 0.01)


def test_dense_labels_and_bad_parameters_are_refused():
    x, _ = batch()
    with pytest.raises(ValueError, match="class labels"):
        MixupCutmix()(x, torch.zeros(6, H, W, dtype=torch.long), 0, 0, range(6), 10)
    for bad in (dict(mixup_alpha=0.0), dict(prob=1.5), dict(switch_prob=-0.1), dict(label_smoothing=1.0)):
        with pytest.raises(ValueError):
            MixupCutmix(**bad)
