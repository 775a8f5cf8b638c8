"""kdgraph.runtime.chain: the student's block segments run in order against the student's eager
forward; run_program's op order, values and ``whole`` shortcut against programs written by hand;
ExportedStudent with a folded map between blocks against the same composition written out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdgraph.errors import KDGraphError
from kdgraph.ir import Op, Program
from kdgraph.runtime.chain import ExportedStudent, StudentChain, call_segment, run_program, side_values

from _runtime_helpers import tiny_spec


@pytest.fixture(scope="module")
def compiled():
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    torch.manual_seed(0)
    return compile_spec(load_spec(tiny_spec("runs/chain", "stablekd", blocks=4, recompositions=1, epochs=2)))


def _student_program(blocks: int) -> Program:
    ops = tuple(Op(f"S{i}", "student", ("input",) if i == 1 else (f"S{i - 1}",), i) for i in range(1, blocks + 1))
    return Program(ops=ops, edges=(), output=f"S{blocks}")


def test_the_blocks_in_order_are_the_students_forward(compiled):
    model = compiled.student.model.eval()
    chain = StudentChain(compiled.student.segments)
    x = torch.randn(3, 1, 8, 8)
    h = x
    for i in range(1, len(chain.segments) + 1):
        h = chain.block(i, h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=1e-6)


def test_run_program_runs_each_op_on_its_inputs_and_returns_the_output():
    program = Program(ops=(Op("a", "student", ("input",), 1), Op("b", "student", ("a",), 2),
                           Op("l", "loss", ("b", "labels"), None)), edges=(), output="b")
    seen = []

    def run_op(op, inputs):
        seen.append((op.node, [v.tolist() if torch.is_tensor(v) else v for v in inputs]))
        if op.node == "l":
            return inputs[0].sum() - inputs[1].sum()
        return inputs[0] + 1 if op.node == "a" else inputs[0] * 10

    out = run_program(program, torch.tensor([1.0, 2.0]), run_op, labels=torch.tensor([5.0]))
    assert out.tolist() == [20.0, 30.0]
    assert seen == [("a", [[1.0, 2.0]]), ("b", [[2.0, 3.0]]), ("l", [[20.0, 30.0], [5.0]])]
    assert run_program(Program(ops=program.ops[:2], edges=(), output="nowhere"), torch.zeros(1), run_op) is None


def test_a_program_of_student_blocks_alone_runs_the_whole_model():
    calls = []

    def whole(x, *side):
        calls.append(len(side))
        return x * 3

    def run_op(op, inputs):
        raise AssertionError("the segments ran")

    out = run_program(_student_program(3), torch.ones(2), run_op, whole=whole, side=(torch.zeros(1),))
    assert out.tolist() == [3.0, 3.0] and calls == [1]
    mixed = Program(ops=(*_student_program(2).ops, Op("L2", "lift", ("S2",), 2)), edges=(), output="L2")
    assert run_program(mixed, torch.ones(1), lambda op, inputs: inputs[0] + 1, whole=whole).tolist() == [4.0]


class _Seg(nn.Module):
    def __init__(self, side_inputs=()):
        super().__init__()
        self.side_inputs = side_inputs

    def forward(self, *args):
        return args


def test_call_segment_unpacks_a_multi_tensor_cut_and_appends_the_side_tensors_it_reads():
    a, b, t, c = (torch.full((1,), float(v)) for v in (1, 2, 3, 4))
    assert call_segment(_Seg(), a) == (a,)
    got = call_segment(_Seg(("temb", "cls")), (a, b), {"cls": c, "temb": t, "unused": a})
    assert [v.item() for v in got] == [1.0, 2.0, 3.0, 4.0]


def test_side_values_names_each_output_of_the_side_segment():
    class Side(nn.Module):
        side_outputs = ("emb", "double")

        def forward(self, step):
            return step + 1, step * 2

    assert side_values(None, (torch.ones(1),)) == {}
    got = side_values(Side(), (torch.tensor([3.0]),))
    assert {k: v.item() for k, v in got.items()} == {"emb": 4.0, "double": 6.0}


def test_apply_reaches_constants_that_are_not_the_students():
    seg = nn.Module()
    seg.register_buffer("index", torch.arange(3, dtype=torch.float32))
    chain = StudentChain([seg], side_segment=None)
    chain.apply_(lambda t: t.double())
    assert seg.index.dtype == torch.float64


def test_the_exported_student_runs_the_folded_map_between_its_blocks(compiled):
    model = compiled.student.model.eval()
    segments = compiled.student.segments
    channels = compiled.student.boundaries[1].cut.channels
    fold = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        fold.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1) * 2.0)
        fold.bias.fill_(0.5)
    ops = (Op("S1", "student", ("input",), 1), Op("S2", "student", ("S1",), 2), Op("folded2", "folded", ("S2",), 2),
           Op("S3", "student", ("folded2",), 3), Op("S4", "student", ("S3",), 4))
    exported = ExportedStudent(model, segments, {2: fold}, Program(ops=ops, edges=(), output="S4")).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        h = segments[1](segments[0](x))
        expected = segments[3](segments[2](2.0 * h + 0.5))
        torch.testing.assert_close(exported(x), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(exported(x), model(x))
    assert set(exported.state_dict()) == {f"model.{k}" for k in model.state_dict()} | {"folded.2.weight",
                                                                                        "folded.2.bias"}


def _ops(exported):
    return [(op.node, op.kind, op.inputs[0], op.block) for op in exported.program.ops], exported.program.output


def test_exported_student_of_refuses_maps_the_plan_does_not_keep(compiled):
    """Projected adapters (this plan's): the blocks alone. In the path: a folded map after each of
    blocks 1-3 (the last stage's lift/lower pairs, one op each). Other maps: refused."""
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    assert compiled.pairing.adapters_mode == "projected"
    assert _ops(ExportedStudent.of(compiled, {})) == ([("S1", "student", "input", 1), ("S2", "student", "S1", 2),
                                                       ("S3", "student", "S2", 3), ("S4", "student", "S3", 4)], "S4")
    with pytest.raises(KDGraphError, match=r"adapters after blocks \[2\], but this spec's plan keeps them after "
                                           r"blocks \[\]: use the spec it was trained with"):
        ExportedStudent.of(compiled, {2: nn.Identity()})
    raw = tiny_spec("runs/chain", "stablekd", blocks=4, recompositions=1, epochs=2)
    raw.setdefault("decompose", {})["adapters"] = "in_path"
    in_path = compile_spec(load_spec(raw))
    maps = {i: nn.Identity() for i in (1, 2, 3)}
    assert _ops(ExportedStudent.of(in_path, maps)) == ([
        ("S1", "student", "input", 1), ("folded1", "folded", "S1", 1), ("S2", "student", "folded1", 2),
        ("folded2", "folded", "S2", 2), ("S3", "student", "folded2", 3), ("folded3", "folded", "S3", 3),
        ("S4", "student", "folded3", 4)], "S4")
    with pytest.raises(KDGraphError, match=r"adapters after blocks \[\], but this spec's plan keeps them after "
                                           r"blocks \[1, 2, 3\]"):
        ExportedStudent.of(in_path, {})
