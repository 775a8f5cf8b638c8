"""A training stage as a program: the block graph's stage edges, turned into ordered operations.

``stage_program`` takes the edges one stage uses (``stage_edges``), keeps the
nodes some loss depends on, and orders them: the frozen teacher's blocks first, then each
student block followed by what reads it (its lift, the taps of explicit layer pairs inside
it, TPP's proxy path, its feature loss, the lower feeding the next block). Every operation names the graph node it computes and the
nodes it reads, so the runtime executes exactly this list (``Distiller.forward``), and the
loss terms a stage is trained with are those of its loss nodes. A program that runs every
student block in order from the input and reads the last one only (kd, supervised) runs the
student's own forward instead: one ``whole`` op (``whole_student``).

    program = stage_program(g, ((1, 2), (3, 4)), chain_adapters=True, feature_losses=False)
    [op.node for op in program.ops]   # ['T2', 'T4', 'S1', 'lift1', 'lower1', 'S2', ...]
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from kdgraph.ir import Op, Program


def stage_edges(g: nx.DiGraph, groups: list[list[int]], feature_losses: bool,
                tpp_block: int | None = None, chain_adapters: bool = True) -> list[tuple[str, str]]:
    """The edges one training stage uses.

    Each group [a..b] is fed the input (a = 1) or the teacher's output of block a-1 (through
    lower where present), runs its blocks through the adapted chain (the plain chain where no
    adapter exists, or where ``chain_adapters`` is off: a method that trains no adapter) and
    meets the teacher at block b's feature loss or at the head loss. ``feature_losses`` adds
    a feature loss at every inner block end (the KD + MSE plan) without adapting the chain.
    """
    edges: list[tuple[str, str]] = []
    has_teacher = any(d["kind"] == "teacher" for _, d in g.nodes(data=True))
    k = sum(1 for _, d in g.nodes(data=True) if d["kind"] == "student")
    for group in groups:
        a, b = group[0], group[-1]
        if a == 1:
            edges.append(("input", "S1"))
        elif f"lower{a - 1}" in g:
            edges += [(f"T{a - 1}", f"lower{a - 1}"), (f"lower{a - 1}", f"S{a}")]
        elif f"project{a - 1}" in g:
            edges += [(f"T{a - 1}", f"project{a - 1}"), (f"project{a - 1}", f"S{a}")]
        else:
            edges.append((f"T{a - 1}", f"S{a}"))
        for i in group[:-1]:
            if f"lift{i}" in g and chain_adapters and not feature_losses:
                edges += [(f"S{i}", f"lift{i}"), (f"lift{i}", f"lower{i}"), (f"lower{i}", f"S{i + 1}")]
            else:
                edges.append((f"S{i}", f"S{i + 1}"))
            if feature_losses:
                edges += _mse_edges(g, i)
        if b == k:
            edges.append((f"S{k}", "head_loss"))
            edges.append(("labels", "head_loss"))
            if has_teacher:
                edges.append((f"T{k}", "head_loss"))
        else:
            edges += _mse_edges(g, b)
        if tpp_block is not None and tpp_block in group:
            edges += [(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "proxy"]
            edges += [(f"P{k}", "tpp_loss"), (f"T{k}", "tpp_loss")]
    if has_teacher:
        edges += [(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "teacher"]
    # explicit layer pairs: in every stage (each stage trains every block), read by taps
    edges += [(u, v) for u, v in g.edges() if g.nodes[v].get("explicit")]
    return list(dict.fromkeys(edges))


def _mse_edges(g: nx.DiGraph, i: int) -> list[tuple[str, str]]:
    loss = f"{g.graph['feature']}{i}"
    if f"project{i}" in g:  # met in the student's space: S(i) against the projected teacher
        return [(f"T{i}", f"project{i}"), (f"project{i}", loss), (f"S{i}", loss)]
    src = f"lift{i}" if f"lift{i}" in g else f"S{i}"
    out = [(f"T{i}", loss), (src, loss)]
    if src != f"S{i}":
        out.insert(0, (f"S{i}", src))
    return out


# Among nodes ready at once: the teacher first, then per block: the block, its lift, TPP's
# proxy path and loss, its feature loss, the lower that feeds the next block; the head loss last.
_ORDER = {"student": 0, "tap": 1, "pair_lift": 1, "lift": 1, "proxy": 2, "tpp": 3, "feature": 4, "lower": 5, "head": 6}


def _rank(g: nx.DiGraph, n: str) -> tuple[int, int, int, int]:
    d = g.nodes[n]
    kind = d["kind"]
    if kind in ("input", "labels"):
        return (0, 0, 0, 0)
    if kind == "teacher" or kind == "cache" or (kind == "tap" and d["role"] == "teacher"):
        return (1, d["block"], int(kind == "tap"), 0)
    if kind == "projection":  # reads T_i alone, after the taps inside it
        return (1, d["block"], 2, 0)
    if kind == "tap":
        return (2, d["block"], _ORDER["tap"], 0)
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
    order = {"labels": 1, "teacher": 2, "cache": 2, "projection": 2}
    return tuple(sorted(sources, key=lambda u: order.get(g.nodes[u]["kind"], 0)))


def _op(g: nx.DiGraph, edges: set[tuple[str, str]], n: str) -> Op:
    d = g.nodes[n]
    kind = {"adapter": d.get("role"), "projection": "project"}.get(d["kind"], d["kind"])
    if kind == "loss":
        block = g.graph["tpp_block"] if d["loss"] == "tpp" else d["block"]
        return Op(n, "loss", _inputs(g, edges, n), block, d["loss"], tuple(d["terms"]), d["entry"],
                  tuple(d["params"].items()))
    return Op(n, kind, _inputs(g, edges, n), d["block"])


def stage_program(g: nx.DiGraph, groups: tuple[tuple[int, ...], ...], *, chain_adapters: bool,
                  feature_losses: bool, tpp_block: int | None = None) -> Program:
    """The program of one training stage of ``groups`` (see ``stage_edges``). Where the graph
    has a teacher cache and the stage reads the teacher's logits alone (``Program.replayable``),
    the cache feeds the head loss in the teacher's place."""
    edges = stage_edges(g, [list(grp) for grp in groups], feature_losses, tpp_block, chain_adapters)
    program = _program(g, edges)
    if "cache" in g and program.replayable:
        program = _program(g, _replay_edges(g, edges))
    return program


def _replay_edges(g: nx.DiGraph, edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``edges`` with the head loss fed by the cache: the cache's own head loss (a top-k
    cache's ``fkd_loss``) replaces ``head_loss``; the teacher's blocks then reach no loss."""
    head = next(v for _, v in g.out_edges("cache"))
    k = g.nodes["cache"]["block"]
    out = [("input", "cache")]
    for u, v in edges:
        if v == "head_loss":
            out.append(("cache", head) if u == f"T{k}" else (u, head))
        else:
            out.append((u, v))
    return list(dict.fromkeys(out))


def _program(g: nx.DiGraph, edges: list[tuple[str, str]]) -> Program:
    stage = nx.DiGraph(edges)
    losses = [n for n in stage if g.nodes[n]["kind"] == "loss"]
    needed = set(losses).union(*(nx.ancestors(stage, n) for n in losses))
    order = nx.lexicographical_topological_sort(stage.subgraph(needed), key=lambda n: _rank(g, n))
    used = {e for e in edges if e[0] in needed and e[1] in needed}
    ops = tuple(_op(g, used, n) for n in order if g.nodes[n]["kind"] not in ("input", "labels"))
    k = sum(1 for _, d in g.nodes(data=True) if d["kind"] == "student")
    return whole_student(Program(ops, tuple(e for e in edges if e in used)), k)


def whole_student(program: Program, blocks: int) -> Program:
    """``program`` with its student ops replaced by one ``whole`` op (the student's own
    forward, node ``S{blocks}``) where they run blocks 1..``blocks`` in order from the input
    and the rest of the program reads the last one only (kd, supervised): the same function
    (the split pass guarantees it) and the same values, without the segments' calls and the
    out-of-place residual adds of their fx graphs (issue 30). Not where an explicit layer
    pair's tap reads a student block: the taps live in the segments, which the student's own
    forward does not run. Any other program is returned as it is; its edges stay the block
    graph's edges the ops realise."""
    student = [op for op in program.ops if op.kind == "student"]
    if not student:
        return program
    chained = [op.block for op in student] == list(range(1, blocks + 1)) and all(
        op.inputs == ((student[i - 1].node,) if i else ("input",)) for i, op in enumerate(student))
    inner = {op.node for op in student[:-1]}
    last = student[-1]
    read_inside = any(n in inner or (op.kind == "tap" and n == last.node)
                      for op in program.ops if op.kind != "student" for n in op.inputs)
    if not chained or read_inside or program.output in inner:
        return program
    ops = tuple(Op(last.node, "whole", ("input",), last.block) if op is last else op
                for op in program.ops if op.kind != "student" or op is last)
    return replace(program, ops=ops)


def inference_edges(g: nx.DiGraph, chain_adapters: bool) -> list[tuple[str, str]]:
    """The student's path from the input to its output: the plain chain S1 -> .. -> Sk, with
    each block's lift -> lower kept between blocks where the plan chains adapters (they are
    part of the student it trained: StableKD, TPP)."""
    k = sum(1 for _, d in g.nodes(data=True) if d["kind"] == "student")
    edges = [("input", "S1")]
    for i in range(1, k):
        if chain_adapters and f"lift{i}" in g:
            edges += [(f"S{i}", f"lift{i}"), (f"lift{i}", f"lower{i}"), (f"lower{i}", f"S{i + 1}")]
        else:
            edges.append((f"S{i}", f"S{i + 1}"))
    return edges


def inference_program(g: nx.DiGraph, chain_adapters: bool) -> Program:
    """The program evaluation, BatchNorm recalibration and export run: the student (with its
    chained adapters) from the input to its logits, read from the graph's edges."""
    edges = inference_edges(g, chain_adapters)
    path = nx.DiGraph(edges)
    order = nx.lexicographical_topological_sort(path, key=lambda n: _rank(g, n))
    ops = tuple(_op(g, set(edges), n) for n in order if n != "input")
    return Program(ops, tuple(edges), output=ops[-1].node)
