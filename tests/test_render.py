"""kdgraph.render: the plan's tables against the compiled plan they show (stages, blocks, losses,
schedule read back from the artifacts), the shape and name texts against cuts written by hand,
and draw_block_graph's file (PNG bytes, a folder, a bad extension or name as one line)."""

from __future__ import annotations

import io

import networkx as nx
import pytest
from rich.console import Console

from kdgraph.errors import KDGraphError
from kdgraph.ir import Cut
from kdgraph.render import (blocks_table, cut_name, cut_shape, draw_block_graph, loss_nodes, pair_shapes, plan_view,
                            schedule_table, stages_table)

from _runtime_helpers import tiny_spec


def _cut(node, shape, module="", tensors=()):
    return Cut(node=node, index=0, module=module, closes=(), shape=tuple(shape), layout="nchw", channels=shape[0],
               reduction=None, tensors=tuple(tensors))


def _rows(text: str) -> list[list[str]]:
    """The cells of each body row of a rendered table."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def _text(renderable) -> str:
    console = Console(file=io.StringIO(), width=400, record=True)
    console.print(renderable)
    return console.export_text()


@pytest.fixture(scope="module")
def compiled():
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    return compile_spec(load_spec(tiny_spec("runs/render", "stablekd", blocks=4, recompositions=2, epochs=3)),
                        materialize=False)


def test_cut_texts_single_and_multi_tensor():
    one = _cut("layer1_relu", (16, 8, 8), module="layer1")
    assert cut_shape(one) == "16×8×8" and cut_name(one) == "layer1"
    parts = [_cut("a", (8, 16, 16)), _cut("b", (8, 16, 16)), _cut("c", (16, 8, 4)), _cut("d", (64, 2, 2))]
    multi = _cut("d", (64, 2, 2), module="enc", tensors=parts)
    assert cut_shape(multi) == "4 tensors: 8×16² (2), 16×8×4, 64×2²"
    assert cut_name(multi) == "enc (+ a, b, c)"
    many = _cut("z", (4, 2, 2), module="enc", tensors=[_cut(n, (4, 2, 2)) for n in "abcdefz"])
    assert cut_name(many) == "enc (+ a, …, e, f)"  # the first and the last two of the other six


def test_pair_shapes_says_both_once_and_counts_where_there_are_many():
    a, b = _cut("a", (16, 8, 8)), _cut("b", (32, 4, 4))
    assert pair_shapes(a, _cut("x", (16, 8, 8))) == "16×8×8 (both)"
    assert pair_shapes(a, b) == "16×8×8 / 32×4×4"
    assert pair_shapes(None, b) == "32×4×4"
    t = _cut("t", (8, 4, 4), tensors=[_cut("t1", (4, 8, 8)), _cut("t", (8, 4, 4))])
    s = _cut("s", (8, 4, 4), tensors=[_cut("s1", (2, 8, 8)), _cut("s", (8, 4, 4))])
    assert pair_shapes(t, s) == "2 tensors: 4×8², 8×4² / 2×8², 8×4²"
    big = _cut("m", (1, 1, 1), tensors=[_cut(f"m{i}", (1, 1, 1)) for i in range(5)])
    assert pair_shapes(big, t) == "5 / 2 tensors (shapes above)"


def test_loss_nodes_puts_the_head_first_and_joins_equal_feature_losses():
    g = nx.DiGraph()
    for i in (1, 2, 3):
        g.add_node(f"mse{i}", kind="loss", entry="mse", block=i, params={"weight": 1.0, "fmt": "x"})
    g.add_node("mse4", kind="loss", entry="mse", block=4, params={"weight": 0.5})
    g.add_node("head_loss", kind="loss", entry="kd_head", loss="head", block=5, params={"tau": 4.0})
    g.add_node("t1", kind="teacher")
    assert loss_nodes(g) == [("head_loss", "kd_head", "tau 4.0"), ("mse1..mse3", "mse", "weight 1.0"),
                             ("mse4", "mse", "weight 0.5")]


def test_the_plan_tables_show_the_compiled_plan(compiled):
    c = compiled
    schedule = _text(schedule_table(c))
    assert f"schedule: stablekd-{c.plan.k}/{c.plan.n}" in schedule
    # the projection's fit, then each stage's epochs and groups, as the plan holds them
    fit = c.plan.projection_fit
    assert fit is not None and _rows(schedule)[0][:3] == [
        "fit", "-", f"PCA of the teacher at block ends {', '.join(map(str, fit.blocks))} ({fit.batches} batches), "
                    "then frozen"]
    assert [row[:3] for row in _rows(schedule)[1:]] == [
        [str(st.index), str(st.epochs), "  ".join("[" + ",".join(map(str, g)) + "]" for g in st.groups)]
        for st in c.plan.stages]
    stages = _text(stages_table(c.student))
    assert [row[0] for row in _rows(stages)] == [str(st.index) for st in c.student.stages]
    assert f"{len(c.student.cuts)} cuts" in stages
    # the blocks: each pair's cuts and their shapes (T / S) as the pairing holds them, the head last
    blocks = _text(blocks_table(c))
    assert [row[:4] for row in _rows(blocks)] == [
        [str(b.index), b.teacher.label, b.student.label, f"{'×'.join(map(str, b.teacher.shape))} / "
                                                         f"{'×'.join(map(str, b.student.shape))}"]
        for b in c.pairing.blocks if not b.is_head] + [[str(c.pairing.k), "head", "head", f"{c.num_classes} logits"]]
    view = _text(plan_view(c))
    assert all(line in view for line in blocks.splitlines() + stages.splitlines() + schedule.splitlines())
    assert "teacher stages" in view and "student stages" in view
    for nodes, entry, _ in loss_nodes(c.graph):
        assert f"{nodes}: {entry}" in view


def test_draw_block_graph_writes_a_png_and_into_a_folder_names_it(tmp_path, compiled):
    path = draw_block_graph(compiled.graph, tmp_path / "g.png", title="plain")
    assert path == tmp_path / "g.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    into = draw_block_graph(compiled.graph, tmp_path, title="tiny kd/1")
    assert into == tmp_path / "tiny_kd_1.png" and into.read_bytes()[:4] == b"\x89PNG"


def test_draw_block_graph_refuses_in_one_line(tmp_path, compiled):
    with pytest.raises(KDGraphError, match=r"cannot write --png .*g\.xyz: .*xyz") as err:
        draw_block_graph(compiled.graph, tmp_path / "g.xyz")
    assert "\n" not in str(err.value) and not (tmp_path / "g.xyz").exists()
    with pytest.raises(KDGraphError, match="the path has a name of 300 bytes"):
        draw_block_graph(compiled.graph, tmp_path / ("n" * 296 + ".png"))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(KDGraphError, match="cannot write --png .*file/g.png"):
        draw_block_graph(compiled.graph, tmp_path / "file" / "g.png")
    assert (tmp_path / "file").read_text() == "mine"
