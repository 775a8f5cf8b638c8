"""Adapters: the 1x1 projectors between student and teacher widths, and their folding.

``lift`` maps the student's Cs channels to the teacher's Ct (compared with the teacher's
feature by MSE); ``lower`` maps Ct back to Cs (feeds a student block the teacher's
feature). Both are linear (BN in eval mode is affine), so the inference path
``lower(lift(x))`` folds into one exact Cs -> Cs map at export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kdgraph.layouts import FormatAdapter
from kdgraph.scalekd import CrossAttentionProjector

if TYPE_CHECKING:
    from kdgraph.compiler.pair import AdapterSpec, Pairing


class ChannelMap(nn.Module):
    """A linear map over channels: 1x1 conv + BN on NCHW maps, Linear on channel-last tensors."""

    def __init__(self, cin: int, cout: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "conv1x1":
            self.conv = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn = nn.BatchNorm2d(cout)
        else:
            self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv1x1":
            return self.bn(self.conv(x))
        return self.linear(x)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with forward(x) == W x + b per position, in eval mode."""
        if self.kind == "conv1x1":
            scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            w = self.conv.weight.flatten(1) * scale[:, None]
            return w, self.bn.bias - scale * self.bn.running_mean
        return self.linear.weight.clone(), self.linear.bias.clone()


class AdapterPair(nn.Module):
    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        if spec.foldable:
            self.lift = ChannelMap(spec.student_channels, spec.teacher_channels, spec.kind)
            self.lower = ChannelMap(spec.teacher_channels, spec.student_channels, spec.kind)
            return
        src, dst = spec.student_format, spec.teacher_format
        self.lift = CrossAttentionProjector(src, dst) if spec.kind == "cap" else FormatAdapter(src, dst)
        self.lower = FormatAdapter(dst, src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's inference path through the pair: lower(lift(x))."""
        return self.lower(self.lift(x))


def build_adapters(pairing: Pairing) -> nn.ModuleDict:
    """One AdapterPair per block end whose widths differ, keyed by the block index."""
    return nn.ModuleDict({str(a.index): AdapterPair(a) for a in pairing.adapters})


@torch.no_grad()
def fold(pair: AdapterPair) -> nn.Module:
    """One Cs -> Cs module equal to ``pair`` in eval mode: W = W2 W1, b = W2 b1 + b2.

    Format and CAP adapters resample or attend, so they do not fold: they are kept as they are.
    """
    if not pair.spec.foldable:
        return pair
    w1, b1 = pair.lift.affine()
    w2, b2 = pair.lower.affine()
    w, b = w2 @ w1, w2 @ b1 + b2
    if pair.lift.kind == "conv1x1":
        out = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=True)
        out.weight.copy_(w[:, :, None, None])
    else:
        out = nn.Linear(w.shape[1], w.shape[0])
        out.weight.copy_(w)
    out.bias.copy_(b)
    return out
