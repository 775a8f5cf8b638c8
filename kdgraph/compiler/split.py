"""Pass 8: split a traced model at its block boundaries into segment GraphModules.

Segment i maps the tensor at boundary i-1 (the image for i = 1) to the tensor at
boundary i (the model's output for the last). Segments are GraphModules over the same
root, so they hold the very submodules and parameters of the model: training a segment
trains the model. Nodes that do not depend on the input (get_attr, constant arithmetic)
are copied into every segment that uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from kdgraph.errors import PlanError

from dataclasses import replace

if TYPE_CHECKING:
    from kdgraph.compiler.trace import TracedModel
    from kdgraph.compiler.artifacts import Models



def split_segments(traced: TracedModel, boundaries: list[str]) -> nn.ModuleList:
    """One GraphModule per block; ``boundaries`` are cut node names in graph order.

    After: composing the segments in order computes exactly the traced forward. Segments of
    a lazy traced GraphModule (planning) are lazy too: they write their code when first called.
    """
    from kdgraph.compiler.trace import graph_module, is_lazy  # not at module level: one floor less

    lazy = is_lazy(traced.gm)
    nodes = list(traced.gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    ends = [position[b] for b in boundaries] + [len(nodes) - 1]
    segments = []
    start = 0  # index of the node whose value feeds the segment
    for seg, end in enumerate(ends):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        feed = nodes[start]
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
            graph.output(env[nodes[end]])
        segments.append(graph_module(traced.gm, graph, f"{traced.role}_block{seg + 1}", lazy))
        start = end
    return nn.ModuleList(segments)


def split_pass(models: Models) -> Models:
    """Pass 8: each model split at its block boundaries into segments (shared parameters)."""
    return models.map(lambda art: replace(
        art, segments=tuple(split_segments(art.traced, [b.cut.node for b in art.boundaries]))))
