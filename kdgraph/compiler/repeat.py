"""A plan's export of a deep decoder: trace a shallow copy, repeat its layers in the graph.

``torch.export`` traces a decoder op by op, so its time grows with the layers; but a decoder's
layers trace to the same ops (the layer types of ``config.layer_types`` repeating with some
period p: Gemma-2's sliding / full attention alternate, p = 2; most families have p = 1).
For a plan on the meta device (its graphs never run), a copy of the model with m = 2p
layers is exported and the graph of an L-layer model written from it: layers m..L−1 are
copies of the last traced period's layers (layer i of the one with i's residue mod p), their
parameters and module paths renamed to layer i's, their inputs the previous layer's output
and the shared tensors (rotary tables, masks) the traced layers read; the final norm and head
then read layer L−1. Node names are given afresh in graph order, as export names them.

The shortcut declines (``None``: the caller exports the whole model) unless the model is a
``CausalLM`` whose decoder stack is one ``nn.ModuleList`` of ``num_hidden_layers`` layers of
one class, L > m, the two traced layers of each residue have the same ops (layer 0's included), each layer's nodes are
contiguous, and a layer reads only itself, the layer before and nodes outside the stack.
``tests/test_exported.py`` compares the result with the whole model's export, node by node.
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Callable

import torch
from torch import nn

__all__ = ["shallow_export"]


def _period(config, n: int) -> int:
    types = getattr(config, "layer_types", None)
    if not types or len(types) != n:
        return 1
    return next(p for p in range(1, n + 1) if all(types[i] == types[i % p] for i in range(n)))


def _stack(model: nn.Module) -> tuple[str, int] | None:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return None
    found = [p for p, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1]
    return (found[0], n) if len(found) == 1 else None


def _shallow(model: nn.Module, m: int) -> nn.Module:
    """``model`` (a CausalLM) with its first ``m`` layers only, on the meta device."""
    from kdgraph.lm.source import CausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = m
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:m])
    with torch.device("meta"):
        return CausalLM(type(model.lm)(config))


def _layer_of(node: torch.fx.Node, path: str) -> int | None:
    """The decoder layer ``node`` belongs to (a parameter read or an op inside it), or None."""
    names = [node.target] if node.op == "get_attr" else [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    for name in names:
        if isinstance(name, str) and name.startswith(path + "."):
            index = name[len(path) + 1:].split(".")[0]
            if index.isdigit():
                return int(index)
    return None


def _layers(gm: torch.fx.GraphModule, path: str, m: int):
    """Per traced layer, its parameter reads and its ops (in graph order); None where a layer's
    ops are not contiguous or a later layer's graph is not the same as the one a period before."""
    reads: list[list[torch.fx.Node]] = [[] for _ in range(m)]
    ops: list[list[torch.fx.Node]] = [[] for _ in range(m)]
    seen = []
    for node in gm.graph.nodes:
        k = _layer_of(node, path)
        if k is not None and k < m:
            (reads if node.op == "get_attr" else ops)[k].append(node)
            if node.op != "get_attr":
                seen.append(k)
    if seen != sorted(seen) or any(not o for o in ops):
        return None
    return reads, ops


def _same(a: list[torch.fx.Node], b: list[torch.fx.Node]) -> bool:
    return [(n.op, n.target) for n in a] == [(n.op, n.target) for n in b]


def _renamed(meta: dict, old: str, new: str) -> dict:
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        def swap(p):
            return new + p[len(old):] if p == old or p.startswith(old + ".") else p
        meta["nn_module_stack"] = {swap(k) if isinstance(k, str) else k: (swap(p), c) for k, (p, c) in stack.items()}
    return meta


class _Writer:
    """Writes the L-layer graph node by node from the shallow one (``env``: old node -> new)."""

    def __init__(self, gm, path: str, m: int, n: int, p: int, reads, ops):
        self.gm, self.path, self.m, self.n, self.p = gm, path, m, n, p
        self.reads, self.ops = reads, ops
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.new_reads: dict[int, list[torch.fx.Node]] = {}
        self.new_ops: dict[int, list[torch.fx.Node]] = {}
        self.layer_of = {node: k for k in range(m) for node in reads[k] + ops[k]}

    def template(self, i: int) -> int:
        return self.m - self.p + (i - (self.m - self.p)) % self.p

    def emit(self, node, arg, target=None, meta=None) -> torch.fx.Node:
        """A copy of ``node`` (its inputs through ``arg``), named as export names it: its op's or
        parameter's name, numbered in graph order."""
        name = target.replace(".", "_") if target is not None else re.sub(r"_\d+$", "", node.name)
        new = self.graph.create_node(node.op, node.target if target is None else target,
                                     torch.fx.map_arg(node.args, arg), torch.fx.map_arg(node.kwargs, arg),
                                     name=name, type_expr=node.type)
        new.meta = dict(node.meta) if meta is None else meta
        return new

    def copy_reads(self, i: int) -> None:
        t = self.template(i)
        old, new = f"{self.path}.{t}.", f"{self.path}.{i}."
        self.new_reads[i] = [self.emit(r, lambda a: a, target=new + r.target[len(old):]) for r in self.reads[t]]

    def copy_ops(self, i: int) -> bool:
        t = self.template(i)
        own = {node: j for j, node in enumerate(self.ops[t])}
        before = {node: j for j, node in enumerate(self.ops[t - 1])}
        params = {node: j for j, node in enumerate(self.reads[t])}
        made: list[torch.fx.Node] = []
        ok = [True]

        def arg(a):
            if a in own:
                return made[own[a]]
            if a in params:
                return self.new_reads[i][params[a]]
            if a in before:
                return self.new_ops[i - 1][before[a]]
            if a in self.layer_of:
                ok[0] = False  # a layer reading another layer than the one before it
            return self.env[a]

        meta_of = lambda node: _renamed(node.meta, f"{self.path}.{t}", f"{self.path}.{i}")  # noqa: E731
        for node in self.ops[t]:
            made.append(self.emit(node, arg, meta=meta_of(node)))
        self.new_ops[i] = made
        return ok[0]

    def copy_rest(self, node) -> None:
        """An old node: as it is, where it reads the last traced layer, it reads layer L−1."""
        last = {x: j for j, x in enumerate(self.ops[self.m - 1])}
        k = self.layer_of.get(node)

        def arg(a):
            if k is None and a in last:
                return self.new_ops[self.n - 1][last[a]]
            return self.env[a]

        self.env[node] = new = self.emit(node, arg)
        if k is not None:
            (self.new_reads if node.op == "get_attr" else self.new_ops).setdefault(k, []).append(new)


def _write(gm, path: str, m: int, n: int, p: int, reads, ops) -> torch.fx.Graph | None:
    w = _Writer(gm, path, m, n, p, reads, ops)
    last_read, last_op = (reads[m - 1][-1] if reads[m - 1] else None), ops[m - 1][-1]
    for node in gm.graph.nodes:
        w.copy_rest(node)
        if node is last_read:
            for i in range(m, n):
                w.copy_reads(i)
        if node is last_op:
            if last_read is None:
                for i in range(m, n):
                    w.new_reads[i] = []
            for i in range(m, n):
                if not w.copy_ops(i):
                    return None
    return w.graph


def shallow_export(model: nn.Module, sample: torch.Tensor, role: str,
                   export: Callable[..., torch.fx.GraphModule]) -> torch.fx.GraphModule | None:
    """The static-batch export of ``model`` written from that of its ``2p``-layer copy
    (``export(model, sample, role, symbolic_batch=False)``), or None where the shortcut declines."""
    from kdgraph.lm.source import CausalLM

    found = _stack(model) if isinstance(model, CausalLM) else None
    if found is None:
        return None
    path, n = found
    p = _period(model.config, n)
    m = 2 * p
    if n <= m:
        return None
    gm = export(_shallow(model, m), sample, role, symbolic_batch=False)
    parts = _layers(gm, path, m)
    if parts is None or not all(_same(parts[1][k], parts[1][k - p]) for k in range(p, m)):
        return None
    graph = _write(gm, path, m, n, p, *parts)
    if graph is None:
        return None
    targets = {node.target for node in graph.nodes if node.op in ("get_attr", "call_module")}

    def owner(target: str):
        try:
            return operator.attrgetter(target)(model)
        except AttributeError:
            return operator.attrgetter(target)(gm)  # export's own (its input guard, lifted constants)

    out = torch.fx.GraphModule({t: owner(t) for t in targets}, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out
