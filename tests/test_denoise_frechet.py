"""kdgraph.tasks.denoise.frechet: the Fréchet distance against its closed form written out here
(one feature; diagonal covariances; a scaled copy), and the judge's features against the
classifier's own pooled features, its refusals one line each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdgraph.errors import KDGraphError
from kdgraph.tasks.denoise.frechet import Judge, frechet_distance


def _orthogonal_columns(n: int, k: int) -> np.ndarray:
    """``k`` columns of ±1 with mean 0 and pairwise orthogonal (a Sylvester Hadamard matrix's
    columns 1..k): rows whose unbiased covariance is exactly n/(n-1) I."""
    h = np.array([[1.0]])
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h[:, 1:k + 1]


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """Diagonal Σ: FD = |μ_a - μ_b|² + Σ_i (s_a,i + s_b,i - 2 sqrt(s_a,i s_b,i))."""
    n, k = 16, 3
    cols = _orthogonal_columns(n, k)
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 0.5])
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([2.0, -1.0, 0.5])
    a, b = cols * sd_a + mu_a, cols * sd_b + mu_b
    var_a, var_b = sd_a ** 2 * n / (n - 1), sd_b ** 2 * n / (n - 1)  # unbiased sample variances
    want = ((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    assert math.isclose(frechet_distance(a, b), want, rel_tol=1e-9)
    assert math.isclose(frechet_distance(b, a), want, rel_tol=1e-9)  # symmetric
    # equal covariances: the means alone
    assert math.isclose(frechet_distance(a, a + np.array([3.0, 0.0, 4.0])), 25.0, rel_tol=1e-9)


def test_frechet_distance_of_fewer_samples_than_features_is_finite():
    """Two samples in four features: both covariances have rank one, their product is singular
    (FID's diagonal offset); the distance of a set to itself is still 0 and to a shifted copy
    the squared shift."""
    a = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 2.0, 5.0]])
    same = frechet_distance(a, a)
    shifted = frechet_distance(a, a + 1.0)
    assert math.isfinite(same) and abs(same) < 1e-4
    assert math.isclose(shifted, 4.0, abs_tol=1e-4)


def test_judge_refuses_a_folder_that_is_not_a_finished_run(tmp_path):
    (tmp_path / "run.json").write_text("{}")  # no student.safetensors nor summary.json
    with pytest.raises(KDGraphError, match=r"denoise.judge: .* is not a finished kdgraph run") as info:
        Judge.finished_run(tmp_path)
    assert "\n" not in str(info.value)


def test_judge_of_a_model_without_a_linear_layer_is_refused():
    judge = Judge(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), (0.5,), (0.5,), "convs")
    with pytest.raises(KDGraphError, match="denoise.judge: convs has no linear layer"):
        judge.features(torch.rand(2, 1, 4, 4))
    assert not judge.model._forward_pre_hooks  # no hook left behind


def test_frechet_distance_written_out():
    from kdgraph.tasks.denoise.frechet import frechet_distance

    g = np.random.default_rng(0)
    a = g.normal(size=(200, 1))
    b = g.normal(loc=0.3, scale=2.0, size=(300, 1))
    # one feature: (μ_a - μ_b)² + (σ_a - σ_b)²
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert math.isclose(frechet_distance(a, b), want, rel_tol=1e-9)
    # b = c a + shift: Σ_b = c² Σ_a, so Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½) = (1 - c)² Tr Σ_a
    a = g.normal(size=(500, 3)) @ np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    shift = np.array([1.0, -2.0, 0.5])
    b = 3.0 * a + shift
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + 4.0 * np.trace(np.cov(a, rowvar=False))
    assert math.isclose(frechet_distance(a, b), want, rel_tol=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_judge_features_are_the_classifiers_pooled_features():
    from kdgraph.tasks.denoise.frechet import Judge
    from kdgraph.zoo import resnet_tiny

    torch.manual_seed(0)
    model = resnet_tiny(num_classes=4, in_chans=1).eval()
    judge = Judge(model, (0.5,), (0.25,))
    pixels = torch.rand(6, 1, 8, 8)
    feats, pred = judge.features(pixels, batch_size=4)
    with torch.no_grad():
        x = (pixels - 0.5) / 0.25
        pooled = model.flatten(model.global_pool(model.forward_features(x)))
        assert np.allclose(feats, pooled.numpy(), atol=1e-6)
        assert (pred == model(x).argmax(1).numpy()).all()
    verdict = judge.judge(pixels, pixels, classes=torch.as_tensor(pred))
    assert abs(verdict["fd"]) < 1e-6 and verdict["class_accuracy"] == 100.0
