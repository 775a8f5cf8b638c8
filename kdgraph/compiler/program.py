"""A training stage as a program: the block graph's stage edges, turned into ordered operations.

``stage_program`` takes the edges one stage uses (``blockgraph.stage_edges``), keeps the
nodes some loss depends on, and orders them: the frozen teacher's blocks first, then each
student block followed by what reads it (its lift, TPP's proxy path, its feature loss, the
lower feeding the next block). Every operation names the graph node it computes and the
nodes it reads, so the runtime executes exactly this list (``Distiller.forward``), and the
loss terms a stage is trained with are those of its loss nodes.

    program = stage_program(g, ((1, 2), (3, 4)), chain_adapters=True, feature_losses=False)
    [op.node for op in program.ops]   # ['T2', 'T4', 'S1', 'lift1', 'lower1', 'S2', ...]
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from kdgraph.compiler.blockgraph import stage_edges


@dataclass(frozen=True)
class Op:
    """Compute graph node ``node`` (of ``kind``) from the values of ``inputs``, in that order.

    kinds: ``teacher`` (frozen teacher block, no autograd), ``student`` (student block),
    ``lift`` / ``lower`` (the adapter pair after block ``block``), ``proxy`` (teacher block
    ``block`` on a student feature, with autograd: TPP), ``loss`` (adds ``terms``; ``loss``
    says which: feature, head or tpp)."""

    node: str
    kind: str
    inputs: tuple[str, ...]
    block: int | None = None
    loss: str = ""
    terms: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {"node": self.node, "kind": self.kind, "inputs": list(self.inputs), "block": self.block}
        if self.kind == "loss":
            d.update(loss=self.loss, terms=list(self.terms))
        return d


@dataclass(frozen=True)
class Program:
    """The operations of one training stage, in execution order, and the edges they realise."""

    ops: tuple[Op, ...]
    edges: tuple[tuple[str, str], ...]

    @property
    def terms(self) -> tuple[str, ...]:
        """Every loss term the stage computes, in the order it computes them."""
        return tuple(t for op in self.ops if op.kind == "loss" for t in op.terms)

    @property
    def teacher_reads(self) -> tuple[int, ...]:
        """The teacher blocks whose outputs the rest of the program reads (the teacher runs
        up to the last of them)."""
        teacher = {op.node: op.block for op in self.ops if op.kind == "teacher"}
        return tuple(sorted({teacher[n] for op in self.ops if op.kind != "teacher" for n in op.inputs
                             if n in teacher}))

    def terms_of(self, group: tuple[int, ...]) -> tuple[str, ...]:
        """The loss terms of the loss nodes that the blocks of ``group`` reach."""
        return tuple(t for op in self.ops if op.kind == "loss" and op.block in group for t in op.terms)

    def to_dict(self) -> dict:
        return {"ops": [op.to_dict() for op in self.ops], "edges": [list(e) for e in self.edges]}


# Among nodes ready at once: the teacher first, then per block: the block, its lift, TPP's
# proxy path and loss, its feature loss, the lower that feeds the next block; the head loss last.
_ORDER = {"student": 0, "lift": 1, "proxy": 2, "tpp": 3, "feature": 4, "lower": 5, "head": 6}


def _rank(g: nx.DiGraph, n: str) -> tuple[int, int, int, int]:
    d = g.nodes[n]
    kind = d["kind"]
    if kind in ("input", "labels"):
        return (0, 0, 0, 0)
    if kind == "teacher":
        return (1, d["block"], 0, 0)
    if kind == "proxy":
        return (2, g.graph["tpp_block"], _ORDER["proxy"], d["block"])
    if kind == "adapter":
        return (2, d["block"], _ORDER[d["role"]], 0)
    if kind == "loss":
        block = g.graph["tpp_block"] if d["loss"] == "tpp" else d["block"]
        return (2, block, _ORDER[d["loss"]], 0)
    return (2, d["block"], _ORDER["student"], 0)


def _inputs(g: nx.DiGraph, edges: set[tuple[str, str]], n: str) -> tuple[str, ...]:
    """The sources of ``n``'s stage edges; a loss reads the student side, then the labels,
    then the teacher."""
    sources = [u for u, _ in g.in_edges(n) if (u, n) in edges]
    if g.nodes[n]["kind"] != "loss":
        return tuple(sources)
    order = {"labels": 1, "teacher": 2}
    return tuple(sorted(sources, key=lambda u: order.get(g.nodes[u]["kind"], 0)))


def _op(g: nx.DiGraph, edges: set[tuple[str, str]], n: str) -> Op:
    d = g.nodes[n]
    kind = d["role"] if d["kind"] == "adapter" else d["kind"]
    if kind == "loss":
        block = g.graph["tpp_block"] if d["loss"] == "tpp" else d["block"]
        return Op(n, "loss", _inputs(g, edges, n), block, d["loss"], tuple(d["terms"]))
    return Op(n, kind, _inputs(g, edges, n), d["block"])


def stage_program(g: nx.DiGraph, groups: tuple[tuple[int, ...], ...], *, chain_adapters: bool,
                  feature_losses: bool, tpp_block: int | None = None) -> Program:
    """The program of one training stage of ``groups`` (see ``blockgraph.stage_edges``)."""
    edges = stage_edges(g, [list(grp) for grp in groups], feature_losses, tpp_block, chain_adapters)
    stage = nx.DiGraph(edges)
    losses = [n for n in stage if g.nodes[n]["kind"] == "loss"]
    needed = set(losses).union(*(nx.ancestors(stage, n) for n in losses))
    order = nx.lexicographical_topological_sort(stage.subgraph(needed), key=lambda n: _rank(g, n))
    used = {e for e in edges if e[0] in needed and e[1] in needed}
    ops = tuple(_op(g, used, n) for n in order if g.nodes[n]["kind"] not in ("input", "labels"))
    return Program(ops, tuple(e for e in edges if e in used))
