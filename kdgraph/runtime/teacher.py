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

A teacher too big for one device: ``dtype`` (bfloat16, float16) keeps its weights in half the
bytes and runs it in that dtype, outside the caller's autocast, its outputs cast back to
float32 for the losses; ``shard_(mesh)`` shards its parameters over a device mesh with
torch's FSDP2 (``fully_shard``), each rank holding 1/N of every parameter and gathering one
module's at a time as the teacher runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from kdgraph.runtime.chain import Feature, call_segment, side_values
from kdgraph.transforms import Renormalize


def cast_feature(h: Feature, dtype: torch.dtype) -> Feature:
    """The floating-point tensors of a cut's value (a tensor or a tuple) in ``dtype``."""
    if isinstance(h, tuple):
        return tuple(cast_feature(t, dtype) for t in h)
    return h.to(dtype) if h.is_floating_point() else h


class FrozenTeacher:
    """A teacher model and its block segments (which share its submodules), frozen.

    ``normalize`` (a ``kdgraph.transforms.Renormalize``, None: the identity) maps the batch the
    student sees to the teacher's own normalisation, before its first block and its logits.
    ``whole``: the model's own forward may stand for its segments run in order (False where
    the segments hold taps of explicit layer pairs, which only the segments run). ``dtype``:
    what its floating-point weights and buffers are cast to and computed in (its outputs are
    float32 all the same). ``sharded``: ``shard_`` spread its parameters over a device mesh.
    ``side_segment``: a denoiser's, from its side inputs (timestep, class) to the side tensors
    its blocks read (``side``)."""

    def __init__(self, model: nn.Module, segments: Iterable[nn.Module], normalize: Renormalize | None = None,
                 whole: bool = True, dtype: torch.dtype = torch.float32, side_segment: nn.Module | None = None):
        self.model = model
        self.segments = list(segments)
        self.side_segment = side_segment
        self.normalize = normalize  # stays float32: the batch is renormalised before the cast
        self.whole = whole
        self.dtype = dtype
        self.sharded = False
        if dtype != torch.float32:  # in place (param.data), so the segments' shared parameters follow
            self.model._apply(lambda t: cast_feature(t, dtype))
            for seg in self.segments:  # and their own constants, which meet the cast activations
                seg._apply(lambda t: cast_feature(t, dtype))
            # the side segment's own constants (what tracing folded: a sinusoid's frequencies) stay
            # float32: it runs under autocast (``side``), and t * f_k with f_k rounded to bfloat16's
            # 8 bits would be off by up to 0.7 rad at t = 1000 (f_1 = 0.26827 -> 0.26758)
        self.freeze()

    def _graphs(self) -> list[nn.Module]:
        """The segments and the side segment (where there is one)."""
        return self.segments + ([self.side_segment] if self.side_segment is not None else [])

    def freeze(self) -> FrozenTeacher:
        """Eval mode and no parameter gradients, on the model and on every segment (segments
        carry constants of their own, copied by fx; their modules are the model's)."""
        self.model.eval().requires_grad_(False)
        for seg in self._graphs():
            seg.eval()
        return self

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a move or cast (``nn.Module._apply``'s ``fn``) to the teacher's tensors."""
        self.model._apply(fn)
        for seg in self._graphs():
            seg._apply(fn)
        if self.normalize is not None:
            self.normalize.scale, self.normalize.shift = fn(self.normalize.scale), fn(self.normalize.shift)

    def shard_(self, mesh) -> None:
        """Shard the teacher's parameters over ``mesh`` (FSDP2's ``fully_shard``; every rank
        must then run the teacher on as many batches, in the same order).

        The units are the block segments (and a denoiser's side segment, its time embedding),
        which every pass runs (the model's own forward is not used from now on: its modules
        would find their parameters sharded), and inside each,
        every module the segment calls that holds parameters: a unit's parameters are gathered
        just before it runs and freed just after, so a rank holds 1/N of the teacher and one
        module whole. The segment's own unit holds the parameters it reads as attributes
        (class tokens, position embeddings). A teacher whose one segment its own forward stands
        for (a causal LM: one block, its segment a traced graph that calls no module) runs that
        forward instead, each of its repeated layers a unit and the model the root: one decoder
        layer gathered at a time, not the whole model."""
        from torch.distributed.fsdp import fully_shard

        from kdgraph.runtime.sharding import follow_shards, parameter_slots, repeated_layers

        slots = parameter_slots(*self._graphs(), self.model)
        layers = repeated_layers(self.model)
        if self.whole and len(self.segments) == 1 and self.side_segment is None and layers is not None:
            for layer in layers:
                fully_shard(layer, mesh=mesh, reshard_after_forward=True)
            fully_shard(self.model, mesh=mesh, reshard_after_forward=True)
            follow_shards(slots)  # the segment (not run from now on) held the whole parameters
            self.sharded = True
            return
        for seg in self._graphs():  # a denoiser's side segment too: its time embedding's parameters
            graph = getattr(seg, "graph", None)  # a GraphModule (the compiler's segments)
            called = {n.target for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
            for name in sorted(called):
                module = seg.get_submodule(name)
                if any(True for _ in module.parameters()):
                    fully_shard(module, mesh=mesh, reshard_after_forward=True)
            fully_shard(seg, mesh=mesh, reshard_after_forward=True)  # explicit: a root reshards too
        follow_shards(slots)  # the model's own modules (not run from now on) held the whole parameters
        self.whole, self.sharded = False, True

    def parameter_bytes(self) -> int:
        """Bytes of the teacher's parameters held on this rank (its shards, where sharded)."""
        seen: dict[int, torch.Tensor] = {}
        for module in (self.model, *self._graphs()):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        local = (p.to_local() if hasattr(p, "to_local") else p for p in seen.values())
        return sum(t.numel() * t.element_size() for t in local)

    def _own_dtype(self, h: Feature):
        """A half-precision teacher computes in its own dtype, whatever autocast the caller runs
        under on ``h``'s device; a float32 one follows the caller (the run's precision)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        device = (h[0] if isinstance(h, tuple) else h).device.type
        return torch.autocast(device, enabled=False)

    def _in(self, h: Feature) -> Feature:
        """An input in the teacher's dtype (a float32 teacher takes it as it comes)."""
        return h if self.dtype == torch.float32 else cast_feature(h, self.dtype)

    def _out(self, h: Feature) -> Feature:
        """An output as the losses and the student read it: float32 from a half-precision teacher."""
        return h if self.dtype == torch.float32 else cast_feature(h, torch.float32)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch as the teacher wants it (its own normalisation)."""
        return x if self.normalize is None else self.normalize(x)

    @torch.no_grad()
    def side(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The teacher's side tensors (its time embedding) of the side inputs ``inputs``, in its
        dtype (a half-precision teacher computes them under autocast in it)."""
        if self.dtype == torch.float32 or not inputs:
            return side_values(self.side_segment, inputs)
        with torch.autocast(inputs[0].device.type, dtype=self.dtype):
            return {k: cast_feature(v, self.dtype) for k, v in side_values(self.side_segment, inputs).items()}

    @torch.no_grad()
    def features(self, x: torch.Tensor, needed: set[int],
                 side: Mapping[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The teacher's outputs at the block ends in ``needed`` (block k: its logits); ``side``:
        its side tensors (``side``), where it has side inputs (the blocks then run).

        The teacher runs no further than the last needed block. Where its logits alone are
        needed (kd) and ``whole`` (no tap inside the segments: the model's own forward does
        not run them), the model's own forward runs: the same values, without
        the segments' calls. ``no_grad`` rather than ``inference_mode``: the features feed
        student blocks whose backward saves its input, which inference tensors refuse.
        """
        last = len(self.segments)
        h = self._in(self.input(x))
        with self._own_dtype(h):
            if self.whole and needed == {last} and not side:
                return {last: self._out(self.model(h))}
            feats: dict[int, torch.Tensor] = {}
            for i, seg in enumerate(self.segments[:max(needed, default=0)], start=1):
                h = call_segment(seg, h, side)
                if i in needed:
                    feats[i] = self._out(h)
        return feats

    def block(self, i: int, h: torch.Tensor, side: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Block ``i`` (1-based) applied to ``h`` with autograd on ``h`` (the teacher's own
        parameters need no grad): a step of TPP's proxy path from a student feature."""
        with self._own_dtype(h):
            return self._out(call_segment(self.segments[i - 1], self._in(h), side))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (for its top-1; a denoiser's predicted noise, given its side
        inputs); a sharded teacher runs its segments, in order, and so does a half-precision
        denoiser: its side tensors come from ``side`` (the model's own forward would feed its
        float32 time features to half-precision weights), so it predicts what its blocks compute
        in training."""
        if self.sharded or (side and self.dtype != torch.float32):
            last = len(self.segments)
            return self.features(x, {last}, self.side(side) if side else None)[last]
        with self._own_dtype(x):
            return self._out(self.model(self._in(self.input(x)), *side))
