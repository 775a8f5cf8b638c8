"""Adapters: the 1x1 projectors between student and teacher widths, and their folding.

``lift`` maps the student's Cs channels to the teacher's Ct (compared with the teacher's
feature by MSE); ``lower`` maps Ct back to Cs (feeds a student block the teacher's
feature). Both are linear (BN in eval mode is affine), so the inference path
``lower(lift(x))`` folds into one exact Cs -> Cs map at export. At a multi-tensor cut (a
U-Net's skips) each tensor has its own pair (``TupleAdapterPair``) and folds to its own map
(``TupleMap``); a tensor whose widths agree passes unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kdgraph.layouts import FormatAdapter
from kdgraph.scalekd import CrossAttentionProjector

if TYPE_CHECKING:
    from kdgraph.ir import AdapterSpec, Pairing, TupleAdapterSpec


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


class TupleMap(nn.Module):
    """One map per tensor of a multi-tensor cut's tuple (keyed by position); the tensors
    without one pass unchanged."""

    def __init__(self, maps: dict[int, nn.Module], size: int):
        super().__init__()
        self.size = size
        self.maps = nn.ModuleDict({str(j): m for j, m in maps.items()})

    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(xs) != self.size:
            raise ValueError(f"expected the {self.size} tensors of a multi-tensor cut, got {len(xs)}")
        return tuple(self.maps[str(j)](x) if str(j) in self.maps else x for j, x in enumerate(xs))


class TupleAdapterPair(nn.Module):
    """The adapter pairs of a multi-tensor cut: lift and lower map its tuple, each tensor
    with its own pair (``pairs``, keyed by position)."""

    def __init__(self, spec: TupleAdapterSpec):
        super().__init__()
        self.spec = spec
        self.pairs = nn.ModuleDict({str(j): AdapterPair(p) for j, p in enumerate(spec.parts) if p is not None})
        self.size = len(spec.parts)

    def _map(self, xs: tuple[torch.Tensor, ...], side: str) -> tuple[torch.Tensor, ...]:
        if len(xs) != self.size:
            raise ValueError(f"expected the {self.size} tensors of a multi-tensor cut, got {len(xs)}")
        return tuple(getattr(self.pairs[str(j)], side)(x) if str(j) in self.pairs else x for j, x in enumerate(xs))

    def lift(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each student tensor to the teacher's width."""
        return self._map(xs, "lift")

    def lower(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each teacher tensor to the student's width."""
        return self._map(xs, "lower")

    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.lower(self.lift(xs))


def build_adapters(pairing: Pairing) -> nn.ModuleDict:
    """One AdapterPair per block end whose widths differ (a TupleAdapterPair at a
    multi-tensor cut), keyed by the block index."""
    return nn.ModuleDict({str(a.index): TupleAdapterPair(a) if hasattr(a, "parts") else AdapterPair(a)
                          for a in pairing.adapters})


def build_pair_lifts(pairing: Pairing) -> nn.ModuleDict:
    """The lift of each explicit layer pair whose features differ (the student side of its
    loss; a pair has no lower), keyed by its lift node (``xlift_p1``)."""
    lifts = {}
    for pair in pairing.pairs:
        a = pair.adapter
        if a is not None:
            lifts[f"xlift_{pair.name}"] = ChannelMap(a.student_channels, a.teacher_channels, a.kind) if a.foldable \
                else FormatAdapter(a.student_format, a.teacher_format)
    return nn.ModuleDict(lifts)


@torch.no_grad()
def fold(pair: AdapterPair) -> nn.Module:
    """One Cs -> Cs module equal to ``pair`` in eval mode: W = W2 W1, b = W2 b1 + b2.

    Format and CAP adapters resample or attend, so they do not fold: they are kept as they are.
    The pairs of a multi-tensor cut fold one by one into a TupleMap.
    """
    if isinstance(pair, TupleAdapterPair):
        return TupleMap({int(j): fold(p) for j, p in pair.pairs.items()}, pair.size)
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
