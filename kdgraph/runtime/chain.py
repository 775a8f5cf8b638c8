"""The student as a chain of block segments, shared by training and export.

The compiler splits the student at its block boundaries into segments: GraphModules whose
submodules are the student's own, so running a segment runs (and trains) the student.
``StudentChain`` holds those segments outside any module tree (the owner registers the
student itself, so ``state_dict`` and DDP see each parameter once, under the student's
names) and composes them with a map after some blocks: the trained adapters
(lower(lift(.)), during training) or their folded form (export).

    chain = StudentChain(compiled.student.segments)
    chain.block(2, h)                     # block 2 alone
    chain(x, maps={1: adapter_1})         # the whole student, adapter_1 after block 1

The value at a multi-tensor cut (a U-Net's skips) is the tuple of its tensors: the block
before it returns the tuple, the block after it takes them as arguments (``call_segment``),
and a map after such a block maps the tuple (per tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

Feature = torch.Tensor | tuple[torch.Tensor, ...]  # the value at a cut


def call_segment(segment: nn.Module, h: Feature) -> Feature:
    """``segment`` on the value of a cut: a tensor, or the tuple of a multi-tensor cut's tensors."""
    return segment(*h) if isinstance(h, tuple) else segment(h)


class StudentChain:
    """The student's block segments (a plain object: its owner registers the student)."""

    def __init__(self, segments: Iterable[nn.Module]):
        self.segments = tuple(segments)

    def __len__(self) -> int:
        return len(self.segments)

    def block(self, i: int, h: Feature) -> Feature:
        """Block ``i`` (1-based) applied to ``h``."""
        return call_segment(self.segments[i - 1], h)

    def __call__(self, x: torch.Tensor, maps: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """Every block in order, ``maps[i]`` after block i where there is one."""
        for i, seg in enumerate(self.segments, start=1):
            x = call_segment(seg, x)
            if i in maps:
                x = maps[i](x)
        return x

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A move or cast (``nn.Module._apply``'s ``fn``) reaches the constants fx copied into
        each segment (swin's relative position index), which are not the student's."""
        for seg in self.segments:
            seg._apply(fn)


class ExportedStudent(nn.Module):
    """The student with the folded adapter map after each block that keeps one: what
    ``student.safetensors`` holds in its folded format (keys ``model.*``, ``folded.*``)."""

    def __init__(self, model: nn.Module, segments: Iterable[nn.Module], folded: Mapping[int, nn.Module]):
        super().__init__()
        self.model = model
        self.folded = nn.ModuleDict({str(i): m for i, m in folded.items()})
        self.chain = StudentChain(segments)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.chain.apply_(fn)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain(x, {int(i): m for i, m in self.folded.items()})
