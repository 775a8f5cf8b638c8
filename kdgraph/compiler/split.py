"""Pass 8: split a traced model at its block boundaries into segment GraphModules.

Segment i maps the tensor at boundary i-1 (the image for i = 1) to the tensor at
boundary i (the model's output for the last). At a multi-tensor cut (a U-Net's skips) the
segment before it returns the tuple of the cut's tensors (graph order) and the segment
after it takes one argument per tensor; single-tensor cuts stay plain tensors. Segments are GraphModules over the same
root, so they hold the very submodules and parameters of the model: training a segment
trains the model. Nodes that do not depend on the input (get_attr, constant arithmetic)
are copied into every segment that uses them.

Side values (computed from a denoiser's timestep and class alone: the time embedding) are no
part of any cut. ``split_side`` makes one more GraphModule, the side segment, from the side
inputs to every side value a block reads; each block takes those it reads after its cut
tensors (``segment.side_inputs`` names them), so a decomposed student block can be fed the
teacher's features and its own time embedding.

An explicit layer pair (``Pairing.pairs``) whose cut lies inside a block is read by a ``Tap``:
an identity module inserted after the cut's node in that block's segment (a submodule of the
segment, not of the model: the model's state is unchanged), which keeps the value passing
through while armed. The tap of pair ``p1`` in the student is ``kdgraph_tap_xs_p1``, in the
teacher ``kdgraph_tap_xt_p1`` (the block graph's node names); a pair at a block's end needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from kdgraph.compiler.exported import is_batch_read
from kdgraph.errors import PlanError
from kdgraph.ir import Pairing

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Models, TracedModel

TAP_PREFIX = "kdgraph_tap_"


class Tap(nn.Module):
    """Identity that keeps the tensor passing through in ``value`` while ``armed`` (the
    distiller arms the taps of a training step and takes their values)."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.value = None

    def forward(self, x):
        if self.armed:
            self.value = x
        return x


def insert_tap(segment: fx.GraphModule, node_name: str, tap_name: str) -> None:
    """A ``Tap`` named ``TAP_PREFIX + tap_name`` after node ``node_name`` of ``segment``, every
    user of the node reading it through the tap."""
    node = next((n for n in segment.graph.nodes if n.name == node_name), None)
    if node is None:
        raise PlanError(f"{segment.__class__.__name__}: no node {node_name!r} to tap")
    segment.add_submodule(TAP_PREFIX + tap_name, Tap())
    with segment.graph.inserting_after(node):
        tapped = segment.graph.call_module(TAP_PREFIX + tap_name, (node,))
    node.replace_all_uses_with(tapped, delete_user_cb=lambda user: user is not tapped)
    segment.recompile()




def _lazy_kind() -> type[fx.GraphModule] | None:
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # a private torch API: None where it is gone
        return None
    return _LazyGraphModule


def graph_module(root: nn.Module, graph: fx.Graph, class_name: str, lazy: bool = False) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)``; ``lazy``: one that writes and compiles its
    Python code when first called or read (torch.fx's ``_LazyGraphModule``, as torch.compile
    uses), not now. Planning never runs its graph modules: writing their code was a tenth of
    `kdgraph plan`. Where torch has no lazy kind, a plain one."""
    kind = _lazy_kind() if lazy else None
    return (kind or fx.GraphModule)(root, graph, class_name)


def is_lazy(gm: fx.GraphModule) -> bool:
    """True for a GraphModule that writes its code when first called (``graph_module``)."""
    kind = _lazy_kind()
    return kind is not None and isinstance(gm, kind)


def _side_reads(traced: TracedModel, nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The side tensors ``nodes`` read (values of the side inputs alone, such as the time
    embedding, that an image-dependent node of them takes), in graph order."""
    info = traced.nodes
    reads = {a for n in nodes if info[n.name].input_dependent or n.op == "output"
             for a in n.all_input_nodes if info[a.name].side_dependent}
    return sorted(reads, key=lambda n: info[n.name].index)


def split_segments(traced: TracedModel, boundaries: Sequence[str | Sequence[str]]) -> nn.ModuleList:
    """One GraphModule per block; ``boundaries`` are cut node names in graph order, or for a
    multi-tensor cut the tuple of its tensors' node names (graph order, the last being the
    cut's position).

    A block takes the tensors of the cut before it (the image for the first), then the side
    tensors it reads (``segment.side_inputs`` names them; none for a model without side
    inputs); ``split_side`` computes them. After: composing the segments in order
    (``runtime.chain.call_segment``) computes exactly the traced forward. Segments of a lazy
    traced GraphModule (planning) are lazy too: they write their code when first called.
    """
    lazy = is_lazy(traced.gm)
    nodes = list(traced.gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    cut_nodes = [(b,) if isinstance(b, str) else tuple(b) for b in boundaries]
    ends = [position[b[-1]] for b in cut_nodes] + [len(nodes) - 1]
    segments = []
    start = 0  # index of the node at the cut that feeds the segment
    feeds: tuple[str, ...] = (nodes[0].name,)
    for seg, end in enumerate(ends):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for name in feeds:
            feed = nodes[position[name]]
            env[feed] = graph.placeholder("x" if seg == 0 else f"cut_{feed.name}")
        side = _side_reads(traced, nodes[start + 1:end + 1])
        for node in side:
            env[node] = graph.placeholder(f"side_{node.name}")
        _copy_range(traced, graph, env, nodes[start + 1:end + 1], seg)
        if nodes[end].op != "output":
            out = cut_nodes[seg]
            graph.output(env[nodes[end]] if len(out) == 1 else tuple(env[nodes[position[n]]] for n in out))
        segment = graph_module(traced.gm, graph, f"{traced.role}_block{seg + 1}", lazy)
        segment.side_inputs = tuple(n.name for n in side)
        segments.append(segment)
        start = end
        if seg < len(cut_nodes):
            feeds = cut_nodes[seg]
    return nn.ModuleList(segments)


def _copy_range(traced: TracedModel, graph: fx.Graph, env: dict[fx.Node, fx.Node], nodes: Sequence[fx.Node],
                seg: int) -> None:
    """Copy ``nodes`` (one block's part of the traced graph) into ``graph``; the constants they
    read are copied in too, the side values are the block's placeholders already in ``env``."""
    info = traced.nodes
    first = next(iter(env.values()))  # the block's first input: the cut's tensor (the batch first)

    def copy(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if is_batch_read(node):  # the batch size, read from this block's own input
            env[node] = graph.call_function(node.target, (first, 0))
            return env[node]
        if info[node.name].input_dependent or info[node.name].side_dependent:
            raise PlanError(f"segment {seg + 1} of the {traced.role} needs '{node.name}', "
                            "a value from an earlier segment: the boundary is not a cut")
        for dep in node.all_input_nodes:
            copy(dep)
        env[node] = graph.node_copy(node, lambda n: env[n])
        return env[node]

    for node in nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], copy))
            return
        if info[node.name].side_dependent or (not info[node.name].input_dependent and not node.users):
            continue  # side values come from split_side; asserts on constants are dead leftovers
        if is_batch_read(node):
            copy(node)
            continue
        for dep in node.all_input_nodes:
            copy(dep)
        env[node] = graph.node_copy(node, lambda n: env[n])


def split_side(traced: TracedModel, segments: Sequence[nn.Module]) -> fx.GraphModule | None:
    """The side segment: the model's side inputs (graph order: ``traced.side``) -> the tuple of
    every side tensor some block reads (``side_outputs`` names them, in graph order); None for
    a model without side inputs. It runs once per batch; each block takes its share."""
    if not traced.side:
        return None
    nodes = list(traced.gm.graph.nodes)
    wanted = sorted({name for seg in segments for name in seg.side_inputs}, key=lambda n: traced.nodes[n].index)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def copy(node: fx.Node) -> fx.Node:  # a constant (get_attr, constant arithmetic) the side values read
        if node not in env:
            for dep in node.all_input_nodes:
                copy(dep)
            env[node] = graph.node_copy(node, lambda n: env[n])
        return env[node]

    by_name = {n.name: n for n in nodes}
    needed, stack = set(), [by_name[name] for name in wanted]
    while stack:  # the side values the wanted ones are computed from
        node = stack.pop()
        if node not in needed and traced.nodes[node.name].side_dependent:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    for node in nodes:
        if node.op == "placeholder" and traced.nodes[node.name].side_dependent:
            env[node] = graph.placeholder(node.name)  # every side input, used or not: one calling convention
        elif node in needed:
            for dep in node.all_input_nodes:
                copy(dep)
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[by_name[name]] for name in wanted))
    side = graph_module(traced.gm, graph, f"{traced.role}_side", is_lazy(traced.gm))
    side.side_outputs = tuple(wanted)
    return side


def split_pass(models: Models, pairing: Pairing) -> Models:
    """Pass 8: each model split at its block boundaries into segments (shared parameters), with a
    tap for each explicit layer pair inside a block."""
    def one(art):
        segments = split_segments(art.traced, [b.cut.nodes if b.cut.multi else b.cut.node for b in art.boundaries])
        ends = {b.cut.node for b in art.boundaries}
        for pair in pairing.pairs:
            cut, block = (pair.student, pair.student_block) if art.role == "student" else \
                (pair.teacher, pair.teacher_block)
            if cut.node not in ends:
                insert_tap(segments[block - 1], cut.node, f"x{art.role[0]}_{pair.name}")
        return replace(art, segments=tuple(segments), side_segment=split_side(art.traced, segments))
    return models.map(one)
