"""ScaleKD's cross-attention projector (Fan et al., "ScaleKD: Strong Vision Transformers Could
Be Excellent Teachers"), as a kdgraph adapter.

CAP is a ``lift`` that turns a student map into the teacher's tokens (3x3 conv + BN + ReLU,
positional embedding, learned queries, one per teacher position, multi-head cross-attention,
LayerNorm + MLP). ScaleKD's other two components are a loss and a path: DFM (dual-view
feature mimicking) and TPP (teacher parameter perception, the student's feature through the
frozen teacher's later blocks) are ``kdgraph.losses`` entries ``dfm`` and ``tpp``, and TPP's
path is the block graph's ``proxy`` edges.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdgraph.layouts import FeatureFormat, from_map, to_map


class CrossAttentionProjector(nn.Module):
    """CAP: student feature -> the teacher's format, through cross-attention.

    Queries are learned, one per teacher position (patch tokens and prefix tokens); keys
    and values are the student's tokens after a 3x3 conv + BN + ReLU and a learned
    positional embedding. Output: the teacher's layout, grid and width.
    """

    @staticmethod
    def count_params(src: FeatureFormat, dst: FeatureFormat, mlp_ratio: float = 2.0) -> int:
        """Parameters of ``CrossAttentionProjector(src, dst)``, without building it (the head
        count does not change it): stem conv + BN, positional embedding, queries, attention's
        in/out projections, LayerNorm, MLP."""
        c, hidden = dst.channels, int(dst.channels * mlp_ratio)
        stem = src.channels * c * 9 + 2 * c
        tokens = src.hw[0] * src.hw[1] * c + (dst.prefix + dst.hw[0] * dst.hw[1]) * c
        attn = 3 * c * c + 3 * c + c * c + c
        return stem + tokens + attn + 2 * c + (c * hidden + hidden) + (hidden * c + c)

    def __init__(self, src: FeatureFormat, dst: FeatureFormat, heads: int = 8, mlp_ratio: float = 2.0):
        super().__init__()
        self.src, self.dst = src, dst
        c = dst.channels
        heads = math.gcd(heads, c)
        self.stem = nn.Sequential(nn.Conv2d(src.channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True))
        self.pos = nn.Parameter(torch.zeros(1, src.hw[0] * src.hw[1], c))
        n_queries = dst.prefix + dst.hw[0] * dst.hw[1]
        self.queries = nn.Parameter(torch.randn(1, n_queries, c) * 0.02)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.norm = nn.LayerNorm(c)
        hidden = int(c * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, _ = to_map(x, self.src)
        kv = self.stem(m.contiguous()).flatten(2).transpose(1, 2) + self.pos  # B x HW x C
        q = self.queries.expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        out = out + self.mlp(self.norm(out))
        if self.dst.layout == "tokens":
            return out
        h, w = self.dst.hw
        mp = out.transpose(1, 2).reshape(x.shape[0], self.dst.channels, h, w)
        return from_map(mp, self.dst)


__all__ = ["CrossAttentionProjector"]
