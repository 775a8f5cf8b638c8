"""Feature formats and their conversions (``kdgraph.layouts``): exact round trips, the token grid
in row-major order, and the format adapter against the same steps written out with torch."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kdgraph.layouts import FeatureFormat, FormatAdapter, from_map, resample, to_map

FORMATS = [
    FeatureFormat("NCHW", 8, (8, 8)),
    FeatureFormat("NCHW", 6, (4, 4)),
    FeatureFormat("NHWC", 12, (4, 4)),
    FeatureFormat("tokens", 16, (4, 4), prefix=1),
    FeatureFormat("tokens", 10, (2, 2), prefix=0),
]


def _random(fmt: FeatureFormat, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, *fmt.shape)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.layout}{f.hw[0]}p{f.prefix}")
def test_to_map_from_map_round_trip_is_exact(fmt):
    x = _random(fmt)
    m, prefix = to_map(x, fmt)
    assert m.shape == (3, fmt.channels, *fmt.hw)
    assert torch.equal(from_map(m, fmt, prefix), x)


def test_tokens_to_map_puts_patch_tokens_in_row_major_grid():
    fmt = FeatureFormat("tokens", 2, (2, 3), prefix=1)
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)  # token t has values (2t, 2t+1)
    m, prefix = to_map(x, fmt)
    assert torch.equal(prefix, x[:, :1])
    # patch token 1 + (r * 3 + c) sits at row r, column c
    for r, c in itertools.product(range(2), range(3)):
        assert torch.equal(m[0, :, r, c], x[0, 1 + r * 3 + c])


@pytest.mark.parametrize("src,dst", list(itertools.permutations(FORMATS, 2)),
                         ids=lambda f: f"{f.layout}{f.hw[0]}p{f.prefix}")
def test_format_adapter_shapes_for_every_layout_pair(src, dst):
    out = FormatAdapter(src, dst)(_random(src))
    assert out.shape == (3, *dst.shape)


def test_format_adapter_is_resample_then_projection():
    src, dst = FeatureFormat("NCHW", 4, (8, 8)), FeatureFormat("tokens", 6, (4, 4), prefix=1)
    a = FormatAdapter(src, dst).eval()
    with torch.no_grad():
        a.prefix.normal_()
        a.proj[1].running_mean.normal_()
        a.proj[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 8, 8)
    by_hand = a.proj(F.adaptive_avg_pool2d(x, (4, 4)))
    expected = torch.cat([a.prefix.expand(2, -1, -1), by_hand.flatten(2).transpose(1, 2)], 1)
    assert torch.allclose(a(x), expected, atol=1e-6)


def test_resample_upsamples_bilinear_and_pools_down():
    m = torch.randn(1, 2, 4, 4)
    assert torch.equal(resample(m, (2, 2)), F.avg_pool2d(m, 2))
    assert torch.allclose(resample(m, (7, 7)), F.interpolate(m, size=(7, 7), mode="bilinear"))


def test_nhwc_to_map_is_the_permutation():
    fmt = FeatureFormat("NHWC", 3, (2, 4))
    x = torch.randn(2, 2, 4, 3)
    m, prefix = to_map(x, fmt)
    assert prefix is None and m.shape == (2, 3, 2, 4)
    assert torch.equal(m[1, 2, 1, 3], x[1, 1, 3, 2])


def test_from_map_repeats_one_prefix_over_the_batch():
    fmt = FeatureFormat("tokens", 2, (1, 2), prefix=2)
    m = torch.arange(3 * 2 * 1 * 2, dtype=torch.float32).reshape(3, 2, 1, 2)
    prefix = torch.tensor([[[9.0, 8.0], [7.0, 6.0]]])  # one learned set (1, p, C)
    out = from_map(m, fmt, prefix)
    assert out.shape == (3, 4, 2)
    assert all(torch.equal(out[b, :2], prefix[0]) for b in range(3))
    assert torch.equal(out[2, 3], m[2, :, 0, 1])  # patch (0, 1) is token prefix + 1


def test_resample_keeps_a_map_of_the_grid_and_interpolates_non_integer_shrinks():
    m = torch.randn(1, 2, 6, 6)
    assert resample(m, (6, 6)) is m
    assert torch.allclose(resample(m, (4, 4)), F.interpolate(m, size=(4, 4), mode="bilinear"))  # 6/4: no pooling
    assert torch.equal(resample(m, (3, 2)), F.avg_pool2d(m, (2, 3)))


def test_format_adapter_projects_then_upsamples_onto_a_larger_grid():
    src, dst = FeatureFormat("tokens", 4, (2, 2), prefix=1), FeatureFormat("NHWC", 3, (4, 4))
    a = FormatAdapter(src, dst).eval()
    x = torch.randn(2, 5, 4)
    grid = x[:, 1:].transpose(1, 2).reshape(2, 4, 2, 2)  # the class token is dropped
    by_hand = F.interpolate(a.proj(grid), size=(4, 4), mode="bilinear").permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), by_hand)
    assert a.prefix is None


@pytest.mark.parametrize("src,dst", [(FORMATS[0], FORMATS[3]), (FORMATS[3], FORMATS[2]), (FORMATS[4], FORMATS[1])])
def test_format_adapter_parameter_count_matches_the_module(src, dst):
    assert FormatAdapter.count_params(src, dst) == sum(p.numel() for p in FormatAdapter(src, dst).parameters())
