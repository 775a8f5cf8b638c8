"""Adapters: shapes, exact folding of lift+lower, and parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdgraph.adapters import AdapterPair, ChannelMap, build_adapters, fold
from kdgraph.ir import AdapterSpec, BlockPair, Pairing


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            nn.init.normal_(m.weight, generator=g)
            nn.init.normal_(m.bias, generator=g)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.bias, generator=g)


def _input(kind, c):
    return torch.randn(2, c, 5, 5) if kind == "conv1x1" else torch.randn(2, 7, c)


@pytest.mark.parametrize("kind,layout", [("conv1x1", "NCHW"), ("linear", "tokens"), ("linear", "NHWC")])
@pytest.mark.parametrize("cs,ct", [(16, 32), (48, 24), (8, 8)])
def test_pair_shapes_fold_and_params(kind, layout, cs, ct):
    spec = AdapterSpec(1, kind, layout, cs, ct)
    pair = AdapterPair(spec)
    _randomise(pair)
    if kind == "conv1x1":
        assert isinstance(pair.lift.conv, nn.Conv2d) and pair.lift.conv.kernel_size == (1, 1)
        assert pair.lift.conv.bias is None and isinstance(pair.lift.bn, nn.BatchNorm2d)
        x = torch.randn(2, cs, 5, 5)
        assert pair.lift(x).shape == (2, ct, 5, 5)
        assert pair.lower(torch.randn(2, ct, 5, 5)).shape == (2, cs, 5, 5)
    else:
        assert isinstance(pair.lift.linear, nn.Linear)
        x = torch.randn(2, 3, 4, cs) if layout == "NHWC" else torch.randn(2, 9, cs)
        assert pair.lift(x).shape == x.shape[:-1] + (ct,)
        assert pair.lower(pair.lift(x)).shape == x.shape
    assert pair(x).shape == x.shape
    assert spec.params == sum(p.numel() for p in pair.parameters())
    assert spec.lift_params == sum(p.numel() for p in pair.lift.parameters())
    assert spec.lower_params == sum(p.numel() for p in pair.lower.parameters())
    assert spec.lift == (cs, ct) and spec.lower == (ct, cs)

    pair.eval()
    folded = fold(pair)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pair(x), rtol=1e-5, atol=1e-5)
    expected_type = nn.Conv2d if kind == "conv1x1" else nn.Linear
    assert type(folded) is expected_type
    assert sum(p.numel() for p in folded.parameters()) == cs * cs + cs


def test_channel_map_affine_matches_forward_in_eval():
    m = ChannelMap(6, 10, "conv1x1")
    _randomise(m)
    m.eval()
    w, b = m.affine()
    x = torch.randn(3, 6, 4, 4)
    want = torch.einsum("oc,nchw->nohw", w, x) + b[None, :, None, None]
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_fold_does_not_touch_the_pair():
    pair = AdapterPair(AdapterSpec(1, "conv1x1", "NCHW", 4, 8))
    _randomise(pair)
    pair.eval()
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    fold(pair)
    assert all(torch.equal(before[k], v) for k, v in pair.state_dict().items())
    assert not pair.training


def test_build_adapters_keys_by_block_index():
    specs = [AdapterSpec(1, "conv1x1", "NCHW", 16, 32), AdapterSpec(3, "linear", "tokens", 8, 12)]
    pairing = Pairing((BlockPair(1, None, None, specs[0], "stage end"),
                       BlockPair(2, None, None, None, "stage end"),
                       BlockPair(3, None, None, specs[1], "stage end"),
                       BlockPair(4, None, None, None, "head")))
    adapters = build_adapters(pairing)
    assert list(adapters.keys()) == ["1", "3"]
    assert adapters["1"].lift.conv.in_channels == 16 and adapters["3"].lower.linear.out_features == 8
    assert sum(p.numel() for p in adapters.parameters()) == sum(s.params for s in specs)


def test_format_and_cap_parameter_counts_match_the_built_modules():
    """The pair pass counts adapter parameters by formula (nothing built); the built modules agree."""
    from kdgraph.adapters import AdapterPair
    from kdgraph.compiler.pair import _counted
    from kdgraph.ir import FeatureFormat

    formats = [(FeatureFormat("NCHW", 16, (4, 4)), FeatureFormat("tokens", 24, (2, 2), prefix=1)),
               (FeatureFormat("tokens", 24, (2, 2), prefix=1), FeatureFormat("NHWC", 8, (4, 4))),
               (FeatureFormat("NCHW", 6, (8, 8)), FeatureFormat("NCHW", 12, (4, 4)))]
    for kind in ("format", "cap"):
        for src, dst in formats:
            spec = _counted(AdapterSpec(1, kind, src.layout, src.channels, dst.channels, src, dst))
            pair = AdapterPair(spec)
            count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            assert (spec.lift_params, spec.lower_params) == (count(pair.lift), count(pair.lower)), (kind, src, dst)
