"""Pass 8: split a traced model at its block boundaries into segment GraphModules.

Segment i maps the tensor at boundary i-1 (the image for i = 1) to the tensor at
boundary i (the model's output for the last). At a multi-tensor cut (a U-Net's skips) the
segment before it returns the tuple of the cut's tensors (graph order) and the segment
after it takes one argument per tensor; single-tensor cuts stay plain tensors. Segments are GraphModules over the same
root, so they hold the very submodules and parameters of the model: training a segment
trains the model. Nodes that do not depend on the input (get_attr, constant arithmetic)
are copied into every segment that uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from kdgraph.errors import PlanError

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Models, TracedModel




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


def split_segments(traced: TracedModel, boundaries: Sequence[str | Sequence[str]]) -> nn.ModuleList:
    """One GraphModule per block; ``boundaries`` are cut node names in graph order, or for a
    multi-tensor cut the tuple of its tensors' node names (graph order, the last being the
    cut's position).

    After: composing the segments in order (``runtime.chain.call_segment``) computes exactly
    the traced forward. Segments of a lazy traced GraphModule (planning) are lazy too: they
    write their code when first called.
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

        def copy(node: fx.Node, seg=seg, graph=graph, env=env) -> fx.Node:
            if node in env:
                return env[node]
            if traced.nodes[node.name].input_dependent:
                raise PlanError(f"segment {seg + 1} of the {traced.role} needs '{node.name}', "
                                "a value from an earlier segment: the boundary is not a cut")
            for dep in node.all_input_nodes:
                copy(dep)
            env[node] = graph.node_copy(node, lambda n: env[n])
            return env[node]

        for node in nodes[start + 1:end + 1]:
            if node.op == "output":
                graph.output(fx.node.map_arg(node.args[0], copy))
                break
            if not traced.nodes[node.name].input_dependent and not node.users:
                continue  # asserts on constants and other dead leftovers of concrete args
            for dep in node.all_input_nodes:
                copy(dep)
            env[node] = graph.node_copy(node, lambda n: env[n])
        else:
            out = cut_nodes[seg]
            graph.output(env[nodes[end]] if len(out) == 1 else tuple(env[nodes[position[n]]] for n in out))
        segments.append(graph_module(traced.gm, graph, f"{traced.role}_block{seg + 1}", lazy))
        start = end
        if seg < len(cut_nodes):
            feeds = cut_nodes[seg]
    return nn.ModuleList(segments)


def split_pass(models: Models) -> Models:
    """Pass 8: each model split at its block boundaries into segments (shared parameters)."""
    return models.map(lambda art: replace(
        art, segments=tuple(split_segments(art.traced, [b.cut.nodes if b.cut.multi else b.cut.node
                                                         for b in art.boundaries]))))
