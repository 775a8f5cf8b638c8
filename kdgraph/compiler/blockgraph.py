"""Pass 9: the block graph, a networkx DiGraph of every way blocks can be wired.

Nodes: ``input``, ``labels``, teacher blocks ``T1..Tk``, student blocks ``S1..Sk``,
adapters ``lift_i`` / ``lower_i`` (or frozen projections ``project_i``) and loss nodes: the feature loss of block i, named by the
spec's ``loss.feature`` (``mse_i`` or ``dfm_i``), ``head_loss`` and ScaleKD's ``tpp_loss``.
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
  blocks (nodes ``P_j``) to ``tpp_loss``.

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
from kdgraph.ir import BlockPair, FeatureFormat, Pairing, graph_json
from kdgraph.losses import LOSSES, resolve_params, term_names
from kdgraph.spec.schema import LossSpec

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Models
    from kdgraph.spec import Spec



def _shape(cut) -> list | None:
    """The shape on an edge leaving ``cut``: one shape, or a list of shapes (multi-tensor)."""
    return cut.shapes if cut is not None else None


def _key(shape) -> tuple:
    """A shape (or a list of shapes) as a hashable key."""
    return tuple(_key(s) if isinstance(s, list) else s for s in (shape or ()))


def _loss_node(g: nx.DiGraph, node: str, role: str, entry: str, block: int, loss_spec: Mapping[str, Any],
               fmt: FeatureFormat | None = None) -> None:
    """Add loss node ``node``: its LOSSES entry, that entry's params resolved from the spec, its terms."""
    if LOSSES.get(entry).role != role:
        raise PlanError(f"loss {entry!r} is a {LOSSES.get(entry).role} loss, not a {role} loss")
    g.add_node(node, kind="loss", loss=role, block=block, entry=entry,
               params=resolve_params(entry, loss_spec, fmt), terms=list(term_names(entry, block)))


def build_block_graph(pairing: Pairing, input_shape: tuple[int, ...], num_classes: int | None,
                      has_teacher: bool, tpp_block: int | None = None, feature: str = "mse",
                      logits_shape: list[int] | None = None, loss_spec: Mapping[str, Any] | None = None) -> nx.DiGraph:
    """All blocks, adapters and losses; with ``tpp_block`` also ScaleKD's proxy path
    S_i -> lift_i -> P_(i+1) .. P_k -> tpp_loss, where P_j is teacher block j (frozen, shared
    with T_j) on the student's feature. ``loss_spec``: the spec's ``loss`` section, from which
    each loss node's params are resolved (None: the spec's defaults)."""
    loss_spec = LossSpec().model_dump() if loss_spec is None else loss_spec
    g = nx.DiGraph(feature=feature, tpp_block=tpp_block if has_teacher else None)
    k = pairing.k
    logits = list(logits_shape) if logits_shape else ([num_classes] if num_classes else None)
    g.add_node("input", kind="input", out_shape=list(input_shape))
    g.add_node("labels", kind="labels", out_shape=[])
    _loss_node(g, "head_loss", "head", "kd" if has_teacher else "ce", k, loss_spec)
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
    if has_teacher and tpp_block is not None:
        src = f"lift{tpp_block}" if f"lift{tpp_block}" in g else f"S{tpp_block}"
        for j in range(tpp_block + 1, k + 1):
            g.add_node(f"P{j}", kind="proxy", block=j, module=g.nodes[f"T{j}"]["module"],
                       out_shape=g.nodes[f"T{j}"]["out_shape"])
            g.add_edge(src, f"P{j}", kind="proxy", shape=g.nodes[src]["out_shape"])
            src = f"P{j}"
        _loss_node(g, "tpp_loss", "tpp", "tpp", tpp_block, loss_spec)
        g.add_edge(f"P{k}", "tpp_loss", kind="loss", shape=logits)
        g.add_edge(f"T{k}", "tpp_loss", kind="loss", shape=logits)
    g.add_edge(f"S{k}", "head_loss", kind="loss", shape=logits)
    g.add_edge("labels", "head_loss", kind="loss", shape=[])
    if has_teacher:
        g.add_edge(f"T{k}", "head_loss", kind="loss", shape=logits)
    validate_block_graph(g)
    return g


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
    _loss_node(g, loss, "feature", feature, i, loss_spec, fmt)
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
              "proxy": "dashed"}


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
                     input_size: tuple[int, int, int]) -> nx.DiGraph:
    """Pass 9: the block graph of every way blocks, adapters and losses can be wired (frozen)."""
    return nx.freeze(build_block_graph(pairing, input_size, models.student.num_classes, models.teacher is not None,
                                       tpp_block_of(spec, pairing), spec.loss.feature,
                                       models.student.logits_shape, spec.loss.model_dump()))
