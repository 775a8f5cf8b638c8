"""The block graph of a quickstart-like pair: nodes, edges, shapes, stage edges, exports."""

from __future__ import annotations

import json

import networkx as nx
import pytest

from kdgraph.compiler.blockgraph import dumps, to_dot, to_json, to_mermaid, validate_block_graph
from kdgraph.compiler.program import stage_edges
from kdgraph.compiler import compile_spec
from kdgraph.errors import PlanError
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec


@pytest.fixture(scope="module")
def compiled():
    """The in_path adapter graph (lift/lower nodes): this file's subject; test_projection.py has
    the projected one, the default for StableKD."""
    return compile_spec(load_spec(tiny_spec(decompose={"adapters": "in_path"})))


@pytest.fixture(scope="module")
def same_width():
    return compile_spec(load_spec(tiny_spec(student="module:kdgraph.zoo:resnet_tiny_student_same")))


TEACHER_CHAIN = [("input", "T1"), ("T1", "T2"), ("T2", "T3"), ("T3", "T4")]
HEAD = [("S4", "head_loss"), ("labels", "head_loss"), ("T4", "head_loss")]


def test_graph_nodes_and_shapes(compiled):
    g = compiled.graph
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == {"input", "labels", "head_loss", "T1", "T2", "T3", "T4", "S1", "S2", "S3", "S4",
                            "lift1", "lift2", "lift3", "lower1", "lower2", "lower3", "mse1", "mse2", "mse3"}
    out = {n: d.get("out_shape") for n, d in g.nodes(data=True)}
    assert out["input"] == [1, 8, 8]
    assert [out[f"T{i}"] for i in range(1, 5)] == [[32, 8, 8], [64, 4, 4], [128, 2, 2], [10]]
    assert [out[f"S{i}"] for i in range(1, 5)] == [[16, 8, 8], [32, 4, 4], [64, 2, 2], [10]]
    assert [out[f"lift{i}"] for i in (1, 2, 3)] == [[32, 8, 8], [64, 4, 4], [128, 2, 2]]
    assert [out[f"lower{i}"] for i in (1, 2, 3)] == [[16, 8, 8], [32, 4, 4], [64, 2, 2]]
    assert [g.nodes[f"lift{i}"]["channels"] for i in (1, 2, 3)] == [[16, 32], [32, 64], [64, 128]]
    assert [g.nodes[f"lower{i}"]["channels"] for i in (1, 2, 3)] == [[32, 16], [64, 32], [128, 64]]
    assert [g.nodes[f"S{i}"]["module"] for i in range(1, 5)] == ["layer1", "layer2", "layer3", "head"]
    assert g.nodes["head_loss"]["terms"] == ["ce", "kl"]


def test_adapter_params_on_nodes(compiled):
    g = compiled.graph
    for i, (cs, ct) in enumerate([(16, 32), (32, 64), (64, 128)], start=1):
        assert g.nodes[f"lift{i}"]["params"] == cs * ct + 2 * ct  # bias-free conv + BN affine
        assert g.nodes[f"lower{i}"]["params"] == ct * cs + 2 * cs


def test_edges_and_their_shapes(compiled):
    g = compiled.graph
    expected = {
        ("input", "S1"): ("student", [1, 8, 8]), ("input", "T1"): ("teacher", [1, 8, 8]),
        ("S1", "S2"): ("student", [16, 8, 8]), ("S2", "S3"): ("student", [32, 4, 4]),
        ("S3", "S4"): ("student", [64, 2, 2]),
        ("T1", "T2"): ("teacher", [32, 8, 8]), ("T2", "T3"): ("teacher", [64, 4, 4]),
        ("T3", "T4"): ("teacher", [128, 2, 2]),
        ("S4", "head_loss"): ("loss", [10]), ("T4", "head_loss"): ("loss", [10]),
        ("labels", "head_loss"): ("loss", []),
    }
    for i, (cs, ct, hw) in enumerate([(16, 32, 8), (32, 64, 4), (64, 128, 2)], start=1):
        s, t = [cs, hw, hw], [ct, hw, hw]
        expected.update({
            (f"S{i}", f"lift{i}"): ("adapted", s), (f"lift{i}", f"lower{i}"): ("adapted", t),
            (f"lower{i}", f"S{i + 1}"): ("adapted", s), (f"T{i}", f"lower{i}"): ("decompose", t),
            (f"lift{i}", f"mse{i}"): ("loss", t), (f"T{i}", f"mse{i}"): ("loss", t),
        })
    got = {(u, v): (d["kind"], d["shape"]) for u, v, d in g.edges(data=True)}
    assert got == expected


def test_stage_edges_stablekd(compiled):
    g = compiled.graph
    groups = [[list(gr) for gr in s.groups] for s in compiled.plan.stages]
    assert groups == [[[1], [2], [3], [4]], [[1, 2], [3, 4]], [[1, 2, 3, 4]]]
    decomposed = {("input", "S1"),
                  ("S1", "lift1"), ("lift1", "mse1"), ("T1", "mse1"), ("T1", "lower1"), ("lower1", "S2"),
                  ("S2", "lift2"), ("lift2", "mse2"), ("T2", "mse2"), ("T2", "lower2"), ("lower2", "S3"),
                  ("S3", "lift3"), ("lift3", "mse3"), ("T3", "mse3"), ("T3", "lower3"), ("lower3", "S4"),
                  *HEAD, *TEACHER_CHAIN}
    assert set(stage_edges(g, groups[0], False)) == decomposed
    merged_pairs = {("input", "S1"), ("S1", "lift1"), ("lift1", "lower1"), ("lower1", "S2"),
                    ("S2", "lift2"), ("lift2", "mse2"), ("T2", "mse2"),
                    ("T2", "lower2"), ("lower2", "S3"),
                    ("S3", "lift3"), ("lift3", "lower3"), ("lower3", "S4"), *HEAD, *TEACHER_CHAIN}
    assert set(stage_edges(g, groups[1], False)) == merged_pairs
    whole = {("input", "S1"), ("S1", "lift1"), ("lift1", "lower1"), ("lower1", "S2"),
             ("S2", "lift2"), ("lift2", "lower2"), ("lower2", "S3"),
             ("S3", "lift3"), ("lift3", "lower3"), ("lower3", "S4"), *HEAD, *TEACHER_CHAIN}
    assert set(stage_edges(g, groups[2], False)) == whole
    for groups_ in groups:
        edges = stage_edges(g, groups_, False)
        assert len(edges) == len(set(edges)) and all(g.has_edge(u, v) for u, v in edges)


def test_stage_edges_kd_and_kd_mse(compiled):
    g = compiled.graph
    plain = {("input", "S1"), ("S1", "S2"), ("S2", "S3"), ("S3", "S4"), *HEAD, *TEACHER_CHAIN}
    # vanilla KD drives the plain student chain only when no adapters exist; with adapters the
    # one-group StableKD stage is the adapted chain (above). KD + MSE keeps the plain chain.
    with_mse = plain | {("S1", "lift1"), ("lift1", "mse1"), ("T1", "mse1"),
                        ("S2", "lift2"), ("lift2", "mse2"), ("T2", "mse2"),
                        ("S3", "lift3"), ("lift3", "mse3"), ("T3", "mse3")}
    assert set(stage_edges(g, [[1, 2, 3, 4]], True)) == with_mse


def test_same_width_pair_has_no_adapters(same_width):
    g = same_width.graph
    assert not [n for n, d in g.nodes(data=True) if d["kind"] == "adapter"]
    assert same_width.pairing.adapters == []
    assert {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "decompose"} == {
        ("T1", "S2"), ("T2", "S3"), ("T3", "S4")}
    assert set(stage_edges(g, [[1], [2], [3], [4]], False)) == {
        ("input", "S1"), ("S1", "mse1"), ("T1", "mse1"), ("T1", "S2"), ("S2", "mse2"), ("T2", "mse2"),
        ("T2", "S3"), ("S3", "mse3"), ("T3", "mse3"), ("T3", "S4"), *HEAD, *TEACHER_CHAIN}
    assert set(stage_edges(g, [[1, 2, 3, 4]], False)) == {
        ("input", "S1"), ("S1", "S2"), ("S2", "S3"), ("S3", "S4"), *HEAD, *TEACHER_CHAIN}


def test_supervised_graph_has_no_teacher():
    c = compile_spec(load_spec(tiny_spec(teacher=False, method="supervised")))
    g = c.graph
    assert set(g.nodes) == {"input", "labels", "head_loss", "S1", "S2", "S3", "S4"}
    assert g.nodes["head_loss"]["terms"] == ["ce"]
    assert set(stage_edges(g, [[1, 2, 3, 4]], False)) == {
        ("input", "S1"), ("S1", "S2"), ("S2", "S3"), ("S3", "S4"), ("S4", "head_loss"), ("labels", "head_loss")}


def test_validate_rejects_a_cycle(compiled):
    g = compiled.graph.copy()
    validate_block_graph(g)
    g.add_edge("S4", "S1", kind="student", shape=[10])
    with pytest.raises(PlanError, match="cycle"):
        validate_block_graph(g)


def test_validate_rejects_mismatched_loss_shapes(compiled):
    g = compiled.graph.copy()
    g.edges["lift2", "mse2"]["shape"] = [32, 4, 4]
    with pytest.raises(PlanError, match="mse2"):
        validate_block_graph(g)


def test_validate_rejects_edge_shape_unlike_its_source(compiled):
    g = compiled.graph.copy()
    g.edges["S1", "S2"]["shape"] = [16, 4, 4]
    with pytest.raises(PlanError, match="S1->S2"):
        validate_block_graph(g)


def test_validate_rejects_an_untrained_student_block(compiled):
    g = compiled.graph.copy()
    g.remove_edge("S4", "head_loss")
    with pytest.raises(PlanError, match="S4"):
        validate_block_graph(g)


def test_exports_name_every_node(compiled):
    g = compiled.graph
    dot, mermaid = to_dot(g), to_mermaid(g)
    assert dot.startswith("digraph") and mermaid.startswith("flowchart LR")
    for n in g.nodes:
        assert f'"{n}"' in dot
        assert f"  {n}" in mermaid
    assert dot.count("->") == g.number_of_edges()
    assert sum(1 for line in mermaid.splitlines() if "|" in line) == g.number_of_edges()


def test_json_round_trip(compiled):
    g = compiled.graph
    data = json.loads(dumps(g))
    back = nx.node_link_graph(data, directed=True, edges="edges")
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    assert {(u, v): d for u, v, d in back.edges(data=True)} == {(u, v): d for u, v, d in g.edges(data=True)}
    assert to_json(back) == to_json(g)
