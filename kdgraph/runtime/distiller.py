"""The distiller: one nn.Module whose forward is the loss of one training stage.

It holds the student and the adapters as submodules, so that DDP, the optimizer and
checkpoints see exactly the trainable state; the student's block segments (a
``StudentChain``) share its parameters. The teacher is a ``FrozenTeacher``, a plain
object: always in eval mode, never trained, recalibrated, saved or wrapped.

Everything it runs is a program of the plan (``kdgraph.ir.Program``), read from the block
graph by the compiler: ``set_stage`` loads a training stage's program and its inference
program; ``forward(x, y)`` executes the first and returns the named loss terms,
``inference(x)`` the second (evaluation, BatchNorm recalibration, export). Each op kind is
one entry of ``OP_KINDS``; each loss op builds its module from the op's ``entry`` and
``params`` (``kdgraph.losses.create_loss``): the distiller never reads the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdgraph.adapters import build_adapters, build_pair_lifts
from kdgraph.compiler.split import TAP_PREFIX, Tap
from kdgraph.ir import Op, TrainingStage
from kdgraph.losses import create_loss
from kdgraph.projection import build_projections, fit_projections
from kdgraph.registry import Registry
from kdgraph.runtime.chain import StudentChain, run_program
from kdgraph.runtime.teacher import FrozenTeacher
from kdgraph.transforms import Renormalize

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled

@dataclass
class StepState:
    """What the ops of one program run share: the loss terms written so far, the teacher's
    block outputs of this batch (one no-grad pass, up to the last block the program reads),
    and the teacher's logits of this batch replayed from a cache (where a stage reads one)."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[int, torch.Tensor] = field(default_factory=dict)
    cached: Any = None
    progress: torch.Tensor | float | None = None  # epochs done by the end of this step (losses with ``progress``)
    # a denoiser's side inputs (timestep, class) and their side tensors (its time embedding), by
    # graph node: the student's (with autograd) and the teacher's; every block reads its share
    side_inputs: tuple[torch.Tensor, ...] = ()
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_side: dict[str, torch.Tensor] = field(default_factory=dict)


OpFn = Callable[["Distiller", Op, list[Any], StepState], Any]
OP_KINDS: Registry[OpFn] = Registry("program op kind")
"""An op's ``kind`` -> ``fn(distiller, op, inputs, state)``: the value of ``op.node`` (a loss
op adds its terms to ``state.terms``). A new kind of op (a cached teacher, say) is one entry
here and one kind of node in the block graph."""


def teacher_normalize(compiled: Compiled) -> Renormalize | None:
    """The map from the student's normalisation to the teacher's, where the plan gives the
    teacher its own (``DataPlan.teacher_mean``); None where both see the same batch."""
    data = compiled.data
    if data is None or data.teacher_mean is None:
        return None
    return Renormalize(data.mean, data.std, data.teacher_mean, data.teacher_std)


def frozen_teacher(compiled: Compiled) -> FrozenTeacher:
    """The run's teacher as every step reads it: its own input normalisation, its own
    forward standing for its segments only where none holds a tap (explicit pairs), its
    weights in the plan's teacher dtype. The teacher-cache builder builds it here too, so a
    cache holds these very logits."""
    return FrozenTeacher(compiled.teacher.model, compiled.teacher.segments, teacher_normalize(compiled),
                         whole=not any(isinstance(m, Tap) for seg in compiled.teacher.segments
                                       for m in seg.children()),
                         dtype=getattr(torch, compiled.plan.teacher_dtype), side_segment=compiled.teacher.side_segment)


class Distiller(nn.Module):
    def __init__(self, compiled: Compiled):
        super().__init__()
        plan = compiled.plan
        self.student = compiled.student.model
        self.adapters = build_adapters(compiled.pairing) if plan.uses_adapters else nn.ModuleDict()
        # decompose.adapters: projected: the teacher's features in the student's format, frozen
        # buffers fitted once before stage 0 (``fit_projections``), saved with the checkpoints.
        self.projections = build_projections(compiled.pairing) if plan.projection_fit is not None else nn.ModuleDict()
        # Kept out of the module tree: state_dict and DDP see every parameter once, under the
        # student's own names.
        self.chain = StudentChain(compiled.student.segments, compiled.student.side_segment)
        # A plain object: nn.Module.__setattr__ registers modules only, so the teacher stays
        # out of train()/eval(), modules(), parameters(), state_dict() and DDP. None where no
        # stage runs it (a teacher cache replays its logits in every stage).
        self.teacher = frozen_teacher(compiled) if compiled.teacher and plan.live_teacher else None
        # Every loss op of every stage, built from the op alone. A plain dict: losses hold no
        # state, and stay out of the module tree (checkpoints, DDP).
        # Explicit layer pairs: the student side's lifts (trained), and the taps inside the
        # blocks of both models (in their segments, outside every module tree), by graph node.
        self.pair_lifts = build_pair_lifts(compiled.pairing)
        segments = list(self.chain.segments) + (list(self.teacher.segments) if self.teacher else [])
        self.taps: dict[str, Tap] = {name.removeprefix(TAP_PREFIX): m for seg in segments
                                     for name, m in seg.named_children() if isinstance(m, Tap)}
        self.losses: dict[str, nn.Module] = {
            op.node: create_loss(op.entry, dict(op.params))
            for st in plan.stages for op in st.program.ops if op.kind == "loss"}
        self.set_stage(plan.stages[0])

    def _apply(self, fn, recurse=True):
        """Moves and casts reach the segments' own constants (fx copies plain tensor
        attributes such as swin's relative position index into each segment) and the
        unregistered teacher too."""
        super()._apply(fn, recurse)
        self.chain.apply_(fn)
        if self.teacher is not None:
            self.teacher.apply_(fn)
        return self

    def set_stage(self, stage: TrainingStage) -> None:
        """Run ``stage``'s programs from now on."""
        self.groups = stage.groups
        self.program = stage.program
        self.inference_program = stage.inference
        self._teacher_blocks = set(self.program.teacher_reads)
        if self.teacher is not None:
            self.teacher.freeze()  # whatever happened to it since (a user's .train()), eval again

    @property
    def needs_progress(self) -> bool:
        """Some loss of the plan declares ``progress`` (DKD's warm-up): the caller passes it."""
        return any(getattr(loss, "progress", False) for loss in self.losses.values())

    @property
    def adapters_in_inference(self) -> tuple[int, ...]:
        """The blocks whose adapter pair stays in the student's inference path (export folds them)."""
        return self.inference_program.adapter_blocks

    @property
    def projections_fitted(self) -> bool:
        """Every projection holds its fit (none to fit counts as fitted)."""
        return all(bool(p.fitted) for p in self.projections.values())

    def fit_projections(self, batches, limit: int) -> int:
        """The plan's projection fit: the PCA of the teacher's features on the first ``limit``
        training batches (a denoiser's: (x_t, ε, side inputs), its teacher fed its side tensors),
        frozen afterwards. Returns the batches used."""
        def features(x: torch.Tensor, blocks: set[int], side: tuple[torch.Tensor, ...] = ()) -> dict:
            return self.teacher.features(x, blocks, self.teacher.side(side) if side else None)
        return fit_projections(self.projections, features, batches, limit)

    def teacher_features(self, x: torch.Tensor, side: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The frozen teacher's outputs at the block ends this stage's program reads (block k:
        its logits), computed without autograd; ``side``: its side tensors (a denoiser's)."""
        if side:
            return self.teacher.features(x, self._teacher_blocks, side)
        return self.teacher.features(x, self._teacher_blocks)  # a model without side inputs: called as it always was

    def inference(self, x: torch.Tensor, side: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """The student as it will be exported: the stage's inference program (``side``: a
        denoiser's timestep and class)."""
        state = StepState(side_inputs=side, side=self.chain.side(side) if side else {})
        return run_program(self.inference_program, x, lambda op, inputs: self.run_op(op, inputs, state),
                           whole=self.student, side=side)

    def forward(self, x: torch.Tensor, y: torch.Tensor, cached: Any = None,
                progress: torch.Tensor | float | None = None, side: tuple[torch.Tensor, ...] = ()
                ) -> dict[str, torch.Tensor]:
        """Loss terms of the current stage: its program, op by op. No gradient crosses groups:
        each group starts from the input or from a (no-grad) teacher feature. ``cached``: the
        teacher's logits of this batch from a teacher cache, for a stage whose program reads it
        (``TeacherCache.batch``). ``progress``, the epochs done by the end of this step
        (fractional; a 0-dim tensor keeps a compiled step from recompiling), reaches the losses
        that declare ``progress`` (DKD's warm-up). ``side``: a denoiser's side inputs (timestep,
        class): every student block is fed the student's side tensors of them, every teacher
        block the teacher's."""
        for tap in self.taps.values():
            tap.armed = True
        try:
            teacher_side = self.teacher.side(side) if side and self.teacher is not None else {}
            state = StepState(teacher=self.teacher_features(x, teacher_side) if self._teacher_blocks else {},
                              cached=cached, progress=progress, side_inputs=side,
                              side=self.chain.side(side) if side else {}, teacher_side=teacher_side)
            run_program(self.program, x, lambda op, inputs: self.run_op(op, inputs, state), labels=y)
        finally:
            for tap in self.taps.values():
                tap.armed, tap.value = False, None
        return state.terms

    def run_op(self, op: Op, inputs: list[Any], state: StepState) -> Any:
        """One operation of a program: the value of ``op.node`` (a loss adds to ``state.terms``)."""
        return OP_KINDS.get(op.kind)(self, op, inputs, state)


# -- the operations of a program ------------------------------------------------------------

@OP_KINDS.register("teacher")
def _teacher(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    """Teacher block ``op.block``, from the batch's one no-grad teacher pass (None for a block
    that only feeds later teacher blocks)."""
    return state.teacher.get(op.block)


@OP_KINDS.register("cache")
def _cache(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    """The teacher's logits of this batch's views, replayed: float32 logits (a full cache) or
    (probabilities, indices) of the top k (a top-k cache), as the trainer read them."""
    if state.cached is None:
        raise RuntimeError(f"{op.node}: the stage replays a teacher cache, but no cached logits came with the batch")
    return state.cached


@OP_KINDS.register("student")
def _student(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    return d.chain.block(op.block, inputs[0], state.side) if state.side else d.chain.block(op.block, inputs[0])


@OP_KINDS.register("whole")
def _whole(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    """The whole student on the input: its last block's output, the student's own forward in
    place of its blocks run in order (``kdgraph.compiler.program.whole_student``)."""
    return d.student(inputs[0], *state.side_inputs)


@OP_KINDS.register("lift")
def _lift(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    return d.adapters[str(op.block)].lift(inputs[0])


@OP_KINDS.register("lower")
def _lower(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    return d.adapters[str(op.block)].lower(inputs[0])


@OP_KINDS.register("project")
def _project(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    """The teacher's feature at block ``op.block``'s end in the student's format (frozen)."""
    with torch.no_grad():
        return d.projections[str(op.block)](inputs[0])


@OP_KINDS.register("tap")
def _tap(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    """An explicit layer pair's feature: what the tap inside block ``op.block`` kept when the
    block ran, or the block's output itself where the pair's cut is the block's end."""
    tap = d.taps.get(op.node)
    return inputs[0] if tap is None else tap.value


@OP_KINDS.register("pair_lift")
def _pair_lift(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    return d.pair_lifts[op.node](inputs[0])


@OP_KINDS.register("proxy")
def _proxy(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> Any:
    """TPP: teacher block ``op.block`` on the student's (lifted) feature; the teacher's
    parameters need no grad, gradients reach lift and the student."""
    if state.teacher_side:
        return d.teacher.block(op.block, inputs[0], state.teacher_side)
    return d.teacher.block(op.block, inputs[0])


@OP_KINDS.register("loss")
def _loss(d: Distiller, op: Op, inputs: list[Any], state: StepState) -> None:
    """The op's loss module on its inputs; its values, in the order of its terms, are logged
    under the op's term names."""
    loss = d.losses[op.node]
    out = loss(*inputs, progress=state.progress) if getattr(loss, "progress", False) else loss(*inputs)
    state.terms.update(zip(op.terms, out.values() if isinstance(out, Mapping) else (out,)))
