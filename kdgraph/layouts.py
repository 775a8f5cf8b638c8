"""Feature formats and the conversions between them (cross-architecture adapters).

A feature is NCHW (CNN maps), NHWC (Swin, ConvNeXt norms) or tokens (B x N x C, with
``prefix`` class/register tokens before the h*w patch tokens). Every format converts to
a canonical NCHW map and back, and maps resample between grids, so a ViT teacher's
tokens can feed a CNN student block and a CNN's map can be compared with a ViT's tokens.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.ir import FeatureFormat



def to_map(x: torch.Tensor, fmt: FeatureFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, h, w) map and the prefix tokens (B, p, C) or None."""
    if fmt.layout == "NCHW":
        return x, None
    if fmt.layout == "NHWC":
        return x.permute(0, 3, 1, 2), None
    h, w = fmt.hw
    prefix = x[:, : fmt.prefix] if fmt.prefix else None
    patches = x[:, fmt.prefix:]
    return patches.transpose(1, 2).reshape(x.shape[0], fmt.channels, h, w), prefix


def from_map(m: torch.Tensor, fmt: FeatureFormat, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``to_map``: a (B, C, h, w) map in ``fmt``'s layout (prefix tokens prepended)."""
    if fmt.layout == "NCHW":
        return m
    if fmt.layout == "NHWC":
        return m.permute(0, 2, 3, 1)
    tokens = m.flatten(2).transpose(1, 2)
    if fmt.prefix:
        tokens = torch.cat([prefix.expand(m.shape[0], -1, -1), tokens], dim=1)
    return tokens


def resample(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a map to ``hw`` (area averaging when shrinking by an integer factor)."""
    if tuple(m.shape[-2:]) == tuple(hw):
        return m
    h, w = m.shape[-2:]
    if h % hw[0] == 0 and w % hw[1] == 0 and h >= hw[0] and w >= hw[1]:
        return F.adaptive_avg_pool2d(m, hw)
    return F.interpolate(m, size=hw, mode="bilinear", align_corners=False)


class FormatAdapter(nn.Module):
    """src -> dst across layouts and grids: to map, resample, 1x1 conv + BN, to dst's layout.

    Prefix tokens of a token destination are learned (one parameter per prefix token); a
    token source's prefix tokens are dropped (the patch grid carries the spatial content).
    """

    @staticmethod
    def count_params(src: FeatureFormat, dst: FeatureFormat) -> int:
        """Parameters of ``FormatAdapter(src, dst)``, without building it: the bias-free 1x1
        conv, BN's weight and bias, and the learned prefix tokens."""
        return src.channels * dst.channels + 2 * dst.channels + dst.prefix * dst.channels

    def __init__(self, src: FeatureFormat, dst: FeatureFormat):
        super().__init__()
        self.src, self.dst = src, dst
        self.proj = nn.Sequential(nn.Conv2d(src.channels, dst.channels, 1, bias=False), nn.BatchNorm2d(dst.channels))
        self.prefix = nn.Parameter(torch.zeros(1, dst.prefix, dst.channels)) if dst.prefix else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, _ = to_map(x, self.src)
        m = m.contiguous()
        # Resampling and a 1x1 projection commute; project on the smaller grid.
        if self.dst.hw[0] * self.dst.hw[1] < self.src.hw[0] * self.src.hw[1]:
            m = self.proj(resample(m, self.dst.hw))
        else:
            m = resample(self.proj(m), self.dst.hw)
        return from_map(m, self.dst, self.prefix)
