"""The frozen teacher: eval mode, no gradients, outside every module tree.

A distillation run reads the teacher; it never trains it. ``FrozenTeacher`` is a plain
object, not an ``nn.Module``, so that nothing that walks the student's module tree
reaches it: ``distiller.train()`` leaves its BatchNorm, dropout and drop-path in eval
mode, BatchNorm re-estimation never resets its statistics, ``state_dict`` (and so every
checkpoint) holds no teacher tensor, and DDP neither wraps it nor broadcasts its buffers.

    teacher = FrozenTeacher(model, segments, normalize)  # normalize: the student's input -> the teacher's
    teacher.apply_(fn)                  # a move or cast of its owner reaches it
    feats = teacher.features(x, {2, 4}) # block ends 2 and 4, computed without autograd
    z = teacher.block(4, h)             # block 4 with autograd on h (TPP's proxy path)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from kdgraph.runtime.chain import call_segment, side_values
from kdgraph.transforms import Renormalize


class FrozenTeacher:
    """A teacher model and its block segments (which share its submodules), frozen.

    ``normalize`` (a ``kdgraph.transforms.Renormalize``, None: the identity) maps the batch the
    student sees to the teacher's own normalisation, before its first block and its logits."""

    def __init__(self, model: nn.Module, segments: Iterable[nn.Module], normalize: Renormalize | None = None,
                 side_segment: nn.Module | None = None):
        self.model = model
        self.segments = list(segments)
        self.side_segment = side_segment  # a denoiser's: timestep and class -> the side tensors its blocks read
        self.normalize = normalize
        self.freeze()

    def freeze(self) -> FrozenTeacher:
        """Eval mode and no parameter gradients, on the model and on every segment (segments
        carry constants of their own, copied by fx; their modules are the model's)."""
        self.model.eval().requires_grad_(False)
        for seg in self.segments + ([self.side_segment] if self.side_segment is not None else []):
            seg.eval()
        return self

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a move or cast (``nn.Module._apply``'s ``fn``) to the teacher's tensors."""
        self.model._apply(fn)
        for seg in self.segments + ([self.side_segment] if self.side_segment is not None else []):
            seg._apply(fn)
        if self.normalize is not None:
            self.normalize.scale, self.normalize.shift = fn(self.normalize.scale), fn(self.normalize.shift)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch as the teacher wants it (its own normalisation)."""
        return x if self.normalize is None else self.normalize(x)

    @torch.no_grad()
    def side(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The teacher's side tensors (its time embedding) of the side inputs ``inputs``."""
        return side_values(self.side_segment, inputs)

    @torch.no_grad()
    def features(self, x: torch.Tensor, needed: set[int],
                 side: Mapping[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The teacher's outputs at the block ends in ``needed`` (block k: its logits); ``side``:
        its side tensors (``side``), where it has side inputs.

        The teacher runs no further than the last needed block. ``no_grad`` rather than
        ``inference_mode``: the features feed student blocks whose backward saves its
        input, which inference tensors refuse.
        """
        feats: dict[int, torch.Tensor] = {}
        h = self.input(x)
        for i, seg in enumerate(self.segments[:max(needed, default=0)], start=1):
            h = call_segment(seg, h, side)
            if i in needed:
                feats[i] = h
        return feats

    def block(self, i: int, h: torch.Tensor, side: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Block ``i`` (1-based) applied to ``h`` with autograd on ``h`` (the teacher's own
        parameters need no grad): a step of TPP's proxy path from a student feature."""
        return call_segment(self.segments[i - 1], h, side)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (for its top-1; a denoiser's noise prediction, given its side inputs)."""
        return self.model(self.input(x), *side)
