"""The compiler: an ordered list of passes from a spec to a plan, checked between passes.

    Spec -> models -> DataPlan -> TracedModel -> Cuts -> Stages -> boundaries -> Pairing
         -> BlockGraph -> Plan

Each pass is a plain function of the artifacts before it. ``compile_spec`` runs them in
order, times them and runs the invariant checker after each; a failed check names the
pass that broke it. Everything here runs on the CPU in seconds, decodes no data (an image
folder is listed and checked, to choose its loader) and touches no network: pretrained
weights are fetched only where a caller asks (training, evaluation). Planning alone
(``materialize=False``, as `kdgraph plan` does) builds the models with their parameters on
the meta device and propagates shapes on meta tensors: no weight is allocated, initialised
or read, so a billion-parameter teacher plans in about a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path
from dataclasses import dataclass, field

import networkx as nx
from torch import nn

from .blockgraph import build_block_graph
from .cuts import Cut, find_cuts
from .data import resolve_input_size
from .errors import PlanError
from .match import Pairing, boundaries_for, pair_blocks
from .models import build_model, create_model, holds_meta
from .plan import Plan, build_plan
from .segments import split_segments
from .spec import Spec
from .stages import Boundary, Stage, find_stages
from .stream import DataPlan, plan_data
from .trace import TracedModel, trace


@dataclass
class ModelArtifacts:
    """Everything the compiler learnt about one model."""

    role: str
    model: nn.Module
    traced: TracedModel | None = None
    cuts: list[Cut] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    boundaries: list[Boundary] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        out = next(n for n in reversed(self.traced.gm.graph.nodes) if n.op == "output")
        arg = out.args[0]
        shape = self.traced.nodes[arg.name].shape if hasattr(arg, "name") else None
        return shape[-1] if shape and len(shape) == 2 else None

    def segments(self) -> nn.ModuleList:
        """The model split at its block boundaries (parameters shared with ``model``)."""
        return split_segments(self.traced, [b.cut.node for b in self.boundaries])

    def to_dict(self) -> dict:
        return {"model": type(self.model).__name__, "cuts": [c.to_dict() for c in self.cuts],
                "stages": [s.to_dict() for s in self.stages],
                "boundaries": [{"node": b.cut.node, "module": b.cut.label, "rule": b.rule}
                               for b in self.boundaries],
                "leaves": list(self.traced.leaves) if self.traced else []}


@dataclass
class Compiled:
    spec: Spec
    input_size: tuple[int, int, int]
    student: ModelArtifacts
    teacher: ModelArtifacts | None = None
    data: DataPlan | None = None
    pairing: Pairing | None = None
    graph: nx.DiGraph | None = None
    plan: Plan | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what building the models wants the user to know
    # Weights files that were named but not found, when the caller allowed that (plan, eval).
    missing_weights: list[str] = field(default_factory=list)
    dry_run: bool = False  # planning only: files that do not exist yet are noted, not errors

    @property
    def num_classes(self) -> int | None:
        return self.student.num_classes

    def to_dict(self) -> dict:
        """The JSON contract of `kdgraph plan --format json` (keys are kept stable)."""
        from .blockgraph import to_json

        return {
            "name": self.spec.name,
            "spec": self.spec.to_dict(),
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "data": self.data.to_dict(),
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "student": self.student.to_dict(),
            "blocks": [b.to_dict() for b in self.pairing.blocks],
            "adapters_in_use": self.plan.uses_adapters,
            "schedule": self.plan.to_dict(),
            "graph": to_json(self.graph),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": list(self.notes),
        }


# --- passes -------------------------------------------------------------------------------

def pass_data(c: Compiled) -> None:
    c.data = plan_data(c.spec.data, c.teacher.model if c.teacher else None, c.student.model, c.input_size,
                       missing_ok=c.dry_run)
    if c.data.train_images is None and c.spec.data.dataset == "imagefolder":
        c.missing_weights.append(f"data.root {c.spec.data.root}")


def pass_trace(c: Compiled) -> None:
    for art in _models(c):
        art.traced = _trace(c, art)
        for leaf in art.traced.leaves:
            c.notes.append(f"{art.role}: traced {leaf.split(': ', 1)[0]} whole as a leaf (no cut inside it), "
                           f"torch.fx cannot trace it: {leaf.split(': ', 1)[1]}")
    # A spec mistake, not a compiler bug: said here in spec words rather than by the invariant check.
    if c.teacher is not None and c.num_classes and c.teacher.num_classes != c.num_classes:
        raise PlanError(f"the teacher predicts {c.teacher.num_classes} classes, the student {c.num_classes}: "
                        "set teacher.kwargs.num_classes and student.kwargs.num_classes to the dataset's "
                        "number of classes")


def _trace(c: Compiled, art: ModelArtifacts) -> TracedModel:
    """``trace``; a model on the meta device that cannot be traced or shape-propagated there
    (a constructor or forward that needs tensor values) is built from the spec with real
    weights and traced again, with a note. Its weights are only ever used for shapes here."""
    if not holds_meta(art.model):
        return trace(art.model, c.input_size, role=art.role)
    try:
        return trace(art.model, c.input_size, role=art.role)
    except Exception as exc:  # the real build's own trace raises the error that matters, if any
        model_spec = getattr(c.spec, art.role)
        art.model = create_model(model_spec.model, model_spec.kwargs, search_path=c.spec.source_dir)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        c.notes.append(f"{art.role} {model_spec.model}: planned with real weights (on the meta device, "
                       f"tracing failed: {first})")
        return trace(art.model, c.input_size, role=art.role)


def pass_cuts(c: Compiled) -> None:
    for art in _models(c):
        art.cuts = find_cuts(art.traced)


def pass_stages(c: Compiled) -> None:
    for art in _models(c):
        art.stages = find_stages(art.cuts, art.traced)


def pass_boundaries(c: Compiled) -> None:
    d = c.spec.decompose
    for art in _models(c):
        explicit = None if d.cuts == "auto" else [getattr(p, art.role) for p in d.cuts]
        art.boundaries = boundaries_for(art.traced, art.cuts, art.stages, d.blocks, explicit)


def pass_pair(c: Compiled) -> None:
    c.pairing = pair_blocks(c.student.boundaries, c.teacher.boundaries if c.teacher else None,
                            c.input_size[1:], c.spec.decompose.projector)


def _tpp_block(c: Compiled) -> int | None:
    loss = c.spec.loss
    return (loss.tpp_block or c.pairing.k - 1) if loss.tpp else None


def pass_block_graph(c: Compiled) -> None:
    c.graph = build_block_graph(c.pairing, c.input_size, c.num_classes, c.teacher is not None, _tpp_block(c))


def pass_plan(c: Compiled) -> None:
    s = c.spec.schedule
    c.plan = build_plan(s.method, c.pairing.k, s.recompositions, s.epochs, s.stage_epochs,
                        c.spec.loss.feature, _tpp_block(c))


# --- invariants ---------------------------------------------------------------------------

def check(c: Compiled) -> list[str]:
    """Invariants that must hold after every pass (for the artifacts that exist so far)."""
    problems = []
    for art in _models(c):
        if art.traced is not None and art.traced.input_size != c.input_size:
            problems.append(f"{art.role} traced at {art.traced.input_size}, spec says {c.input_size}")
        idx = [cut.index for cut in art.cuts]
        if idx != sorted(set(idx)):
            problems.append(f"{art.role} cuts are not in strict graph order")
        names = {cut.node for cut in art.cuts}
        for st in art.stages:
            if st.end.node not in names or st.end not in st.cuts:
                problems.append(f"{art.role} stage {st.index} ends outside its cuts")
        b_idx = [b.cut.index for b in art.boundaries]
        if b_idx != sorted(set(b_idx)) or any(b.cut.node not in names for b in art.boundaries):
            problems.append(f"{art.role} block boundaries are not increasing cuts")
        if art.boundaries and len(art.boundaries) != c.spec.decompose.blocks - 1:
            problems.append(f"{art.role} has {len(art.boundaries)} boundaries for {c.spec.decompose.blocks} blocks")
    if c.teacher and c.teacher.traced and c.num_classes and c.teacher.num_classes != c.num_classes:
        problems.append(f"teacher predicts {c.teacher.num_classes} classes, student {c.num_classes}")
    if c.pairing is not None and c.pairing.k != c.spec.decompose.blocks:
        problems.append(f"pairing has {c.pairing.k} blocks, spec asks for {c.spec.decompose.blocks}")
    if c.plan is not None:
        covered = [sorted(i for g in st.groups for i in g) for st in c.plan.stages]
        if any(cov != list(range(1, c.plan.k + 1)) for cov in covered):
            problems.append("a training stage does not train every student block exactly once")
    return problems


PASSES: list[tuple[str, Callable[[Compiled], None]]] = [
    ("data", pass_data),
    ("trace", pass_trace),
    ("cuts", pass_cuts),
    ("stages", pass_stages),
    ("boundaries", pass_boundaries),
    ("pair", pass_pair),
    ("block_graph", pass_block_graph),
    ("plan", pass_plan),
]


def _models(c: Compiled) -> list[ModelArtifacts]:
    return [a for a in (c.teacher, c.student) if a is not None]


def build_models(spec: Spec, fetch: Collection[str] = (), notes: list[str] | None = None,
                 missing: list[str] | None = None, materialize: bool = True) -> tuple[nn.Module | None, nn.Module]:
    """(teacher, student) of ``spec`` with their weights; ``pretrained: true`` weights are
    fetched only for the roles in ``fetch`` (the others get random weights of the same shapes).
    With ``missing`` (a list), a checkpoint file that does not exist is recorded there and the
    model keeps its initial weights (planning needs shapes only); without it, it is an error.
    ``materialize=False``: parameters on the meta device, checkpoints checked from their
    headers, nothing fetched (``build_model``)."""

    def build(role: str, model_spec):
        if missing is not None and model_spec.checkpoint is not None and not Path(model_spec.checkpoint).exists():
            missing.append(f"{role}.checkpoint {model_spec.checkpoint}")
            model_spec = model_spec.model_copy(update={"checkpoint": None})
        return build_model(model_spec, spec.source_dir, role=role, fetch=role in fetch, notes=notes,
                           materialize=materialize)

    teacher = build("teacher", spec.teacher) if spec.teacher else None
    return teacher, build("student", spec.student)


def compile_spec(spec: Spec, models: tuple[nn.Module | None, nn.Module] | None = None,
                 fetch: Collection[str] = (), allow_missing_weights: bool = False,
                 materialize: bool = True) -> Compiled:
    """Run every pass on ``spec``. ``models`` (teacher, student) skips building them.

    Planning needs shapes only, so pretrained weights are fetched for the roles in
    ``fetch`` alone (training: both; evaluation: the teacher); checkpoints always load,
    except that ``allow_missing_weights`` plans with initial weights where a checkpoint
    file does not exist yet (listed in ``Compiled.missing_weights``).

    ``materialize=False`` builds a plan only (`kdgraph plan`): the models' parameters stay
    on the meta device, so ``Compiled.*.model`` cannot run; checkpoints are checked from
    their headers and nothing is fetched. Every artifact, table, JSON, DOT and Mermaid
    output is the same as with real weights.
    """
    t0 = time.perf_counter()
    notes: list[str] = []
    missing: list[str] = []
    teacher, student = models if models is not None else build_models(
        spec, fetch, notes, missing if allow_missing_weights else None, materialize)
    c = Compiled(spec=spec, input_size=resolve_input_size(spec.data),
                 student=ModelArtifacts("student", student),
                 teacher=ModelArtifacts("teacher", teacher) if teacher is not None else None, notes=notes,
                 missing_weights=missing, dry_run=allow_missing_weights)
    c.timings["build"] = time.perf_counter() - t0
    for name, fn in PASSES:
        t0 = time.perf_counter()
        fn(c)
        c.timings[name] = time.perf_counter() - t0
        problems = check(c)
        if problems:
            raise PlanError(f"compiler pass '{name}' broke an invariant: " + "; ".join(problems))
    return c
