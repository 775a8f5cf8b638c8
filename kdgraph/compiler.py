"""The compiler: an ordered list of passes from a spec to a plan, checked between passes.

    Spec -> Models -> DataPlan -> TracedModel -> Cuts -> Stages -> boundaries -> Pairing
         -> segments -> BlockGraph -> Plan (a Program per training stage)

Each pass is a function of the artifacts before it that returns a new, frozen artifact
(it changes none of its inputs). ``compile_spec`` calls them in one straight line, in the
order of ``PASSES``; each call is timed and followed by the invariant check, and a failed
check names the pass that broke it. Everything here runs on the CPU in seconds, decodes no data (an image
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
from dataclasses import dataclass, field, replace

import networkx as nx
from torch import nn

from .blockgraph import build_block_graph, to_json
from .cuts import Cut, find_cuts
from .data import resolve_input_size
from .errors import PlanError
from .match import Pairing, boundaries_for, pair_blocks
from .models import build_model, create_model, holds_meta
from .plan import Plan, build_plan
from .program import stage_program
from .segments import split_segments
from .spec import Spec
from .stages import Boundary, Stage, find_stages
from .stream import DataPlan, plan_data
from .trace import TracedModel, trace


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

    @property
    def num_classes(self) -> int | None:
        out = next(n for n in reversed(self.traced.gm.graph.nodes) if n.op == "output")
        arg = out.args[0]
        shape = self.traced.nodes[arg.name].shape if hasattr(arg, "name") else None
        return shape[-1] if shape and len(shape) == 2 else None

    def to_dict(self) -> dict:
        return {"model": type(self.model).__name__, "cuts": [c.to_dict() for c in self.cuts],
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
class Compiled:
    """The compiler's output: every artifact of every pass."""

    spec: Spec
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

    @property
    def num_classes(self) -> int | None:
        return self.student.num_classes

    def to_dict(self) -> dict:
        """The JSON contract of `kdgraph plan --format json` (keys are kept stable)."""
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


@dataclass(frozen=True)
class BuildMode:
    """How models are built. ``fetch``: roles whose ``pretrained: true`` weights are fetched
    (the others get random weights of the same shapes); ``allow_missing``: a checkpoint file
    or image folder that does not exist yet is listed, not an error (planning needs shapes
    only); ``materialize=False``: parameters on the meta device, checkpoints checked from
    their headers, nothing fetched (`kdgraph plan`)."""

    fetch: frozenset[str] = frozenset()
    allow_missing: bool = False
    materialize: bool = True


# --- passes, in the order compile_spec runs them ------------------------------------------

def build_pass(spec: Spec, mode: BuildMode, given: tuple[nn.Module | None, nn.Module] | None) -> Models:
    """Pass 1: the teacher and the student with their weights (or ``given``)."""
    if given is not None:
        teacher, student = given
        notes, missing = [], []
    else:
        notes, missing = [], []
        teacher, student = build_models(spec, mode.fetch, notes, missing if mode.allow_missing else None,
                                        mode.materialize)
    return Models(ModelArtifacts("teacher", teacher) if teacher is not None else None,
                  ModelArtifacts("student", student), tuple(notes), tuple(missing))


def data_pass(spec: Spec, models: Models, input_size: tuple[int, int, int], mode: BuildMode) -> DataPlan:
    """Pass 2: how the data will be read (loader, normalisation), without decoding it."""
    return plan_data(spec.data, models.teacher.model if models.teacher else None, models.student.model,
                     input_size, missing_ok=mode.allow_missing)


def trace_pass(spec: Spec, models: Models, input_size: tuple[int, int, int]) -> Models:
    """Pass 3: each model traced with torch.fx, shapes propagated."""
    notes = list(models.notes)

    def one(art: ModelArtifacts) -> ModelArtifacts:
        art = _trace(spec, art, input_size, notes)
        for leaf in art.traced.leaves:
            notes.append(f"{art.role}: traced {leaf.split(': ', 1)[0]} whole as a leaf (no cut inside it), "
                         f"torch.fx cannot trace it: {leaf.split(': ', 1)[1]}")
        return art

    traced = models.map(one)
    t, s = traced.teacher, traced.student
    # A spec mistake, not a compiler bug: said here in spec words rather than by the invariant check.
    if t is not None and s.num_classes and t.num_classes != s.num_classes:
        raise PlanError(f"the teacher predicts {t.num_classes} classes, the student {s.num_classes}: "
                        "set teacher.kwargs.num_classes and student.kwargs.num_classes to the dataset's "
                        "number of classes")
    return replace(traced, notes=tuple(notes))


def _trace(spec: Spec, art: ModelArtifacts, input_size: tuple[int, int, int], notes: list[str]) -> ModelArtifacts:
    """``trace``; a model on the meta device that cannot be traced or shape-propagated there
    (a constructor or forward that needs tensor values) is built from the spec with real
    weights and traced again, with a note. Its weights are only ever used for shapes here."""
    if not holds_meta(art.model):
        return replace(art, traced=trace(art.model, input_size, role=art.role))
    try:
        return replace(art, traced=trace(art.model, input_size, role=art.role))
    except Exception as exc:  # the real build's own trace raises the error that matters, if any
        model_spec = getattr(spec, art.role)
        model = create_model(model_spec.model, model_spec.kwargs, search_path=spec.source_dir)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        notes.append(f"{art.role} {model_spec.model}: planned with real weights (on the meta device, "
                     f"tracing failed: {first})")
        return replace(art, model=model, traced=trace(model, input_size, role=art.role))


def cuts_pass(models: Models) -> Models:
    """Pass 4: every single-tensor cut of each model."""
    return models.map(lambda art: replace(art, cuts=tuple(find_cuts(art.traced))))


def stages_pass(models: Models) -> Models:
    """Pass 5: cuts grouped into stages of one feature shape."""
    return models.map(lambda art: replace(art, stages=tuple(find_stages(list(art.cuts), art.traced))))


def boundaries_pass(spec: Spec, models: Models) -> Models:
    """Pass 6: the cuts that end each block (explicit in the spec, else chosen)."""
    d = spec.decompose

    def one(art: ModelArtifacts) -> ModelArtifacts:
        explicit = None if d.cuts == "auto" else [getattr(p, art.role) for p in d.cuts]
        return replace(art, boundaries=tuple(boundaries_for(art.traced, list(art.cuts), list(art.stages),
                                                             d.blocks, explicit)))

    return models.map(one)


def pair_pass(spec: Spec, models: Models, input_size: tuple[int, int, int]) -> Pairing:
    """Pass 7: teacher and student blocks paired, adapters planned where they differ."""
    teacher = list(models.teacher.boundaries) if models.teacher else None
    return pair_blocks(list(models.student.boundaries), teacher, input_size[1:], spec.decompose.projector)


def split_pass(models: Models) -> Models:
    """Pass 8: each model split at its block boundaries into segments (shared parameters)."""
    return models.map(lambda art: replace(
        art, segments=tuple(split_segments(art.traced, [b.cut.node for b in art.boundaries]))))


def _tpp_block(spec: Spec, pairing: Pairing) -> int | None:
    return (spec.loss.tpp_block or pairing.k - 1) if spec.loss.tpp else None


def block_graph_pass(spec: Spec, models: Models, pairing: Pairing,
                     input_size: tuple[int, int, int]) -> nx.DiGraph:
    """Pass 9: the block graph of every way blocks, adapters and losses can be wired (frozen)."""
    return nx.freeze(build_block_graph(pairing, input_size, models.student.num_classes, models.teacher is not None,
                                       _tpp_block(spec, pairing), spec.loss.feature))


def plan_pass(spec: Spec, pairing: Pairing, graph: nx.DiGraph) -> Plan:
    """Pass 10: the training schedule, each stage with its program read from the graph."""
    s = spec.schedule
    plan = build_plan(s.method, pairing.k, s.recompositions, s.epochs, s.stage_epochs,
                      _tpp_block(spec, pairing) if spec.teacher is not None else None)
    return plan.with_programs([
        stage_program(graph, st.groups, chain_adapters=plan.chains_adapters,
                      feature_losses=plan.feature_losses, tpp_block=plan.tpp_block)
        for st in plan.stages])


PASSES: tuple[Callable, ...] = (build_pass, data_pass, trace_pass, cuts_pass, stages_pass, boundaries_pass,
                                pair_pass, split_pass, block_graph_pass, plan_pass)


# --- invariants ---------------------------------------------------------------------------

def check(spec: Spec, input_size: tuple[int, int, int], artifact) -> list[str]:
    """Invariants of the artifact a pass just returned."""
    if isinstance(artifact, Models):
        return _check_models(spec, input_size, artifact)
    if isinstance(artifact, Pairing) and artifact.k != spec.decompose.blocks:
        return [f"pairing has {artifact.k} blocks, spec asks for {spec.decompose.blocks}"]
    if isinstance(artifact, Plan):
        covered = [sorted(i for g in st.groups for i in g) for st in artifact.stages]
        if any(cov != list(range(1, artifact.k + 1)) for cov in covered):
            return ["a training stage does not train every student block exactly once"]
    return []


def _check_models(spec: Spec, input_size: tuple[int, int, int], models: Models) -> list[str]:
    problems = []
    for art in models.each():
        if art.traced is not None and art.traced.input_size != input_size:
            problems.append(f"{art.role} traced at {art.traced.input_size}, spec says {input_size}")
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
        if art.boundaries and len(art.boundaries) != spec.decompose.blocks - 1:
            problems.append(f"{art.role} has {len(art.boundaries)} boundaries for {spec.decompose.blocks} blocks")
        if art.segments and len(art.segments) != len(art.boundaries) + 1:
            problems.append(f"{art.role} has {len(art.segments)} segments for {len(art.boundaries)} boundaries")
    t, s = models.teacher, models.student
    if t and t.traced and s.traced and s.num_classes and t.num_classes != s.num_classes:
        problems.append(f"teacher predicts {t.num_classes} classes, student {s.num_classes}")
    return problems


class _Passes:
    """Runs each pass in ``PASSES`` order: times it and checks what it returned."""

    def __init__(self, spec: Spec, input_size: tuple[int, int, int]):
        self.spec, self.input_size = spec, input_size
        self.timings: dict[str, float] = {}

    def __call__(self, fn: Callable, *args):
        number = len(self.timings)
        if PASSES[number] is not fn:
            raise AssertionError(f"pass {number + 1} is {PASSES[number].__name__}, not {fn.__name__}")
        t0 = time.perf_counter()
        out = fn(*args)
        name = fn.__name__.removesuffix("_pass")
        self.timings[name] = time.perf_counter() - t0
        problems = check(self.spec, self.input_size, out)
        if problems:
            raise PlanError(f"compiler pass '{name}' broke an invariant: " + "; ".join(problems))
        return out


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
    mode = BuildMode(frozenset(fetch), allow_missing_weights, materialize)
    input_size = resolve_input_size(spec.data)
    run = _Passes(spec, input_size)
    built = run(build_pass, spec, mode, models)
    data = run(data_pass, spec, built, input_size, mode)
    traced = run(trace_pass, spec, built, input_size)
    cut = run(cuts_pass, traced)
    staged = run(stages_pass, cut)
    bounded = run(boundaries_pass, spec, staged)
    pairing = run(pair_pass, spec, bounded, input_size)
    split = run(split_pass, bounded)
    graph = run(block_graph_pass, spec, split, pairing, input_size)
    plan = run(plan_pass, spec, pairing, graph)
    missing = split.missing + ((f"data.root {spec.data.root}",)
                               if data.train_images is None and spec.data.dataset == "imagefolder" else ())
    return Compiled(spec, input_size, split.student, split.teacher, data, pairing, graph, plan,
                    run.timings, split.notes, missing)
