"""Explicit layer pairs (``loss.pairs``): feature losses between named module outputs, read by
taps inside the blocks, marked explicit in the graph and the plan; a path that does not exist
is one line with a did-you-mean. Independent truth: the eager models' own module outputs,
caught by forward hooks on the named modules."""

from __future__ import annotations

import pytest
import torch
from _runtime_helpers import tiny_spec

from kdgraph.compiler import compile_spec
from kdgraph.errors import PlanError, SpecError
from kdgraph.runtime.distiller import Distiller
from kdgraph.spec import load_spec

SAME = "module:kdgraph.zoo:resnet_tiny_student_same"  # the teacher's widths: no adapter


def _outputs(model, paths, x):
    seen, hooks = {}, []
    for path in paths:
        hooks.append(model.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, path=path: seen.setdefault(path, out.detach().clone())))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("blocks", [1, 4])
def test_a_pair_term_is_the_weighted_mse_of_the_named_modules_outputs(blocks):
    """One kd step: the pair's term equals w * MSE(student.layer2.0's output, teacher.layer2.1's),
    whether the modules lie inside a block (blocks 1: taps) or the student's ends one (blocks 4)."""
    torch.manual_seed(0)
    pairs = [{"student": "layer2.0", "teacher": "layer2.1", "weight": 3.0},
             {"student": "layer1", "teacher": "layer1.0"}]
    c = compile_spec(load_spec(tiny_spec(method="kd", blocks=blocks, student=SAME, loss={"pairs": pairs})))
    d = Distiller(c)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    terms = d(x, y)
    assert sorted(terms) == ["ce", "kl", "mse_p1", "mse_p2"]
    s = _outputs(c.student.model, ["layer2.0", "layer1"], x)
    t = _outputs(c.teacher.model, ["layer2.1", "layer1.0"], x)
    torch.testing.assert_close(terms["mse_p1"].detach(), 3.0 * torch.mean((s["layer2.0"] - t["layer2.1"]) ** 2))
    torch.testing.assert_close(terms["mse_p2"].detach(), torch.mean((s["layer1"] - t["layer1.0"]) ** 2))
    terms["mse_p1"].backward()  # the pair trains the student up to its module, not the teacher
    assert c.student.model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert c.student.model.layer3[0].conv1.weight.grad is None
    assert all(p.grad is None for p in c.teacher.model.parameters())
    assert all(not tap.armed and tap.value is None for tap in d.taps.values())


def test_pairs_are_marked_explicit_with_their_adapter_in_the_graph_and_the_plan():
    c = compile_spec(load_spec(tiny_spec(method="stablekd", loss={"pairs": [
        {"student": "layer2", "teacher": "layer2.0", "loss": "mse", "weight": 2.0}]})), materialize=False)
    g = c.graph
    assert {n for n, d in g.nodes(data=True) if d.get("explicit")} == {"xs_p1", "xt_p1", "xlift_p1", "mse_p1"}
    assert g.nodes["mse_p1"]["params"] == {"weight": 2.0} and g.nodes["mse_p1"]["terms"] == ["mse_p1"]
    assert g.nodes["xlift_p1"]["channels"] == [32, 64]
    for st in c.plan.stages:  # every stage trains the pair, in the group of its student block
        assert [2 in group for group, terms in zip(st.groups, st.losses) if "mse_p1" in terms] == [True]
    pair = c.to_dict()["pairs"][0]
    assert (pair["student"], pair["teacher"], pair["student_block"], pair["teacher_block"], pair["rule"]) == \
        ("layer2", "layer2.0", 2, 2, "explicit")
    assert pair["adapter"]["kind"] == "conv1x1"


def test_adapters_for_pairs_are_trained_and_saved_only_where_needed():
    c = compile_spec(load_spec(tiny_spec(method="kd", loss={"pairs": [{"student": "layer2", "teacher": "layer2.0"}]})))
    d = Distiller(c)
    assert [k for k in d.state_dict() if k.startswith("pair_lifts.")][:1] == ["pair_lifts.xlift_p1.conv.weight"]
    plain = Distiller(compile_spec(load_spec(tiny_spec(method="kd"))))
    assert not [k for k in plain.state_dict() if not k.startswith("student.")]


@pytest.mark.parametrize("pair, message", [
    ({"student": "layer5", "teacher": "layer2.0"},
     "loss.pairs.0.student: the student has no module 'layer5'; did you mean 'layer3' or 'layer2' or 'layer1'?"),
    ({"student": "layer2", "teacher": "layr2.1"},
     "loss.pairs.0.teacher: the teacher has no module 'layr2.1'; did you mean 'layer2.1'"),
    ({"student": "layer2", "teacher": "layer2.0.conv1"},
     "loss.pairs.0.teacher: the output of the teacher's 'layer2.0.conv1' is not a single-tensor cut (other tensors "
     "cross there); cuts near it: "),
])
def test_a_path_that_is_not_a_cut_is_one_line_naming_the_yaml_path(pair, message):
    with pytest.raises(PlanError) as e:
        compile_spec(load_spec(tiny_spec(method="kd", loss={"pairs": [pair]})), materialize=False)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_pairs_need_a_teacher():
    with pytest.raises(SpecError, match=r"^loss.pairs: a layer pair compares with a teacher's features; "
                                        "supervised has no teacher"):
        load_spec(tiny_spec(method="supervised", loss={"pairs": [{"student": "layer2", "teacher": "layer2"}]}))
