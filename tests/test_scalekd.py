"""ScaleKD's cross-attention projector (``kdgraph.scalekd``): shapes, gradients, its parameter
count against the built module, and its forward against the same attention written out by hand."""

from __future__ import annotations

import pytest
import torch

from kdgraph.layouts import FeatureFormat
from kdgraph.scalekd import CrossAttentionProjector


@pytest.mark.parametrize("dst", [FeatureFormat("tokens", 16, (4, 4), prefix=1), FeatureFormat("NCHW", 16, (2, 2)),
                                 FeatureFormat("NHWC", 8, (4, 4))], ids=lambda f: f.layout)
def test_cap_output_has_the_teachers_shape(dst):
    src = FeatureFormat("NCHW", 6, (8, 8))
    cap = CrossAttentionProjector(src, dst, heads=4)
    out = cap(torch.randn(2, 6, 8, 8))
    assert out.shape == (2, *dst.shape)
    out.sum().backward()
    assert cap.queries.grad is not None and cap.stem[0].weight.grad is not None


@pytest.mark.parametrize("src,dst,heads", [
    (FeatureFormat("NCHW", 6, (4, 4)), FeatureFormat("tokens", 12, (2, 2), prefix=1), 8),  # gcd(8, 12) = 4 heads
    (FeatureFormat("tokens", 4, (2, 2), prefix=1), FeatureFormat("NCHW", 8, (3, 3)), 2),
])
def test_cap_parameter_count_and_heads(src, dst, heads):
    cap = CrossAttentionProjector(src, dst, heads=heads)
    assert CrossAttentionProjector.count_params(src, dst) == sum(p.numel() for p in cap.parameters())
    assert cap.attn.num_heads == {12: 4, 8: 2}[dst.channels]
    assert cap.queries.shape == (1, dst.prefix + dst.hw[0] * dst.hw[1], dst.channels)


def test_cap_forward_is_the_cross_attention_written_out():
    torch.manual_seed(0)
    src, dst = FeatureFormat("NHWC", 4, (2, 2)), FeatureFormat("NCHW", 6, (3, 1))
    cap = CrossAttentionProjector(src, dst, heads=2).eval()
    x = torch.randn(2, 2, 2, 4)
    with torch.no_grad():
        m = x.permute(0, 3, 1, 2)
        kv = cap.stem(m).flatten(2).transpose(1, 2) + cap.pos  # (2, 4 positions, 6)
        q = cap.queries.expand(2, -1, -1)  # (2, 3 queries, 6)
        w, b = cap.attn.in_proj_weight, cap.attn.in_proj_bias
        qs, ks, vs = (t @ w[i * 6:(i + 1) * 6].T + b[i * 6:(i + 1) * 6] for i, t in enumerate((q, kv, kv)))
        heads = []
        for h in range(2):  # two heads of 3 channels each
            sl = slice(3 * h, 3 * h + 3)
            att = torch.softmax(qs[..., sl] @ ks[..., sl].transpose(1, 2) / 3 ** 0.5, dim=-1)
            heads.append(att @ vs[..., sl])
        out = cap.attn.out_proj(torch.cat(heads, -1))
        out = out + cap.mlp(cap.norm(out))
        want = out.transpose(1, 2).reshape(2, 6, 3, 1)
        torch.testing.assert_close(cap(x), want)
