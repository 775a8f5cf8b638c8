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


def call_segment(segment: nn.Module, h: Feature) -> Feature:
    """``segment`` on the value of a cut: a tensor, or the tuple of a multi-tensor cut's tensors."""
    return segment(*h) if isinstance(h, tuple) else segment(h)


def run_program(program: Program, x: torch.Tensor, run_op: Callable[[Op, list[Any]], Any],
                labels: torch.Tensor | None = None, whole: nn.Module | None = None) -> Any:
    """Execute ``program`` on input ``x`` (and ``labels``): each op in order, ``run_op(op,
    inputs)`` giving the value of ``op.node``; returns the value of ``program.output``.

    ``whole``: the model the program's blocks were cut from. A program of student blocks
    alone, in order, is that model's forward (the split pass guarantees it), so ``whole(x)``
    runs instead: the same function, without the segments' calls."""
    if whole is not None and all(op.kind == "student" for op in program.ops):
        return whole(x)
    values: dict[str, Any] = {"input": x, "labels": labels}
    for op in program.ops:
        values[op.node] = run_op(op, [values[n] for n in op.inputs])
    return values.get(program.output)


class StudentChain:
    """The student's block segments (a plain object: its owner registers the student)."""

    def __init__(self, segments: Iterable[nn.Module]):
        self.segments = tuple(segments)

    def block(self, i: int, h: Feature) -> Feature:
        """Block ``i`` (1-based) applied to ``h``."""
        return call_segment(self.segments[i - 1], h)

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A move or cast (``nn.Module._apply``'s ``fn``) reaches the constants fx copied into
        each segment (swin's relative position index), which are not the student's."""
        for seg in self.segments:
            seg._apply(fn)


class ExportedStudent(nn.Module):
    """The student with the folded adapter map after each block that keeps one: what
    ``student.safetensors`` holds in its folded format (keys ``model.*``, ``folded.*``). It
    runs ``program``, the plan's inference program with each adapter pair folded
    (``Program.folded``)."""

    def __init__(self, model: nn.Module, segments: Iterable[nn.Module], folded: Mapping[int, nn.Module],
                 program: Program):
        super().__init__()
        self.model = model
        self.folded = nn.ModuleDict({str(i): m for i, m in folded.items()})
        self.chain = StudentChain(segments)
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
        return cls(compiled.student.model, compiled.student.segments, folded, program)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.chain.apply_(fn)
        return self

    def _run_op(self, op: Op, inputs: list[Any]) -> Any:
        if op.kind == "student":
            return self.chain.block(op.block, inputs[0])
        return self.folded[str(op.block)](inputs[0])  # "folded": one map for the lift/lower pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_program(self.program, x, self._run_op, whole=self.model)
