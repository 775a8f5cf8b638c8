"""The compiler's records (``kdgraph.ir``): derived properties, the plan's JSON form and the
program rewrites, checked against values written out by hand for small records."""

from __future__ import annotations

import json

import networkx as nx
import pytest

from kdgraph.ir import (AdapterSpec, BlockPair, Cut, DataPlan, FeatureFormat, Op, Pairing, Plan, Program, ProjectionFit,
                        ProjectionSpec, Stage, TrainingStage, TupleAdapterSpec, graph_json)


def _cut(node, index, shape=(8, 4, 4), layout="NCHW", module=None, reduction=2, prefix=0, tensors=()):
    module = node if module is None else module
    channels = {"NCHW": shape[0], "NHWC": shape[-1], "tokens": shape[-1]}.get(layout, shape[0])
    return Cut(node, index, module, (module,) if module else (), shape, layout, channels, reduction, prefix,
               tensors=tensors)


ENC, DOWN = _cut("enc", 3, (4, 8, 8), reduction=1), _cut("down", 7, (8, 4, 4))
MULTI = Cut("down", 7, "down", ("down",), (8, 4, 4), "NCHW", 8, 2, tensors=(ENC, DOWN))


def test_single_and_multi_tensor_cut_views():
    assert (DOWN.members, DOWN.multi, DOWN.nodes, DOWN.shapes, DOWN.description) == \
        ((DOWN,), False, ("down",), [8, 4, 4], "down")
    assert (MULTI.members, MULTI.multi, MULTI.nodes) == ((ENC, DOWN), True, ("enc", "down"))
    assert MULTI.shapes == [[4, 8, 8], [8, 4, 4]]
    assert MULTI.description == "down (2 tensors: enc, down)"
    bare = _cut("add_3", 9, module="")
    assert bare.label == "add_3" and bare.closes == ()


def test_cut_to_dict_keeps_single_tensor_keys_and_lists_multi_tensors():
    d = DOWN.to_dict()
    assert "tensors" not in d and d["closes"] == ["down"] and d["shape"] == [8, 4, 4]
    m = MULTI.to_dict()
    assert [t["node"] for t in m["tensors"]] == ["enc", "down"] and m["tensors"][0]["shape"] == [4, 8, 8]
    assert json.loads(json.dumps(m)) == m  # plain data


def test_stage_rule_and_dict_name_the_feature_info_tap():
    plain = Stage(2, (DOWN,), DOWN)
    tapped = Stage(2, (DOWN,), DOWN, tap="feature_info tap layer2")
    assert plain.rule == "stage end" and tapped.rule == "stage end (feature_info tap layer2)"
    assert (plain.reduction, plain.channels) == (2, 8)
    assert tapped.to_dict() == {"index": 2, "module": "down", "node": "down", "shape": [8, 4, 4], "layout": "NCHW",
                                "channels": 8, "reduction": 2, "cuts": 1, "tap": "feature_info tap layer2"}


@pytest.mark.parametrize("cut,hw,want,shape", [
    (_cut("a", 1, (16, 8, 4), reduction=4), (32, 16), FeatureFormat("NCHW", 16, (8, 4)), (16, 8, 4)),
    (_cut("a", 1, (7, 7, 96), "NHWC", reduction=32), (224, 224), FeatureFormat("NHWC", 96, (7, 7)), (7, 7, 96)),
    (_cut("a", 1, (197, 384), "tokens", reduction=16, prefix=1), (224, 224),
     FeatureFormat("tokens", 384, (14, 14), 1), (197, 384)),
    (_cut("a", 1, (12, 64), "tokens", reduction=8), (32, 24), FeatureFormat("tokens", 64, (4, 3)), (12, 64)),
])
def test_feature_format_of_a_cut_and_back_to_its_shape(cut, hw, want, shape):
    fmt = FeatureFormat.of(cut, hw)
    assert fmt == want and fmt.shape == shape == cut.shape


def test_a_vector_has_no_feature_format():
    with pytest.raises(ValueError, match=r"^cut 'fc' has layout vector; only maps and tokens convert$"):
        FeatureFormat.of(_cut("fc", 5, (10,), "vector", reduction=None), (32, 32))


def test_adapter_spec_views():
    a = AdapterSpec(2, "conv1x1", "NCHW", 16, 32)
    assert (a.lift, a.lower, a.foldable, a.describe()) == ((16, 32), (32, 16), True, "conv1x1 16→32→16")
    assert a.params == (16 * 32 + 2 * 32) + (32 * 16 + 2 * 16)  # conv + BN each way
    lin = AdapterSpec(2, "linear", "tokens", 16, 32)
    assert lin.params == (16 * 32 + 32) + (32 * 16 + 16)
    s, t = FeatureFormat("NCHW", 16, (8, 8)), FeatureFormat("tokens", 32, (4, 4), 1)
    fmt = AdapterSpec(2, "format", "NCHW", 16, 32, s, t, module_params=(700, 300))
    assert not fmt.foldable and (fmt.lift_params, fmt.lower_params, fmt.params) == (700, 300, 1000)
    assert fmt.to_dict() == {"kind": "format", "layout": "NCHW", "lift": [16, 32], "lower": [32, 16],
                             "params": 1000, "student_format": ["NCHW", [16, 8, 8]],
                             "teacher_format": ["tokens", [17, 32]]}
    assert "student_format" not in a.to_dict()


def test_tuple_adapter_spec_sums_its_parts_and_passes_equal_widths():
    a, b = AdapterSpec(3, "conv1x1", "NCHW", 8, 16), AdapterSpec(3, "conv1x1", "NCHW", 32, 64)
    t = TupleAdapterSpec(3, (a, None, b))
    assert t.layout == "NCHW" and t.foldable
    assert t.lift == [[8, 16], None, [32, 64]] and t.lower == [[16, 8], None, [64, 32]]
    assert (t.lift_params, t.lower_params, t.params) == (a.lift_params + b.lift_params,
                                                         a.lower_params + b.lower_params, a.params + b.params)
    assert t.describe() == "per-tensor [conv1x1 8→16→8, -, conv1x1 32→64→32]"
    assert t.to_dict()["tensors"][1] is None and t.to_dict()["params"] == a.params + b.params
    fmt = AdapterSpec(3, "format", "NCHW", 8, 16, FeatureFormat("NCHW", 8, (4, 4)), FeatureFormat("NCHW", 16, (2, 2)))
    assert not TupleAdapterSpec(3, (a, fmt)).foldable


@pytest.mark.parametrize("cs,ct,split,components,text", [
    (64, 256, False, 64, "pca 256→64"),
    (64, 256, True, 32, "pca± 256→32×2"),
    (64, 16, False, 16, "pca 16→16"),  # no more components than the teacher has channels
    (64, 16, True, 16, "pca± 16→16×2"),
])
def test_projection_components_and_description(cs, ct, split, components, text):
    p = ProjectionSpec(1, FeatureFormat("NCHW", cs, (8, 8)), FeatureFormat("NCHW", ct, (8, 8)), split)
    assert p.components == components and p.describe() == text
    assert p.to_dict() == {"kind": "pca", "split": split, "components": components,
                           "student_format": ["NCHW", [cs, 8, 8]], "teacher_format": ["NCHW", [ct, 8, 8]]}


def test_projection_description_names_a_moved_grid_and_prefix_tokens():
    s = FeatureFormat("tokens", 64, (7, 7), 1)
    same = ProjectionSpec(1, s, FeatureFormat("tokens", 192, (14, 14), 1))
    assert same.describe() == "pca 192→64, tokens [14, 14]→tokens [7, 7], prefix tokens: the teacher's"
    pooled = ProjectionSpec(1, s, FeatureFormat("NCHW", 192, (7, 7)))
    assert pooled.describe() == "pca 192→64, NCHW [7, 7]→tokens [7, 7], prefix tokens: the pooled map"
    assert ProjectionFit((1, 3), 8).to_dict() == {"method": "pca", "blocks": [1, 3], "batches": 8}


def test_block_pair_dict_head_and_multi_tensor_block():
    adapter = TupleAdapterSpec(1, (None, AdapterSpec(1, "conv1x1", "NCHW", 8, 16)))
    block = BlockPair(1, MULTI, MULTI, adapter, "stage end")
    head = BlockPair(2, None, None, None, "head")
    d = block.to_dict()
    assert block.multi and d["teacher_tensors"] == ["enc", "down"] and d["student_tensors"] == ["enc", "down"]
    assert head.is_head and not head.multi
    assert head.to_dict() == {"index": 2, "teacher": "output", "student": "output", "teacher_node": None,
                              "student_node": None, "adapter": None, "rule": "head"}
    no_teacher = BlockPair(1, None, DOWN, None, "stage end").to_dict()
    assert no_teacher["teacher"] is None and "teacher_tensors" not in no_teacher
    proj = ProjectionSpec(1, FeatureFormat("NCHW", 8, (4, 4)), FeatureFormat("NCHW", 16, (4, 4)))
    projected = BlockPair(1, DOWN, DOWN, None, "stage end", proj)
    pairing = Pairing((block, projected, head))
    assert pairing.k == 3 and pairing.adapters == [adapter] and pairing.projections == [proj]
    assert projected.to_dict()["projection"]["components"] == 8


def _stablekd_program() -> Program:
    """Two student blocks chained through block 1's adapter pair, the teacher's block 1 and
    head, a feature loss on block 1 and the head loss."""
    return Program((
        Op("t1", "teacher", ("x",), 1), Op("t2", "teacher", ("t1",), 2),
        Op("s1", "student", ("x",), 1), Op("lift1", "lift", ("s1",), 1), Op("lower1", "lower", ("lift1",), 1),
        Op("s2", "student", ("lower1",), 2),
        Op("loss1", "loss", ("lift1", "t1"), 1, "feature", ("mse1",), "mse", (("reduction", "mean"),)),
        Op("loss2", "loss", ("s2", "t2", "y"), 2, "head", ("kd2", "ce2"), "kd", ()),
    ), (("s1", "lift1"),), output="s2")


def test_program_views():
    p = _stablekd_program()
    assert p.adapter_blocks == (1,)
    assert p.terms == ("mse1", "kd2", "ce2")
    assert p.terms_of((2,)) == ("kd2", "ce2") and p.terms_of((1, 2)) == p.terms and p.terms_of((3,)) == ()
    assert p.teacher_reads == (1, 2)
    assert not p.replayable  # the feature loss reads teacher block 1
    assert not p.reads_cache
    d = p.to_dict()
    assert d["ops"][6] == {"node": "loss1", "kind": "loss", "inputs": ["lift1", "t1"], "block": 1, "loss": "feature",
                           "terms": ["mse1"], "entry": "mse", "params": {"reduction": "mean"}}
    assert "loss" not in d["ops"][0] and d["output"] == "s2" and d["edges"] == [["s1", "lift1"]]
    assert "output" not in Program(p.ops, ()).to_dict()


def test_a_program_whose_teacher_feeds_only_the_head_loss_is_replayable():
    ops = (Op("t1", "teacher", ("x",), 1), Op("t2", "teacher", ("t1",), 2), Op("s1", "student", ("x",), 1),
           Op("s2", "student", ("s1",), 2), Op("loss2", "loss", ("s2", "t2", "y"), 2, "head", ("kd2",), "kd"))
    assert Program(ops, ()).replayable and Program(ops, ()).teacher_reads == (2,)
    proxy = ops + (Op("p2", "proxy", ("s1",), 2),)
    assert not Program(proxy, ()).replayable
    student_only = tuple(op for op in ops if op.kind != "teacher")
    assert not Program(student_only, ()).replayable  # no teacher: nothing to replay
    cached = (Op("c2", "cache", ("x",), 2), *student_only)
    assert Program(cached, ()).reads_cache


def test_folded_program_replaces_each_lift_lower_pair_by_one_op():
    p = Program((Op("s1", "student", ("x",), 1), Op("lift1", "lift", ("s1",), 1), Op("lower1", "lower", ("lift1",), 1),
                 Op("s2", "student", ("lower1",), 2), Op("lift2", "lift", ("s2",), 2),
                 Op("lower2", "lower", ("lift2",), 2)), (("s1", "lift1"),), output="lower2")
    f = p.folded()
    assert [(op.node, op.kind, op.inputs, op.block) for op in f.ops] == [
        ("s1", "student", ("x",), 1), ("folded1", "folded", ("s1",), 1), ("s2", "student", ("folded1",), 2),
        ("folded2", "folded", ("s2",), 2)]
    assert f.output == "folded2" and f.edges == () and f.adapter_blocks == ()
    plain = Program((Op("s1", "student", ("x",), 1), Op("s2", "student", ("s1",), 2)), (), output="s2")
    assert plain.folded() == plain  # nothing to fold


def _plan(**kw) -> Plan:
    stages = (TrainingStage(0, 3, ((1,), (2,))), TrainingStage(1, 2, ((1, 2),)))
    return Plan("stablekd", 2, 1, stages, **kw)


def test_plan_epochs_and_stage_ranges():
    plan = _plan()
    assert plan.epochs == 5
    assert plan.stage_epochs(0) == range(0, 3) and plan.stage_epochs(1) == range(3, 5)
    assert plan.uses_adapters and plan.chains_adapters  # a stage of two groups compares features
    kd = Plan("kd", 2, 0, (TrainingStage(0, 4, ((1, 2),)),))
    assert not kd.uses_adapters and not kd.chains_adapters
    mse = Plan("kd_mse", 2, 0, (TrainingStage(0, 4, ((1, 2),)),), feature_losses=True)
    assert mse.uses_adapters and not mse.chains_adapters  # lift for its losses, blocks chained directly
    tpp = Plan("scalekd", 2, 0, (TrainingStage(0, 4, ((1, 2),)),), tpp_block=1)
    assert tpp.uses_adapters and tpp.chains_adapters


def test_plan_with_programs_sets_losses_cache_stages_and_live_teacher():
    plan = _plan()
    assert plan.stages[0].losses == ((), ()) and not plan.live_teacher and plan.cache_stages == ()
    full = _stablekd_program()
    cached = Program((Op("c2", "cache", ("x",), 2), Op("s1", "student", ("x",), 1), Op("s2", "student", ("s1",), 2),
                      Op("loss2", "loss", ("s2", "c2"), 2, "head", ("kd2",), "kd")), ())
    plan = plan.with_programs([full, cached], [Program((), (), "s2"), Program((), (), "s2")])
    assert plan.stages[0].losses == (("mse1",), ("kd2", "ce2"))
    assert plan.stages[1].losses == (("kd2",),)
    assert plan.cache_stages == (1,) and plan.live_teacher
    d = plan.to_dict()
    assert d["cache_stages"] == [1] and d["stages"][0]["losses"] == [["mse1"], ["kd2", "ce2"]]
    assert json.loads(json.dumps(d)) == d
    only_cache = plan.with_programs([cached, cached], [None, None])
    assert not only_cache.live_teacher and only_cache.cache_stages == (0, 1)


def test_plan_dict_shows_teacher_dtype_and_projection_fit_only_when_set():
    d = _plan().to_dict()
    assert "teacher_dtype" not in d and "projection_fit" not in d and "cache_stages" not in d
    d = _plan(teacher_dtype="bfloat16", projection_fit=ProjectionFit((1,), 4)).to_dict()
    assert (d["teacher_dtype"], d["teacher_shard"]) == ("bfloat16", False)
    assert d["projection_fit"] == {"method": "pca", "blocks": [1], "batches": 4}
    assert _plan(teacher_shard=True).to_dict()["teacher_shard"] is True


def test_data_plan_line_and_dict():
    mem = DataPlan("digits", "memory", "1.5 MB decoded", (1, 8, 8))
    assert str(mem) == "memory (1.5 MB decoded); normalised with the training split's statistics"
    stream = DataPlan("imagefolder", "stream", "too large", (3, 224, 224), mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), crop_pct=0.875, stats="the teacher's pretrained_cfg",
                      teacher_mean=(0.5, 0.5, 0.5), teacher_std=(0.5, 0.5, 0.5))
    assert str(stream) == ("stream (too large); student: mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225] from the "
                           "teacher's pretrained_cfg; teacher renormalised to its own mean [0.5, 0.5, 0.5] std "
                           "[0.5, 0.5, 0.5] (its pretrained_cfg), eval crop_pct 0.875")
    d = stream.to_dict()
    assert d["input_size"] == [3, 224, 224] and d["teacher_std"] == [0.5, 0.5, 0.5]
    assert mem.to_dict()["mean"] is None and json.loads(json.dumps(d)) == d


def test_graph_json_round_trips_through_networkx():
    g = nx.DiGraph()
    g.add_node("s1", kind="student", block=1)
    g.add_node("t1", kind="teacher", block=1)
    g.add_edge("s1", "t1", kind="feature")
    data = graph_json(g)
    assert json.loads(json.dumps(data)) == data and "edges" in data
    back = nx.node_link_graph(data, edges="edges")
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    assert list(back.edges(data=True)) == [("s1", "t1", {"kind": "feature"})]
