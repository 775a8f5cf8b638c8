"""The compiler: an ordered list of passes from a spec to a plan, checked between passes.

    Spec -> Models -> DataPlan -> TracedModel -> Cuts -> Stages -> boundaries -> Pairing
         -> segments -> BlockGraph -> Plan (a Program per training stage)

One pass per module of this package; ``PASSES`` is their order, kept there alone (the
the docs' pipeline picture (docs/concepts.md) is drawn from it, and each pass module's docstring gives its
number). Each pass is a function of the artifacts before it that returns a new, frozen
artifact (records in ``kdgraph.ir``, built objects in ``artifacts``), called by name through
its ``Pass`` (as torch.fx's ``PassBase``: ``requires`` the artifacts it reads, named in the
order it takes them; ``call``; ``ensures`` its result's invariants). ``compile_spec`` runs
them in ``PASSES`` order, each call timed, and a broken invariant names the pass. Everything here runs on
the CPU in seconds, decodes no data (an image folder is listed and checked, to choose its
loader) and touches no network: pretrained weights are fetched only where a caller asks
(training, evaluation). Planning alone (``materialize=False``, as `kdgraph plan` does) builds
the models with their parameters on the meta device and propagates shapes on meta tensors.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from kdgraph.compiler.artifacts import BuildMode, Compiled, ModelArtifacts, Models, RunRecord
from kdgraph.compiler.blockgraph import block_graph_pass, task_of
from kdgraph.compiler.boundaries import boundaries_pass
from kdgraph.compiler.build import build_models, build_pass
from kdgraph.compiler.cuts import cuts_pass
from kdgraph.compiler.data import check_num_classes, data_pass
from kdgraph.compiler.pair import pair_pass
from kdgraph.compiler.plan import plan_pass
from kdgraph.compiler.split import split_pass
from kdgraph.compiler.stages import stages_pass
from kdgraph.compiler.trace import trace_pass
from kdgraph.data import resolve_input_size
from kdgraph.errors import PlanError, SpecError
from kdgraph.ir import DataPlan, Pairing, Plan
from kdgraph.teacher_cache import cache_key, differences, read_header, token_width

if TYPE_CHECKING:
    from kdgraph.spec import Spec

__all__ = ["PASSES", "BuildMode", "Compiled", "ModelArtifacts", "Models", "Pass", "RunRecord", "build_models",
           "compile_spec", "resolve_run"]


def _no_invariant(spec: Spec, input_size: tuple[int, int, int], artifact: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class Pass:
    """One compiler pass, called by name: ``fn`` takes the artifacts that ``reads`` names, in
    that order (``spec``, its ``run`` records, ``mode``, ``given`` models, ``input_size`` and the
    ``cache_header`` the run replays to start with), and
    returns the one it writes under ``writes``; ``ensures(spec, input_size, artifact)`` lists
    the invariants that artifact breaks."""

    fn: Callable
    reads: tuple[str, ...]
    writes: str
    ensures: Callable[[Spec, tuple[int, int, int], Any], list[str]] = _no_invariant

    @property
    def name(self) -> str:
        return self.fn.__name__.removesuffix("_pass")

    def requires(self, env: dict) -> None:
        missing = [r for r in self.reads if r not in env]
        if missing:
            raise PlanError(f"compiler pass '{self.name}' reads {', '.join(missing)}, which no pass before it wrote")

    def __call__(self, env: dict) -> Any:
        """requires, call, ensures; the artifact goes into ``env`` under ``writes``."""
        self.requires(env)
        out = self.fn(*(env[r] for r in self.reads))
        problems = self.ensures(env["spec"], env["input_size"], out)
        if problems:
            raise PlanError(f"compiler pass '{self.name}' broke an invariant: " + "; ".join(problems))
        env[self.writes] = out
        return out


def _check_pairing(spec: Spec, input_size: tuple[int, int, int], pairing: Pairing) -> list[str]:
    return [f"pairing has {pairing.k} blocks, spec asks for {spec.decompose.blocks}"] \
        if pairing.k != spec.decompose.blocks else []


def _check_plan(spec: Spec, input_size: tuple[int, int, int], plan: Plan) -> list[str]:
    covered = [sorted(i for g in st.groups for i in g) for st in plan.stages]
    if any(cov != list(range(1, plan.k + 1)) for cov in covered):
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


_SIZE = ("spec", "models", "input_size")
PASSES: tuple[Pass, ...] = (
    Pass(build_pass, ("run", "mode", "given"), "models", _check_models),
    Pass(data_pass, ("spec", "models", "input_size", "mode"), "data"),
    Pass(trace_pass, _SIZE, "models", _check_models),
    Pass(cuts_pass, ("models",), "models", _check_models),
    Pass(stages_pass, ("models",), "models", _check_models),
    Pass(boundaries_pass, ("spec", "models"), "models", _check_models),
    Pass(pair_pass, _SIZE, "pairing", _check_pairing),
    Pass(split_pass, ("models", "pairing"), "models", _check_models),
    Pass(block_graph_pass, ("spec", "models", "pairing", "input_size", "cache_header"), "graph"),
    Pass(plan_pass, ("spec", "pairing", "graph"), "plan", _check_plan),
)


def _run_passes(env: dict, freeze: bool) -> dict[str, float]:
    """Run every pass of ``PASSES`` in order over ``env`` (artifacts by name, updated in
    place), each timed. Returns the timings, by pass name."""
    timings: dict[str, float] = {}
    for p in PASSES:
        if freeze:  # what earlier passes built, and imported (timm, by the build), is frozen too
            gc.freeze()
        t0 = time.perf_counter()
        p(env)
        timings[p.name] = time.perf_counter() - t0
    return timings


@contextlib.contextmanager
def _collecting_new_objects_only() -> Iterator[bool]:
    """For the duration, Python's cycle collector leaves alone every object that existed
    before (``gc.freeze``; yields True): compiling allocates fx graphs by the thousand, and
    each full collection they trigger would scan all of torch and timm again (a fifth of
    `kdgraph plan`). What the passes make is still collected. Nothing changes (yields False)
    where the caller froze objects itself or turned the collector off."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()


def resolve_run(spec: Spec, read_cache: bool = True, teacher_weights: bool = True) -> RunRecord:
    """The run's records of ``spec`` (torch-free; nothing built, nothing read from disk): its
    sections, and its teacher source as a command uses it: ``read_cache=False`` leaves the
    teacher cache out (the teacher runs live), ``teacher_weights=False`` its checkpoint,
    pretrained weights and cache (a teacher of its shapes alone). The spec itself is unchanged."""
    teacher = spec.teacher
    if teacher is not None and not teacher_weights:
        teacher = teacher.model_copy(update={"checkpoint": None, "pretrained": False, "cache": None})
    elif teacher is not None and not read_cache and teacher.cache is not None:
        teacher = teacher.model_copy(update={"cache": None})
    return RunRecord(name=spec.name, seed=spec.seed, output_dir=spec.output_dir, source_dir=spec.source_dir,
                     task=spec.task, teacher=teacher, student=spec.student, data=spec.data, decompose=spec.decompose,
                     schedule=spec.schedule, loss=spec.loss, optim=spec.optim, runtime=spec.runtime,
                     denoise=spec.denoise, canonical=spec.to_dict())


def compile_spec(spec: Spec, models: tuple[nn.Module | None, nn.Module] | None = None,
                 fetch: Collection[str] = (), allow_missing_weights: bool = False,
                 materialize: bool = True, defer: Collection[str] = (), read_cache: bool = True,
                 teacher_weights: bool = True) -> Compiled:
    """Run every pass on ``spec``. ``models`` (teacher, student) skips building them.

    Planning needs shapes only, so pretrained weights are fetched for the roles in
    ``fetch`` alone (training: both; evaluation: the teacher); checkpoints always load,
    except that ``allow_missing_weights`` plans with initial weights where a checkpoint
    file does not exist yet (listed in ``Compiled.missing_weights``).

    ``materialize=False`` builds a plan only (`kdgraph plan`): the models' parameters stay
    on the meta device, so ``Compiled.*.model`` cannot run; checkpoints are checked from
    their headers and nothing is fetched. Every artifact, table, JSON, DOT and Mermaid
    output is the same as with real weights. ``defer``: roles built as for planning alone
    (the trainer defers a teacher that a cache may replay: ``Plan.live_teacher`` says
    whether it must be built after all). ``read_cache``, ``teacher_weights``: the teacher source
    as the command uses it (``resolve_run``); ``Compiled.run`` holds it.
    """
    mode = BuildMode(frozenset(fetch), allow_missing_weights, materialize, frozenset(defer), read_cache, teacher_weights)
    with _collecting_new_objects_only() as frozen:
        return _compile(spec, models, mode, frozen)


def _compile(spec: Spec, models: tuple[nn.Module | None, nn.Module] | None, mode: BuildMode,
             freeze: bool) -> Compiled:
    input_size = resolve_input_size(spec.data)
    run = resolve_run(spec, mode.read_cache, mode.teacher_weights)
    cache = run.teacher.cache if run.teacher is not None else None
    header = read_header(cache) if cache is not None else None  # read once: the plan's cache mode, its check
    env = {"spec": spec, "run": run, "mode": mode, "given": models, "input_size": input_size, "cache_header": header}
    timings = _run_passes(env, freeze)
    built, data = env["models"], env["data"]
    check_num_classes(data, built.student.num_classes)
    check_cache(run, header, env["plan"], data, built.teacher, built.student)
    missing = built.missing + ((f"data.root {spec.data.root}",)
                               if data.train_images is None and spec.data.dataset == "imagefolder" else ())
    fallback = ((f"decompose.adapters: {spec.decompose.adapters}: {env['pairing'].fallback}",)
                if env["pairing"].fallback else ())
    return Compiled(run, input_size, built.student, built.teacher, data, env["pairing"], env["graph"], env["plan"],
                    timings, built.notes + fallback, missing, task_of(spec, built.student))


def check_cache(run: RunRecord, header: dict | None, plan: Plan, data: DataPlan,
                teacher: ModelArtifacts | None = None, student: ModelArtifacts | None = None) -> None:
    """The teacher cache the run reads (``header``: its header, read once; None: no cache) was
    built for this run (teacher, data, augmentation, seed, runtime: one line naming what
    differs) and covers every epoch a stage replays from it (``student``: its width bounds a
    token cache's). Past the cached epochs the plan is refused, not patched with the live
    teacher: a stage's program is one for all its epochs, and a run that silently falls back would pay
    the teacher it meant to skip."""
    if header is None:
        return
    root = run.teacher.cache
    mode = header["key"]["mode"]["value"]
    diff = differences(header["key"], cache_key(run, mode["mode"], mode.get("k"), header["key"]["ranks"]["value"],
                                                    data, teacher, token_width(run, student)))
    if diff:
        raise SpecError("teacher.cache", f"{root} was built for another run (differs: {'; '.join(diff)}); "
                        "rebuild it with `kdgraph cache SPEC --epochs N`")
    have = int(header["epochs"])
    for index in plan.cache_stages:
        epochs = plan.stage_epochs(index)
        if epochs.stop > have:
            raise SpecError("teacher.cache", f"{root} holds the first {have} epoch(s); stage {index} replays "
                            f"epochs {epochs.start + 1}-{epochs.stop} from it: build it with "
                            f"`kdgraph cache SPEC --epochs {plan.epochs}`")


def pipeline_mermaid() -> str:
    """The pipeline as a Mermaid flowchart, drawn from ``PASSES`` (docs/concepts.md shows it)."""
    lines = ["flowchart LR", '  spec(["Spec<br/>kdgraph/spec/"])']
    prev = "spec"
    for number, p in enumerate(PASSES, start=1):
        name, fn = p.name, p.fn
        artifact = str(fn.__annotations__.get("return", "")).split("[")[0]  # the picture's label only
        lines.append(f'  p{number}["{number} {name}<br/>compiler/{fn.__module__.rpartition(".")[2]}.py<br/>→ {artifact}"]')
        lines.append(f"  {prev} --> p{number}")
        prev = f"p{number}"
    lines += ['  run["runtime/distiller.py<br/>runs each stage\'s programs"]', f"  {prev} --> run",
              '  loop["runtime/loop.py<br/>train, checkpoint, resume"]', "  run --> loop",
              '  ship["runtime/export.py, ship.py<br/>student.safetensors, timm folder"]', "  loop --> ship"]
    return "\n".join(lines) + "\n"
