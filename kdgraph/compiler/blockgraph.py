"""Pass 9: the block graph, a networkx DiGraph of every way blocks can be wired.

Nodes: ``input``, ``labels``, teacher blocks ``T1..Tk``, student blocks ``S1..Sk``,
adapters ``lift_i`` / ``lower_i`` (or frozen projections ``project_i``) and loss nodes: the feature
loss of block i, named by the spec's ``loss.feature`` (``mse_i`` or ``dfm_i``), ``head_loss``
(``loss.logit``'s entry with a teacher, ``ce`` without) and ScaleKD's ``tpp_loss``.
A loss node names its ``kdgraph.losses.LOSSES`` entry (``entry``), the entry's constructor
arguments resolved from the spec (``params``) and the ``terms`` it adds (the names training
logs), so that the runtime builds every loss from the graph alone. Every edge carries the
shape of the tensor on it and a ``kind``:

- ``teacher``: T(i-1) -> T(i), the frozen teacher;
- ``student``: S(i) -> S(i+1), the plain student chain (vanilla KD, supervised);
- ``adapted``: S(i) -> lift_i -> lower_i -> S(i+1), the chain inside a merged StableKD group;
- ``decompose``: T(i) -> S(i+1) (through lower_i where widths differ, or through the frozen
  projection ``project_i`` with ``decompose.adapters: projected``), a decomposed input;
- ``loss``: the tensors that meet at a loss node;
- ``proxy``: ScaleKD's TPP path, the student's feature through the frozen teacher's later
  blocks (nodes ``P_j``) to ``tpp_loss``;
- ``cache``: input -> ``cache``, the teacher's logits of the input's view replayed from a
  teacher cache (``teacher.cache``). A full cache feeds ``head_loss`` (its entry unchanged), a
  top-k one too where the head loss is a causal LM's token loss; any other
  top-k cache feeds ``fkd_loss`` (entry ``fkd``, FKD's soft label), the head loss of the
  stages that replay it. ``program.stage_program`` reads the cache in a stage whose only
  teacher read is the head's (``Program.replayable``).
- ``tap``: S_i -> ``xs_p1`` and T_j -> ``xt_p1``, the value of an explicit layer pair's module
  inside block i (j) of the student (teacher), read by a tap in that block's segment; the
  pair's student side is lifted (``xlift_p1``) where the features differ and meets the
  teacher's at the pair's feature loss (``mse_p1``). Pair nodes carry ``explicit=True``.

At a multi-tensor cut (a U-Net's skips) an edge carries the list of its tensors' shapes,
lift and lower act per tensor, a decompose edge feeds the next student block every teacher
tensor of the cut, and the feature loss compares every tensor (the mean of the per-tensor
MSEs).

A plan stage is a choice of these edges (``program.stage_edges``); ``program.stage_program``
turns that choice into the operations the runtime executes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import networkx as nx

from kdgraph.errors import PlanError
from kdgraph.ir import BlockPair, ExplicitPair, FeatureFormat, Pairing, graph_json
from kdgraph.losses import LOSSES, resolve_params, term_names
from kdgraph.registry import DATASET_TASKS, LOGIT_LOSSES, TASK_HEAD_LOSSES, TASK_LOSS_DEFAULTS
from kdgraph.spec.schema import LossSpec

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import ModelArtifacts, Models
    from kdgraph.spec import Spec



def _shape(cut) -> list | None:
    """The shape on an edge leaving ``cut``: one shape, or a list of shapes (multi-tensor)."""
    return cut.shapes if cut is not None else None


def _key(shape) -> tuple:
    """A shape (or a list of shapes) as a hashable key."""
    return tuple(_key(s) if isinstance(s, list) else s for s in (shape or ()))


def _loss_node(g: nx.DiGraph, node: str, role: str, entry: str, block: int, loss_spec: Mapping[str, Any],
               fmt: FeatureFormat | None = None, label: str | None = None, **attrs) -> None:
    """Add loss node ``node``: its LOSSES entry, that entry's params resolved from the spec, its
    terms (``{block}`` in their names is ``label``, by default the block index)."""
    if LOSSES.get(entry).role != role and not (role == "head" and LOSSES.get(entry).role == "token"):
        raise PlanError(f"loss {entry!r} is a {LOSSES.get(entry).role} loss, not a {role} loss")
    g.add_node(node, kind="loss", loss=role, block=block, entry=entry, params=resolve_params(entry, loss_spec, fmt),
               terms=list(term_names(entry, block if label is None else label)), **attrs)


def _explicit_pair(g: nx.DiGraph, pair: ExplicitPair, loss_spec: Mapping[str, Any], input_hw: tuple[int, ...]) -> None:
    """Pair ``pair``'s nodes: the student's tap ``xs_p1`` (after block S_i, the value inside it),
    the teacher's ``xt_p1``, the student side's lift ``xlift_p1`` where the features differ, and
    the loss node ``mse_p1`` (terms ``mse_p1``), all marked explicit."""
    n = pair.name
    s_shape, t_shape = list(pair.student.shape), list(pair.teacher.shape)
    g.add_node(f"xs_{n}", kind="tap", role="student", block=pair.student_block, module=pair.student.label,
               out_shape=s_shape, explicit=True)
    g.add_node(f"xt_{n}", kind="tap", role="teacher", block=pair.teacher_block, module=pair.teacher.label,
               out_shape=t_shape, explicit=True)
    g.add_edge(f"S{pair.student_block}", f"xs_{n}", kind="tap", shape=g.nodes[f"S{pair.student_block}"]["out_shape"])
    g.add_edge(f"T{pair.teacher_block}", f"xt_{n}", kind="tap", shape=g.nodes[f"T{pair.teacher_block}"]["out_shape"])
    src = f"xs_{n}"
    if pair.adapter is not None:
        a = pair.adapter
        g.add_node(f"xlift_{n}", kind="adapter", role="pair_lift", block=pair.student_block, channels=list(a.lift),
                   out_shape=t_shape, params=a.lift_params, explicit=True)
        g.add_edge(src, f"xlift_{n}", kind="adapted", shape=s_shape)
        src = f"xlift_{n}"
    fmt = FeatureFormat.of(pair.teacher, tuple(input_hw)) if "fmt" in LOSSES.get(pair.loss).params else None
    _loss_node(g, f"{pair.loss}_{n}", "feature", pair.loss, pair.student_block,
               {**loss_spec, "feature_weight": pair.weight}, fmt, label=f"_{n}", explicit=True)
    g.add_edge(src, f"{pair.loss}_{n}", kind="loss", shape=t_shape)
    g.add_edge(f"xt_{n}", f"{pair.loss}_{n}", kind="loss", shape=t_shape)


def resolved_loss(loss_spec: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The spec's ``loss`` section with its task defaults filled in: a field left None takes the
    task's value (``TASK_LOSS_DEFAULTS``); ``ignore_index`` that no task fills is -100."""
    out = dict(loss_spec)
    defaults = {"ignore_index": -100, **(TASK_LOSS_DEFAULTS.get(task) if task in TASK_LOSS_DEFAULTS else {})}
    out.update({field: value for field, value in defaults.items() if out.get(field) is None})
    return out


def _check_levels(loss_spec: Mapping[str, Any], k: int, has_teacher: bool) -> None:
    """``loss.feature_weights``: one weight per inner block end (a level), where there is a teacher."""
    levels = loss_spec.get("feature_weights")
    if levels is not None and has_teacher and len(levels) != k - 1:
        raise PlanError(f"loss.feature_weights has {len(levels)} weights for {k - 1} inner block ends "
                        f"(decompose.blocks {k}): one weight per level")


def head_entry(loss_spec: Mapping[str, Any], has_teacher: bool, task: str = "classification") -> str:
    """The head loss's LOSSES entry: a task's own (``TASK_HEAD_LOSSES``: the denoiser's
    ``denoise`` with a teacher, ``ddpm`` without); else ``loss.logit``'s with a teacher,
    cross-entropy alone without."""
    if task in TASK_HEAD_LOSSES:
        entries = TASK_HEAD_LOSSES.get(task)
        return (entries(loss_spec) if callable(entries) else entries)[0 if has_teacher else 1]
    return LOGIT_LOSSES.get(loss_spec["logit"]).entry if has_teacher else "ce"


def task_of(spec: Spec, student: ModelArtifacts) -> str:
    """The run's task (a ``TASKS`` name): the spec's, else inferred where unambiguous: a denoise
    block makes it ``denoise``, text ``causal_lm``, per-pixel logits ``dense``, anything else ``classification``.
    A spec that names classification or dense for a student predicting the other is refused, and so is
    a dataset one task alone reads (``DATASET_TASKS``) in a run of another task."""
    if spec.denoise is not None:
        return "denoise"
    if spec.data.dataset == "text":
        return "causal_lm"
    inferred = "dense" if student.traced is not None and student.per_pixel else "classification"
    if spec.task in ("classification", "dense") and spec.task != inferred and student.traced is not None:
        raise PlanError(f"task: {spec.task}, but the student's output {list(student.output_shape or ())} is "
                        f"{'per-pixel logits' if inferred == 'dense' else 'not per-pixel logits on the input grid'}")
    owner = DATASET_TASKS.get(spec.data.dataset) if spec.data.dataset in DATASET_TASKS else None
    if owner is not None and (spec.task or inferred) != owner and student.traced is not None:
        raise PlanError(f"data.dataset: {spec.data.dataset} is read by task {owner} alone, but this is a "
                        f"{spec.task or inferred} run (the student's output {list(student.output_shape or ())})")
    return spec.task or inferred


def build_block_graph(pairing: Pairing, input_shape: tuple[int, ...], num_classes: int | None,
                      has_teacher: bool, tpp_block: int | None = None, feature: str = "mse",
                      logits_shape: list[int] | None = None, loss_spec: Mapping[str, Any] | None = None,
                      cache: str | None = None, task: str = "classification") -> nx.DiGraph:
    """All blocks, adapters and losses; with ``tpp_block`` also ScaleKD's proxy path
    S_i -> lift_i -> P_(i+1) .. P_k -> tpp_loss, where P_j is teacher block j (frozen, shared
    with T_j) on the student's feature. ``loss_spec``: the spec's ``loss`` section, from which
    each loss node's params are resolved (None: the spec's defaults). ``cache``: the mode of
    the teacher cache the spec names (``full`` or ``topk``), None without one. ``task``: its head
    loss where the task has its own (a denoiser's ``labels`` node is then the true noise)."""
    loss_spec = resolved_loss(LossSpec().model_dump() if loss_spec is None else loss_spec, task)
    _check_levels(loss_spec, pairing.k, has_teacher)
    g = nx.DiGraph(feature=feature, tpp_block=tpp_block if has_teacher else None)
    k = pairing.k
    logits = list(logits_shape) if logits_shape else ([num_classes] if num_classes else None)
    g.add_node("input", kind="input", out_shape=list(input_shape))
    g.add_node("labels", kind="labels", out_shape=[])
    _loss_node(g, "head_loss", "head", head_entry(loss_spec, has_teacher, task), k, loss_spec)
    for block in pairing.blocks:
        i = block.index
        s_out = _shape(block.student) if not block.is_head else logits
        g.add_node(f"S{i}", kind="student", block=i,
                   module=block.student.description if block.student else "head", out_shape=s_out)
        if has_teacher:
            t_out = _shape(block.teacher) if not block.is_head else logits
            g.add_node(f"T{i}", kind="teacher", block=i,
                       module=block.teacher.description if block.teacher else "head", out_shape=t_out)
    for block in pairing.blocks:
        i = block.index
        prev = "input" if i == 1 else None
        g.add_edge(prev or f"S{i - 1}", f"S{i}", kind="student",
                   shape=g.nodes[prev or f"S{i - 1}"]["out_shape"])
        if has_teacher:
            tprev = "input" if i == 1 else f"T{i - 1}"
            g.add_edge(tprev, f"T{i}", kind="teacher", shape=g.nodes[tprev]["out_shape"])
        if block.is_head or not has_teacher:
            continue
        if feature == "dfm" and block.multi:
            raise PlanError(f"block {i} ends at a multi-tensor cut ({block.student.description}): loss.feature "
                            "dfm compares one feature map; use loss.feature: mse")
        _wire_feature(g, block, feature, loss_spec, tuple(input_shape[1:]))
    for pair in pairing.pairs:
        _explicit_pair(g, pair, loss_spec, input_shape[1:])
    if has_teacher and tpp_block is not None:
        _proxy_path(g, tpp_block, k, logits, loss_spec)
    g.add_edge(f"S{k}", "head_loss", kind="loss", shape=logits)
    g.add_edge("labels", "head_loss", kind="loss", shape=[])
    if has_teacher:
        g.add_edge(f"T{k}", "head_loss", kind="loss", shape=logits)
    if has_teacher and cache is not None:
        _cache_nodes(g, k, logits, cache, loss_spec, task)
    validate_block_graph(g)
    return g


def _proxy_path(g: nx.DiGraph, tpp_block: int, k: int, logits: list | None, loss_spec: Mapping[str, Any]) -> None:
    """ScaleKD's proxy path: the student's feature at ``tpp_block`` (through its lift) into the
    frozen teacher's later blocks P_(i+1) .. P_k, and the tpp loss on its output."""
    src = f"lift{tpp_block}" if f"lift{tpp_block}" in g else f"S{tpp_block}"
    for j in range(tpp_block + 1, k + 1):
        g.add_node(f"P{j}", kind="proxy", block=j, module=g.nodes[f"T{j}"]["module"],
                   out_shape=g.nodes[f"T{j}"]["out_shape"])
        g.add_edge(src, f"P{j}", kind="proxy", shape=g.nodes[src]["out_shape"])
        src = f"P{j}"
    _loss_node(g, "tpp_loss", "tpp", "tpp", tpp_block, loss_spec)
    g.add_edge(f"P{k}", "tpp_loss", kind="loss", shape=logits)
    g.add_edge(f"T{k}", "tpp_loss", kind="loss", shape=logits)


def _cache_nodes(g: nx.DiGraph, k: int, logits: list | None, cache: str, loss_spec: Mapping[str, Any],
                 task: str) -> None:
    """The cache node (the teacher's logits, replayed) and the head loss it feeds: a causal
    LM's token loss reads a top-k cache's rows itself (``kdgraph.lm.token_losses``)."""
    g.add_node("cache", kind="cache", block=k, module=f"teacher cache ({cache})", out_shape=logits)
    g.add_edge("input", "cache", kind="cache", shape=g.nodes["input"]["out_shape"])
    head = "head_loss"
    if cache == "topk" and task != "causal_lm":
        if logits is None or len(logits) != 1:
            raise PlanError(f"a top-k teacher cache holds class probabilities of (C,) logits; the logits are "
                            f"{logits}: build the cache with --full")
        if loss_spec["logit"] != "kl" or loss_spec.get("standardize"):
            raise PlanError(f"a top-k teacher cache replays through FKD's soft label, a form of loss.logit kl "
                            f"without loss.standardize (this spec: logit {loss_spec['logit']}, standardize "
                            f"{bool(loss_spec.get('standardize'))}): build the cache with --full")
        head = "fkd_loss"
        _loss_node(g, head, "head", "fkd", k, loss_spec)
        g.add_edge(f"S{k}", head, kind="loss", shape=logits)
        g.add_edge("labels", head, kind="loss", shape=[])
    g.add_edge("cache", head, kind="loss", shape=logits)


def _wire_feature(g: nx.DiGraph, block: BlockPair, feature: str, loss_spec: Mapping[str, Any], input_hw: tuple) -> None:
    """Block i's end: its adapters (or frozen projection), the decompose edge feeding S(i+1)
    and the feature loss where student and teacher meet."""
    i = block.index
    s_shape, t_shape = _shape(block.student), _shape(block.teacher)
    loss = f"{feature}{i}"
    a = block.adapter
    if a is not None:
        g.add_node(f"lift{i}", kind="adapter", role="lift", block=i, channels=list(a.lift),
                   out_shape=t_shape, params=a.lift_params)
        g.add_node(f"lower{i}", kind="adapter", role="lower", block=i, channels=list(a.lower),
                   out_shape=s_shape, params=a.lower_params)
        g.add_edge(f"S{i}", f"lift{i}", kind="adapted", shape=s_shape)
        g.add_edge(f"lift{i}", f"lower{i}", kind="adapted", shape=t_shape)
        g.add_edge(f"lower{i}", f"S{i + 1}", kind="adapted", shape=s_shape)
        g.add_edge(f"T{i}", f"lower{i}", kind="decompose", shape=t_shape)
        g.add_edge(f"lift{i}", loss, kind="loss", shape=t_shape)
    elif block.projection is not None:
        # The teacher's feature in the student's format: it feeds S(i+1) and is what S(i)
        # is trained to produce; the student chain S(i) -> S(i+1) stays direct.
        p = block.projection
        g.add_node(f"project{i}", kind="projection", block=i, method=p.describe(), out_shape=s_shape)
        g.add_edge(f"T{i}", f"project{i}", kind="decompose", shape=t_shape)
        g.add_edge(f"project{i}", f"S{i + 1}", kind="decompose", shape=s_shape)
        g.add_edge(f"project{i}", loss, kind="loss", shape=s_shape)
        g.add_edge(f"S{i}", loss, kind="loss", shape=s_shape)
    else:
        g.add_edge(f"T{i}", f"S{i + 1}", kind="decompose", shape=t_shape)
        g.add_edge(f"S{i}", loss, kind="loss", shape=s_shape)
    fmt_cut = block.student if block.projection is not None else block.teacher
    fmt = FeatureFormat.of(fmt_cut, input_hw) if "fmt" in LOSSES.get(feature).params else None
    levels = loss_spec.get("feature_weights")
    _loss_node(g, loss, "feature", feature, i, loss_spec if levels is None else
               {**loss_spec, "feature_weight": levels[i - 1]}, fmt)
    if block.projection is None:
        g.add_edge(f"T{i}", loss, kind="loss", shape=t_shape)


def validate_block_graph(g: nx.DiGraph) -> None:
    """Acyclic; every student block reaches a loss; every loss compares equal shapes."""
    if not nx.is_directed_acyclic_graph(g):
        raise PlanError(f"block graph has a cycle: {nx.find_cycle(g)}")
    losses = [n for n, d in g.nodes(data=True) if d["kind"] == "loss"]
    for n, d in g.nodes(data=True):
        if d["kind"] == "student" and not any(nx.has_path(g, n, loss) for loss in losses):
            raise PlanError(f"block graph: student block {n} reaches no loss, so it is never trained")
    for u, v, d in g.edges(data=True):
        if g.nodes[v]["kind"] == "loss" and u != "labels":
            shapes = {_key(e["shape"]) for a, _, e in g.in_edges(v, data=True) if a != "labels"}
            if len(shapes) > 1:
                raise PlanError(f"block graph: {v} compares tensors of different shapes {sorted(shapes)}")
        elif d["shape"] is not None and g.nodes[u].get("out_shape") is not None \
                and list(d["shape"]) != list(g.nodes[u]["out_shape"]):
            raise PlanError(f"block graph: edge {u}->{v} carries {d['shape']}, {u} makes {g.nodes[u]['out_shape']}")
    for v in g.nodes:
        if g.nodes[v]["kind"] == "student":
            feeds = {_key(e["shape"]) for _, _, e in g.in_edges(v, data=True)}
            if len(feeds) > 1:
                raise PlanError(f"block graph: {v} is fed tensors of different shapes {sorted(feeds)}")


to_json = graph_json  # the graph's JSON form is defined once, in kdgraph.ir


def _channels(channels: list) -> str:
    """``16x32``, or per tensor of a multi-tensor cut ``8x16, -, 32x64``."""
    if channels and isinstance(channels[0], (list, type(None))):
        return ", ".join("x".join(map(str, c)) if c else "-" for c in channels)
    return "x".join(map(str, channels))


def node_label(n: str, d: dict) -> str:
    extra = d.get("module") or d.get("method") or (_channels(d["channels"]) if "channels" in d else "")
    shape = d.get("out_shape")
    parts = [n] + ([extra] if extra else []) + ([str(shape)] if shape else [])
    return "\\n".join(parts)


_DOT_STYLE = {"teacher": "solid", "student": "solid", "adapted": "dashed", "decompose": "bold", "loss": "dotted",
              "proxy": "dashed", "tap": "dotted", "cache": "dashed"}


def to_dot(g: nx.DiGraph, name: str = "kdgraph") -> str:
    lines = [f'digraph "{name}" {{', "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    for n, d in g.nodes(data=True):
        shape = {"loss": "ellipse", "adapter": "diamond", "projection": "diamond"}.get(d["kind"], "box")
        lines.append(f'  "{n}" [label="{node_label(n, d)}", shape={shape}];')
    for u, v, d in g.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [style={_DOT_STYLE[d["kind"]]}, label="{d["kind"]}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(g: nx.DiGraph) -> str:
    lines = ["flowchart LR"]
    for n, d in g.nodes(data=True):
        text = node_label(n, d).replace("\\n", "<br/>")
        open_, close = {"loss": ("((", "))"), "adapter": ("{", "}"), "projection": ("{", "}")}.get(d["kind"], ("[", "]"))
        lines.append(f'  {n}{open_}"{text}"{close}')
    arrows = {"adapted": "-.->", "loss": "-.-o", "decompose": "==>"}
    for u, v, d in g.edges(data=True):
        lines.append(f"  {u} {arrows.get(d['kind'], '-->')}|{d['kind']}| {v}")
    return "\n".join(lines) + "\n"


def dumps(g: nx.DiGraph) -> str:
    return json.dumps(to_json(g), indent=2)


def tpp_block_of(spec: Spec, pairing: Pairing) -> int | None:
    return (spec.loss.tpp_block or pairing.k - 1) if spec.loss.tpp else None


def block_graph_pass(spec: Spec, models: Models, pairing: Pairing,
                     input_size: tuple[int, int, int], cache_header: dict | None = None) -> nx.DiGraph:
    """Pass 9: the block graph of every way blocks, adapters and losses can be wired (frozen);
    ``cache_header``: the header of the teacher cache the run replays (None: none)."""
    if spec.data.mixup is not None and models.student.per_pixel:
        raise PlanError("data.mixup: mixup mixes one class label per image; this student predicts a class per "
                        "pixel (set data.mixup: null)")
    return nx.freeze(build_block_graph(pairing, input_size, models.student.num_classes, models.teacher is not None,
                                       tpp_block_of(spec, pairing), spec.loss.feature,
                                       models.student.logits_shape, spec.loss.model_dump(), cache_mode(cache_header),
                                       task_of(spec, models.student)))


def cache_mode(header: dict | None) -> str | None:
    """The mode (``full``, ``topk``) of the teacher cache whose header is ``header`` (None: no cache)."""
    return None if header is None else header["key"]["mode"]["value"]["mode"]
