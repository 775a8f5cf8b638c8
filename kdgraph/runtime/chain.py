"""The student as block segments, and the executor of the plan's programs.

The compiler splits the student at its block boundaries into segments: GraphModules whose
submodules are the student's own, so running a segment runs (and trains) the student.
``StudentChain`` holds those segments outside any module tree (the owner registers the
student itself, so ``state_dict`` and DDP see each parameter once, under the student's
names). ``run_program`` executes a program of the plan (``kdgraph.ir.Program``) op by op:
the distiller's training and inference programs, and the exported student's folded one.

    chain = StudentChain(compiled.student.segments)
    chain.block(2, h)                                   # block 2 alone
    run_program(stage.inference, x, run_op)             # the student, as the plan wires it

The value at a multi-tensor cut (a U-Net's skips) is the tuple of its tensors: the block
before it returns the tuple, the block after it takes them as arguments (``call_segment``),
and an adapter after such a block maps the tuple (per tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdgraph.errors import KDGraphError
from kdgraph.ir import Op, Program

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled

Feature = torch.Tensor | tuple[torch.Tensor, ...]  # the value at a cut


def call_segment(segment: nn.Module, h: Feature, side: Mapping[str, torch.Tensor] | None = None) -> Feature:
    """``segment`` on the value of a cut: a tensor, or the tuple of a multi-tensor cut's tensors;
    then the side tensors it reads (``segment.side_inputs``), taken from ``side`` (``side_values``)."""
    args = h if isinstance(h, tuple) else (h,)
    names = getattr(segment, "side_inputs", ())
    if names:
        args = (*args, *(side[n] for n in names))
    return segment(*args)


def side_values(side_segment: nn.Module | None, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The side tensors every block may read (the time embedding, by graph node name), computed
    once from the batch's side inputs (timestep, class); {} for a model without side inputs."""
    if side_segment is None:
        return {}
    return dict(zip(side_segment.side_outputs, side_segment(*inputs)))


def run_program(program: Program, x: torch.Tensor, run_op: Callable[[Op, list[Any]], Any],
                labels: torch.Tensor | None = None, whole: nn.Module | None = None,
                side: tuple[torch.Tensor, ...] = ()) -> Any:
    """Execute ``program`` on input ``x`` (and ``labels``): each op in order, ``run_op(op,
    inputs)`` giving the value of ``op.node``; returns the value of ``program.output``.

    ``whole``: the model the program's blocks were cut from. A program of student blocks
    alone, in order, is that model's forward (the split pass guarantees it), so ``whole(x,
    *side)`` runs instead: the same function, without the segments' calls. ``side``: the
    model's side inputs (a denoiser's timestep and class); ``run_op`` reads them from its own
    state, ``whole`` takes them as arguments."""
    if whole is not None and all(op.kind == "student" for op in program.ops):
        return whole(x, *side)
    values: dict[str, Any] = {"input": x, "labels": labels}
    for op in program.ops:
        values[op.node] = run_op(op, [values[n] for n in op.inputs])
    return values.get(program.output)


class StudentChain:
    """The student's block segments (a plain object: its owner registers the student)."""

    def __init__(self, segments: Iterable[nn.Module], side_segment: nn.Module | None = None):
        self.segments = tuple(segments)
        self.side_segment = side_segment

    def block(self, i: int, h: Feature, side: Mapping[str, torch.Tensor] | None = None) -> Feature:
        """Block ``i`` (1-based) applied to ``h`` (and the side tensors it reads, from ``side``)."""
        return call_segment(self.segments[i - 1], h, side)

    def side(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The side tensors of the side inputs ``inputs``, with autograd (the student's time
        embedding is trained by every block that reads it)."""
        return side_values(self.side_segment, inputs)

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A move or cast (``nn.Module._apply``'s ``fn``) reaches the constants fx copied into
        each segment (swin's relative position index), which are not the student's."""
        for seg in (*self.segments, *([self.side_segment] if self.side_segment is not None else [])):
            seg._apply(fn)


class ExportedStudent(nn.Module):
    """The student with the folded adapter map after each block that keeps one: what
    ``student.safetensors`` holds in its folded format (keys ``model.*``, ``folded.*``). It
    runs ``program``, the plan's inference program with each adapter pair folded
    (``Program.folded``)."""

    def __init__(self, model: nn.Module, segments: Iterable[nn.Module], folded: Mapping[int, nn.Module],
                 program: Program, side_segment: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.folded = nn.ModuleDict({str(i): m for i, m in folded.items()})
        self.chain = StudentChain(segments, side_segment)
        self.program = program

    @classmethod
    def of(cls, compiled: Compiled, folded: Mapping[int, nn.Module]) -> ExportedStudent:
        """The exported student of ``compiled``'s plan with the folded maps ``folded`` (keyed by
        block): the last stage's inference program, its adapter pairs folded."""
        program = compiled.plan.stages[-1].inference.folded()
        keeps = {op.block for op in program.ops if op.kind == "folded"}
        if set(folded) != keeps:
            raise KDGraphError(f"the student was trained with adapters after blocks {sorted(folded)}, but this "
                               f"spec's plan keeps them after blocks {sorted(keeps)}: use the spec it was trained with")
        return cls(compiled.student.model, compiled.student.segments, folded, program, compiled.student.side_segment)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.chain.apply_(fn)
        return self

    def _run_op(self, op: Op, inputs: list[Any], side: Mapping[str, torch.Tensor]) -> Any:
        if op.kind == "student":
            return self.chain.block(op.block, inputs[0], side)
        return self.folded[str(op.block)](inputs[0])  # "folded": one map for the lift/lower pair

    def forward(self, x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
        """The student on ``x`` (and a denoiser's side inputs: timestep, class)."""
        values = self.chain.side(side) if side else {}
        return run_program(self.program, x, lambda op, inputs: self._run_op(op, inputs, values), whole=self.model,
                           side=side)
