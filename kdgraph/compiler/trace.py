"""Pass 3: trace a model with torch.fx and give every node its shape and module path.

The tracer keeps timm's leaf modules and autowrapped functions (timm registers the
pieces its own fx feature extraction cannot trace through), binds every forward
argument but the first to its default through ``concrete_args`` and records, for
each node, the stack of modules it was called from (``nn_module_stack``).

A denoiser's task (spec ``denoise``) adds **side inputs**: the forward's timestep (and class)
stay graph inputs after the image (``SideInput``). Each node is marked as depending on the
image (``input_dependent``) or on the side inputs alone (``side_dependent``: the time
embedding); the cut finder counts only the first, the split gives every block the second.

Where fx still fails inside a submodule (data-dependent control flow, a Python call on a
tensor's value), the module class it failed in becomes a leaf and tracing starts again,
as timm's and torchvision's feature extractors do with their registered leaves: the graph
then calls that module whole, so no cut lies inside it. ``TracedModel.leaves`` says which
modules became leaves and why. Only a failure in the top-level forward is an error.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import io
import linecache
import re
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.fx.proxy as fx_proxy
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from kdgraph.compiler.artifacts import ModelArtifacts, Models, TracedModel
from kdgraph.compiler.exported import node_infos, takes_tokens, trace_exported
from kdgraph.compiler.split import graph_module
from kdgraph.errors import PlanError, TraceError
from kdgraph.ir import NodeInfo, SideInput
from kdgraph.models import create_model, holds_meta

if TYPE_CHECKING:
    from kdgraph.spec import Spec


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's registered leaf modules and autowrap functions (empty when timm is absent).

    Stochastic-depth modules are leaves too: their forward branches on ``self.training``,
    which fx would freeze into the graph, so that one graph could not serve both modes.
    """
    try:
        from timm.layers import DropBlock2d, DropPath
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is a dependency, but the tracer does not need it
        return (), ()
    leaves = (*timm_fx.get_notrace_modules(), DropPath, DropBlock2d)
    return leaves, tuple(timm_fx.get_notrace_functions())


class _CachedDis:
    """``dis`` as torch.fx's proxies see it while kdgraph traces: the instructions of a code
    object are listed once per trace. fx lists the calling function's bytecode at every
    unpacking of a proxy (``B, H, W, C = x.shape``), again and again for the same functions:
    a third of the time to trace Swin. Everything else is ``dis`` itself."""

    def __init__(self) -> None:
        self._listed: dict[types.CodeType, tuple[dis.Instruction, ...]] = {}

    def get_instructions(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, types.CodeType):
            return dis.get_instructions(x, *args, **kwargs)
        listed = self._listed.get(x)
        if listed is None:
            listed = self._listed[x] = tuple(dis.get_instructions(x))
        return iter(listed)

    def __getattr__(self, name: str):
        return getattr(dis, name)


@contextlib.contextmanager
def _listing_bytecode_once() -> Iterator[None]:
    """For the duration, torch.fx.proxy reads bytecode through a ``_CachedDis``."""
    if getattr(fx_proxy, "dis", None) is not dis:  # another trace holds it, or fx no longer uses dis
        yield
        return
    fx_proxy.dis = _CachedDis()
    try:
        yield
    finally:
        fx_proxy.dis = dis


class KDTracer(fx.Tracer):
    """fx tracer that treats timm's not-traceable modules, and ``leaf_types``, as leaves."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        leaf_modules, autowrap = _timm_notrace()
        super().__init__(autowrap_functions=autowrap)
        self._extra_leaves = (*leaf_modules, *leaf_types)
        self._param_names: dict[int, str] = {}
        self._buffer_names: dict[int, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        # Names of the root's parameters and buffers by identity, the first name of a shared
        # tensor as named_parameters() gives it: fx looks each one up by walking every module
        # of the model again, at each use.
        if isinstance(root, nn.Module):
            for name, p in root.named_parameters():
                self._param_names.setdefault(id(p), name)
            for name, b in root.named_buffers():
                self._buffer_names.setdefault(id(b), name)
        try:
            with _listing_bytecode_once():
                return super().trace(root, concrete_args=concrete_args)
        finally:
            self._param_names, self._buffer_names = {}, {}

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):  # fx: a parameter or buffer of the root becomes a get_attr
            names = self._param_names if isinstance(a, nn.Parameter) else self._buffer_names
            name = names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        name = None
        if isinstance(attr_val, torch.Tensor) and not self.param_shapes_constant:
            if isinstance(attr_val, nn.Parameter):
                name = self._param_names.get(id(attr_val))
            if name is None and self.proxy_buffer_attributes:
                name = self._buffer_names.get(id(attr_val))
        if name is None:  # not the root's: fx's own answer
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:  # as fx: one get_attr proxy per name
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def _concrete_args(model: nn.Module, side: tuple[SideInput, ...] = ()) -> dict:
    """Bind every forward argument but the first and the side inputs to its default (it is a
    constant, not a tensor)."""
    params = list(inspect.signature(model.forward).parameters.values())
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not params:
        raise TraceError(f"{type(model).__name__}.forward takes no input argument")
    names = [p.name for p in params]
    missing = [s.name for s in side if s.name not in names[1:]]
    if missing:
        raise TraceError(f"{type(model).__name__}.forward({', '.join(names)}) takes no argument "
                         f"{', '.join(map(repr, missing))}: a denoiser's forward is (x, t) or (x, t, y)")
    concrete = {}
    for p in params[1:]:
        if p.name in {s.name for s in side}:
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument '{p.name}' besides the input; "
                "kdgraph feeds the image (and a denoiser's timestep and class) only. Give it a default or "
                "wrap the model."
            )
        concrete[p.name] = p.default
    return concrete


@dataclass(frozen=True)
class _Failure:
    """Where tracing failed: the innermost module of the model with a frame in the traceback."""

    path: str | None  # "" for the root module, None when no module frame was found
    module: nn.Module | None
    where: str


def _locate_failure(model: nn.Module, exc: BaseException) -> _Failure:
    """Name the innermost module of ``model`` and the Python line where tracing failed."""
    paths = {id(m): name for name, m in model.named_modules()}
    found = _Failure(None, None, "an unknown place (no module frame in the traceback)")
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            code = frame.f_code
            line = linecache.getline(code.co_filename, lineno).strip()
            path = paths[id(owner)]
            where = f"module '{path or '<root>'}' ({type(owner).__name__}), {code.co_filename}:{lineno}: {line}"
            found = _Failure(path, owner, where)
    return found


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


_MAX_LEAF_RETRIES = 16


def _trace_graph(model: nn.Module, role: str,
                 side: tuple[SideInput, ...] = ()) -> tuple[KDTracer, fx.Graph, tuple[str, ...]]:
    """Trace ``model``, making the module class fx fails in a leaf and retrying.

    After: the graph, its tracer and the leaves added (one line each, naming the module, the
    reason and the source line). TraceError where the failure is in the top-level forward,
    outside any module, or persists after ``_MAX_LEAF_RETRIES`` leaves.
    """
    concrete = _concrete_args(model, side) or None
    leaf_types: list[type] = []
    reasons: dict[type, str] = {}
    while True:
        tracer = KDTracer(tuple(leaf_types))
        try:
            graph = tracer.trace(model, concrete_args=concrete)
            break
        except TraceError:
            raise
        except Exception as exc:  # fx raises many types; all mean "not traceable"
            failure = _locate_failure(model, exc)
            cls = type(failure.module) if failure.module is not None else None
            if not failure.path or cls in leaf_types or len(leaf_types) >= _MAX_LEAF_RETRIES:
                # One line: the CLI prints it as it is.
                raise TraceError(
                    f"torch.fx cannot trace the {role} ({type(model).__name__}): {_why(exc)}, at "
                    f"{failure.where}. Make that forward fx-traceable (no Python branch on a tensor's "
                    "value), or wrap the model so that the code lies in a submodule kdgraph can treat "
                    "as a leaf") from exc
            leaf_types.append(cls)
            reasons[cls] = f"{_why(exc)[:160]}, at {failure.where.split(', ', 1)[1]}"
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    leaves = tuple(f"{path} ({type(m).__name__}): {reasons[type(m)]}"
                   for path, m in model.named_modules() if type(m) in reasons and path in called)
    return tracer, graph, leaves


def _inline_concrete_args(graph: fx.Graph, keep: tuple[str, ...] = ()) -> None:
    """Replace the placeholders fx keeps for concrete args by their values (all but the first
    and those named in ``keep``, the side inputs).

    fx leaves ``attn_mask=None`` style arguments as placeholders guarded by asserts; left in,
    they would look like extra graph inputs that every segment needs.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        if ph.target in keep:
            continue
        value = ph.args[0] if ph.args else None  # fx stores the concrete value as the default
        for user in list(ph.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is ph else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is ph else n)
        graph.erase_node(ph)


_FUNCTIONAL_DROPOUT = frozenset({  # each takes (input, p, training, inplace)
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout,
})


class _DropoutInModeOf:
    """``fn(x, p, owner.training, inplace)``: a functional dropout that reads its module's mode
    when it runs (a call_function target of the traced graph; it holds ``owner``, adds nothing
    to it)."""

    def __init__(self, fn: Callable, owner: nn.Module):
        self.fn, self.owner = fn, owner
        self.__name__ = f"{fn.__name__}_in_mode"  # fx names the generated code's global after it

    def __call__(self, x: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        return self.fn(x, p, self.owner.training, inplace)


def _modal_dropout(model: nn.Module, graph: fx.Graph) -> None:
    """Make ``F.dropout(x, p, training=self.training)`` follow the model's mode again.

    fx evaluates ``self.training`` while tracing and freezes it into the graph, so a model
    traced in train mode (as built) would drop activations in eval mode too (timm heads with
    ``drop_rate > 0``). Each such call whose ``training`` is the mode of the moment becomes a
    call of the same function that reads the calling module's mode when it runs
    (``_DropoutInModeOf``), so ``model.train()`` / ``model.eval()`` reach it. The model itself
    is left as it was: no module is added to it.
    """
    for node in list(graph.nodes):
        fn = node.target if node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT else None
        if fn is None:
            continue
        try:
            bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        a = bound.arguments
        if a["training"] is not model.training or isinstance(a["p"], fx.Node) or isinstance(a["inplace"], fx.Node):
            continue  # a fixed mode (MC dropout) or a computed rate: leave as traced
        stack = node.meta.get("nn_module_stack") or {}
        owner_path = list(stack.values())[-1][0] if stack else ""
        with graph.inserting_before(node):
            new = graph.call_function(_DropoutInModeOf(fn, model.get_submodule(owner_path)),
                                      (a["input"], a["p"], a["inplace"]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        new.name = node.name


@contextlib.contextmanager
def _swapped(gm: fx.GraphModule, convert: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """For the duration, each parameter and buffer ``t`` of ``gm`` reads as ``convert(t)``
    (kept where that is None)."""
    swapped = []
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                new = convert(t) if t is not None else None
                if new is not None:
                    swapped.append((store, name, t))
                    store[name] = new
    try:
        yield
    finally:
        for store, name, t in swapped:
            store[name] = t


def _propagate(gm: fx.GraphModule, sample: tuple[torch.Tensor, ...], mode=None,
               convert: Callable[[torch.Tensor], torch.Tensor | None] = lambda t: None) -> None:
    """ShapeProp of the inputs ``sample`` (fake tensors of ``mode`` where given), tensors ``convert``ed."""
    prop = ShapeProp(gm)  # built outside the fake mode: ShapeProp then does not deep-copy the model
    try:
        # ShapeProp prints what it raises; inside a fake mode, real parameters are read as fake
        # ones (metadata only, never written).
        with contextlib.redirect_stderr(io.StringIO()), _swapped(gm, convert), mode or contextlib.nullcontext():
            prop.propagate(*(mode.from_tensor(t) if mode is not None else t for t in sample))
    except Exception:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        raise


def _propagate_shapes(gm: fx.GraphModule, sample: tuple[torch.Tensor, ...]) -> None:
    """Shapes and dtypes of every node, without arithmetic where possible.

    A model built for planning (parameters on the meta device) runs on meta tensors, its
    buffers moved there for the duration: the cheapest propagation (about 3x faster than
    fake tensors on Swin). Where an op has no meta kernel, fake tensors on the sample's
    device are tried; where those fail too the error is raised (the compiler then builds
    that model with real weights and traces again). A model with real weights runs on fake
    tensors (4-5x faster at 224x224 than a real forward), falling back to a real forward for
    ops fake tensors cannot run (data-dependent output shapes) and for the real forward's
    clearer error messages.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    planning = any(t.is_meta for t in (*gm.parameters(), *gm.buffers()))
    if planning:
        with contextlib.suppress(Exception):
            _propagate(gm, tuple(t.to("meta") for t in sample), convert=lambda t: None if t.is_meta else t.to("meta"))
            return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake = mode.fake_tensor_converter.from_meta_and_device
    try:
        _propagate(gm, sample, mode, convert=lambda t: to_fake(mode, t, sample[0].device) if t.is_meta else None)
        return
    except Exception:
        if planning:
            raise
    _propagate(gm, sample)


_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")


def _run_failure(role: str, shape: tuple[int, ...], exc: BaseException) -> str:
    """One line saying why the traced model failed on the sample batch and which spec key fixes it.

    ShapeProp wraps the model's own error in 'ShapeProp error for: node=...'; the cause is
    what the user can act on.
    """
    cause = exc.__cause__ if "ShapeProp error" in str(exc) and exc.__cause__ is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    channels = _CHANNELS.search(text)
    if channels:
        want, got = channels.groups()
        return (f"the {role} takes {want} input channels but data.input_size gives {got} (a batch of shape "
                f"{shape}): set data.input_size: [{want}, H, W], or {role}.kwargs.in_chans: {got}")
    return (f"the {role} traced, but running it on a batch of shape {shape} failed: "
            f"{type(cause).__name__}: {text[:300]}. Check data.input_size against the model and its "
            f"{role}.kwargs (in_chans, img_size, num_classes)")


def trace(model: nn.Module, input_size: tuple[int, int, int], role: str = "student",
          batch_size: int = 2, lazy: bool = False, side: tuple[SideInput, ...] = ()) -> TracedModel:
    """Trace ``model`` and propagate shapes with one random batch of ``input_size`` (and of
    each side input: integers in ``[0, high)``).

    After: every node of the GraphModule has a NodeInfo; tensor nodes have shapes. The
    GraphModule holds the very submodules of ``model`` (parameters shared, not copied); its
    placeholders are the image, then the side inputs in the order of ``side``.
    ``lazy`` (planning): it writes its Python code only when first called (``graph_module``).
    A model fed token ids (a causal LM) is traced with torch.export instead (``exported``).
    """
    if takes_tokens(model):
        return trace_exported(model, input_size, role=role, batch_size=batch_size, lazy=lazy)
    tracer, graph, leaves = _trace_graph(model, role, side)
    _inline_concrete_args(graph, tuple(s.name for s in side))
    _modal_dropout(tracer.root, graph)
    gm = graph_module(tracer.root, graph, type(model).__name__, lazy)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_name = {n.target: n for n in placeholders[1:]}
    primary, side_nodes = placeholders[0], [by_name[s.name] for s in side]
    sample = (torch.randn(batch_size, *input_size),
              *(torch.randint(0, max(s.high, 1), (batch_size,)) for s in side))
    modes = {m: m.training for m in model.modules()}  # restored one by one: a mix stays a mix
    model.eval()  # BN statistics must not move; eval also avoids batch-size-1 BN errors
    try:
        with torch.no_grad():
            _propagate_shapes(gm, sample)
    except Exception as exc:
        raise TraceError(_run_failure(role, tuple(sample[0].shape), exc)) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    return TracedModel(role=role, model=model, gm=gm, input_size=tuple(input_size),
                       nodes=node_infos(gm, primary, side_nodes), leaves=leaves, side=tuple(side))


__all__ = ["KDTracer", "NodeInfo", "TracedModel", "trace"]


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


def side_inputs(spec: Spec, model: nn.Module) -> tuple[SideInput, ...]:
    """The side inputs of ``spec``'s task, named as ``model``'s forward names them: for a
    denoiser, its second argument is the timestep and, class-conditional, its third the class."""
    if spec.denoise is None:
        return ()
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    wanted = 3 if spec.denoise.class_conditional else 2
    if len(names) < wanted:
        raise TraceError(f"{type(model).__name__}.forward({', '.join(names)}): a denoiser takes (x, t"
                         + (", y)" if spec.denoise.class_conditional else ")")
                         + " (denoise.class_conditional: " + str(spec.denoise.class_conditional).lower() + ")")
    side = [SideInput(names[1], "timestep", spec.denoise.timesteps)]
    if spec.denoise.class_conditional:
        classes = getattr(model, "num_classes", None)
        if hasattr(model, "num_classes") and not classes:  # it would ignore y and train unconditional
            raise TraceError(f"denoise.class_conditional: true, but {type(model).__name__} was built without classes "
                             f"(num_classes: {classes}); set num_classes in the model's kwargs to the dataset's "
                             "number of classes, or class_conditional: false")
        side.append(SideInput(names[2], "class", int(classes or 1)))
    return tuple(side)


def _trace(spec: Spec, art: ModelArtifacts, input_size: tuple[int, int, int], notes: list[str]) -> ModelArtifacts:
    """``trace``; a model on the meta device that cannot be traced or shape-propagated there
    (a constructor or forward that needs tensor values) is built from the spec with real
    weights and traced again, with a note. Its weights are only ever used for shapes here."""
    side = side_inputs(spec, art.model)
    if not holds_meta(art.model):
        return replace(art, traced=trace(art.model, input_size, role=art.role, side=side))
    try:  # planning: graph modules that never run write no code
        return replace(art, traced=trace(art.model, input_size, role=art.role, lazy=True, side=side))
    except Exception as exc:  # the real build's own trace raises the error that matters, if any
        model_spec = getattr(spec, art.role)
        model = create_model(model_spec.model, model_spec.kwargs, search_path=spec.source_dir)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        notes.append(f"{art.role} {model_spec.model}: planned with real weights (on the meta device, "
                     f"tracing failed: {first})")
        return replace(art, model=model, traced=trace(model, input_size, role=art.role, side=side))
