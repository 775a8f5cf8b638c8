"""ScaleKD's components (Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent
Teachers"), as kdgraph adapters and losses:

- CAP, the cross-attention projector: a ``lift`` that turns a student map into the
  teacher's tokens (3x3 conv + BN + ReLU, positional embedding, learned queries, one per
  teacher position, multi-head cross-attention, LayerNorm + MLP);
- DFM, dual-view feature mimicking: MSE of channel-normalised features, plus MSE after
  removing the direct (zero-frequency) component of the 2-D DCT over the spatial axes;
- TPP, teacher parameter perception, is a path in the distiller (student prefix ->
  frozen teacher suffix) and uses DFM / KL on what comes out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.layouts import FeatureFormat, from_map, resample, to_map
from kdgraph.losses import no_autocast


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


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n x n): X = D @ x transforms along one axis."""
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two axes (scipy.fft.dctn(type=2, norm='ortho'))."""
    dh = dct_matrix(x.shape[-2], x.device, x.dtype)
    dw = dct_matrix(x.shape[-1], x.device, x.dtype)
    return dh @ x @ dw.T


def idct2(X: torch.Tensor) -> torch.Tensor:
    dh = dct_matrix(X.shape[-2], X.device, X.dtype)
    dw = dct_matrix(X.shape[-1], X.device, X.dtype)
    return dh.T @ X @ dw


def remove_direct(x: torch.Tensor) -> torch.Tensor:
    """The feature with its zero-frequency DCT component removed, transformed back."""
    X = dct2(x)
    X = X.clone()
    X[..., 0, 0] = 0
    return idct2(X)


class DualViewFeatureMimicking(nn.Module):
    """DFM: alpha * MSE(direct view) + beta * MSE(alternative view: DC removed).

    Both features are converted to NCHW maps of the teacher's grid (prefix tokens dropped)
    and L2-normalised along channels before comparison. Returns the two terms separately.
    """

    def __init__(self, fmt: FeatureFormat, alpha: float = 0.08, beta: float = 0.06):
        super().__init__()
        self.fmt, self.alpha, self.beta = fmt, alpha, beta

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        with no_autocast(student):
            s, _ = to_map(student.float(), self.fmt)
            t, _ = to_map(teacher.detach().float(), self.fmt)
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
            direct = F.mse_loss(s, t)
            alternative = F.mse_loss(remove_direct(s), remove_direct(t))
        return {"dfm_direct": self.alpha * direct, "dfm_alt": self.beta * alternative}


__all__ = ["CrossAttentionProjector", "DualViewFeatureMimicking", "dct2", "idct2", "remove_direct", "resample"]
