"""The compiler's artifacts that hold built torch objects: a traced model, a model's
segments, the compiled whole. The records they carry (cuts, stages, pairing, plan) are
``kdgraph.ir``'s."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch.fx as fx
from torch import nn

from kdgraph.ir import Boundary, Cut, DataPlan, NodeInfo, Pairing, Plan, SideInput, Stage, graph_json

if TYPE_CHECKING:
    from kdgraph.spec.schema import (
        DataSpec,
        DecomposeSpec,
        DenoiseSpec,
        LossSpec,
        ModelSpec,
        OptimSpec,
        RuntimeSpec,
        ScheduleSpec,
        TeacherSpec,
    )


@dataclass
class TracedModel:
    """An fx GraphModule sharing parameters with ``model``, plus per-node facts."""

    role: str  # "teacher" or "student"
    model: nn.Module
    gm: fx.GraphModule
    input_size: tuple[int, int, int]
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    # Modules traced whole because fx failed inside them: "path (Class): why, file:line: code".
    leaves: tuple[str, ...] = ()
    # Inputs besides the image (a denoiser's timestep and class), graph placeholders 2.. in order.
    side: tuple[SideInput, ...] = ()
    _containers: set[str] | None = field(default=None, repr=False)

    @property
    def order(self) -> list[str]:
        return list(self.nodes)

    def is_container(self, path: str) -> bool:
        """True when the tracer went inside the module (a leaf such as BatchNormAct2d is not)."""
        if self._containers is None:
            self._containers = {p for info in self.nodes.values() for p in info.modules[:-1]}
        return path in self._containers


@dataclass(frozen=True)
class ModelArtifacts:
    """Everything the compiler learnt about one model; each pass returns a new one."""

    role: str
    model: nn.Module
    traced: TracedModel | None = None
    cuts: tuple[Cut, ...] = ()
    stages: tuple[Stage, ...] = ()
    boundaries: tuple[Boundary, ...] = ()
    # The model split at its block boundaries: GraphModules sharing the model's parameters.
    segments: tuple[nn.Module, ...] = ()
    # Side inputs (timestep, class) -> the side tensors the blocks read; None without side inputs.
    side_segment: nn.Module | None = None

    @property
    def heads(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of each output head: the one tensor a forward returns ("out"), or the
        tuple of tensors a model that names them in its ``heads`` attribute returns (an FCN's or
        DeepLabv3's ``("out", "aux")``); () for any other output."""
        out = next(n for n in reversed(self.traced.gm.graph.nodes) if n.op == "output")
        arg = out.args[0]
        if hasattr(arg, "name"):
            return (("out", self.traced.nodes[arg.name].shape),)
        names = getattr(self.model, "heads", None)
        if not isinstance(arg, (tuple, list)) or not isinstance(names, tuple) or len(names) != len(arg) \
                or not all(hasattr(a, "name") for a in arg):
            return ()
        return tuple((name, self.traced.nodes[a.name].shape) for name, a in zip(names, arg))

    @property
    def output_shape(self) -> tuple[int, ...] | None:
        """The traced output's shape (batch included), where the output is one tensor; the first
        (``out``) head's where the model names several."""
        heads = self.heads
        return heads[0][1] if heads else None

    @property
    def output_stride(self) -> int | None:
        """Of (B, C, h, w) logits: how many input pixels one logit spans per side (1 on the
        input's grid; 8 for torchvision's ResNet heads), None where it is not an integer."""
        shape, size = self.output_shape, tuple(self.traced.input_size[1:])
        if not shape or len(shape) != 4 or len(size) != 2 or not shape[2] or size[0] % shape[2]:
            return None
        stride = size[0] // shape[2]
        return stride if stride * shape[3] == size[1] else None

    @property
    def per_pixel(self) -> bool:
        """Per-pixel logits: (B, C, h, w) on the input's grid (a U-Net's masks) or on a coarser
        one at an integer output stride (torchvision's LRASPP or DeepLabv3 heads)."""
        return self.output_stride is not None

    @property
    def num_classes(self) -> int | None:
        shape = self.output_shape
        if self.per_pixel:
            return shape[1]
        return shape[-1] if shape and len(shape) == 2 else None

    @property
    def logits_shape(self) -> list[int] | None:
        """Per-sample logits: [C], or [C, H, W] for a per-pixel task."""
        if self.num_classes is None:
            return None
        return list(self.output_shape[1:]) if self.per_pixel else [self.num_classes]

    def side_tensors(self) -> list[list[dict]]:
        """Per block, the side tensors it reads (node, module, shape without the batch): values
        of the side inputs alone, apart from the cut tensors it is fed."""
        nodes = self.traced.nodes if self.traced else {}
        return [[{"node": n, "module": nodes[n].module, "shape": list(nodes[n].shape[1:]) if nodes[n].shape else None}
                 for n in getattr(seg, "side_inputs", ())] for seg in self.segments]

    def to_dict(self) -> dict:
        side = {"side_inputs": [s.to_dict() for s in self.traced.side], "side_tensors": self.side_tensors()} \
            if self.traced is not None and self.traced.side else {}
        heads = {"heads": [{"name": n, "shape": list(shape[1:])} for n, shape in self.heads]} \
            if self.traced is not None and self.per_pixel else {}
        return {"model": type(self.model).__name__, **side, **heads, "cuts": [c.to_dict() for c in self.cuts],
                "stages": [s.to_dict() for s in self.stages],
                "boundaries": [{"node": b.cut.node, "module": b.cut.label, "rule": b.rule}
                               for b in self.boundaries],
                "leaves": list(self.traced.leaves) if self.traced else []}


@dataclass(frozen=True)
class Models:
    """The teacher (None without one) and the student, and what building them noted."""

    teacher: ModelArtifacts | None
    student: ModelArtifacts
    notes: tuple[str, ...] = ()  # what building the models wants the user to know
    # Weights files that were named but not found, when the caller allowed that (plan, eval).
    missing: tuple[str, ...] = ()

    def each(self) -> tuple[ModelArtifacts, ...]:
        return tuple(a for a in (self.teacher, self.student) if a is not None)

    def map(self, fn: Callable[[ModelArtifacts], ModelArtifacts]) -> Models:
        """A copy with ``fn`` applied to each model's artifacts."""
        return replace(self, teacher=fn(self.teacher) if self.teacher is not None else None,
                       student=fn(self.student))


@dataclass(frozen=True)
class RunRecord:
    """What a run needs of its spec, resolved once by the compiler (``resolve_run``); the
    runtime reads this, never the spec. Torch-free. The sections are the spec's own validated
    sub-models (every default filled in; they are not rewritten); ``teacher`` is the teacher
    source as the command uses it: its ``cache`` only where the command replays it, its
    checkpoint and pretrained weights only where it loads them (an export builds the teacher's
    shapes alone). ``canonical``: the spec as loaded (``Spec.to_dict``), what run.json,
    checkpoints and the resume checks compare."""

    name: str
    seed: int
    output_dir: Path  # where the run writes: the spec's ``output``, else runs/<name>
    source_dir: Path | None  # the spec file's folder, searched first for ``module:`` models
    task: str | None  # the task the spec names (None: inferred; ``Compiled.task`` is the resolved one)
    teacher: TeacherSpec | None
    student: ModelSpec
    data: DataSpec
    decompose: DecomposeSpec
    schedule: ScheduleSpec
    loss: LossSpec
    optim: OptimSpec
    runtime: RuntimeSpec
    denoise: DenoiseSpec | None
    canonical: dict[str, Any] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec as loaded, every default filled in (JSON-compatible; a copy)."""
        return copy.deepcopy(self.canonical)


@dataclass(frozen=True)
class Compiled:
    """The compiler's output: every artifact of every pass, and the run's resolved records."""

    run: RunRecord
    input_size: tuple[int, int, int]
    student: ModelArtifacts
    teacher: ModelArtifacts | None
    data: DataPlan
    pairing: Pairing
    graph: nx.DiGraph  # frozen (nx.freeze)
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what building the models wants the user to know
    # Weights files (or data) that were named but not found, when the caller allowed that (plan, eval).
    missing_weights: tuple[str, ...] = ()
    task: str = "classification"  # its kdgraph.registry.TASKS entry, the spec's or inferred (task_of)

    @property
    def num_classes(self) -> int | None:
        return self.student.num_classes

    def to_dict(self) -> dict:
        """The JSON contract of `kdgraph plan --format json` (keys are kept stable)."""
        return {
            "name": self.run.name,
            "task": self.task,
            "spec": self.run.to_dict(),
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "data": self.data.to_dict(),
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "student": self.student.to_dict(),
            "blocks": [b.to_dict() for b in self.pairing.blocks],
            "pairs": [p.to_dict() for p in self.pairing.pairs],
            "adapters_in_use": self.plan.uses_adapters and bool(self.pairing.adapters),
            "adapters_mode": self.pairing.adapters_mode,
            "schedule": self.plan.to_dict(),
            "graph": graph_json(self.graph),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class BuildMode:
    """How models are built. ``fetch``: roles whose ``pretrained: true`` weights are fetched
    (the others get random weights of the same shapes); ``allow_missing``: a checkpoint file
    or image folder that does not exist yet is listed, not an error (planning needs shapes
    only); ``materialize=False``: parameters on the meta device, checkpoints checked from
    their headers, nothing fetched (`kdgraph plan`); ``defer``: roles built as for planning
    whatever ``materialize`` says (a teacher whose logits a cache replays in every stage);
    ``read_cache``: the teacher cache the spec names is checked and replayed (False: the plan
    runs the teacher live, as `eval`, `export` and `cache` compile it); ``teacher_weights``:
    the teacher's checkpoint and pretrained weights are loaded (False: random weights of its
    shapes, all that pairing needs; `export`)."""

    fetch: frozenset[str] = frozenset()
    allow_missing: bool = False
    materialize: bool = True
    defer: frozenset[str] = frozenset()
    read_cache: bool = True
    teacher_weights: bool = True
