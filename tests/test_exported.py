"""The torch.export front end (kdgraph/compiler/exported.py): causal LMs of every family in the
issue, traced where torch.fx cannot, cut at the residual stream between decoder layers with
no per-family code, paired by depth (Minitron's rule) with linear projectors, planned on the
meta device; and, with real weights, the blocks recomposed give transformers' own logits.

Independent truth: the model's own module tree (the decoder layers a cut must close), the
rule round((i + 1)·Lt / Ls) − 1 written out here, and transformers' eager forward.
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from kdgraph.compiler import compile_spec
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.exported import trace_exported
from kdgraph.compiler.split import split_segments
from kdgraph.compiler.trace import trace
from kdgraph.models import create_model
from kdgraph.render import plan_view
from kdgraph.runtime.chain import call_segment
from kdgraph.spec import Spec

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "gemma2")
SEQ = 32


def _kwargs(width: int, layers: int) -> dict:
    return {"vocab_size": 256, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": width // 4, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2}


def _spec(family: str, teacher_layers: int = 6, student_layers: int = 3, **extra) -> Spec:
    extra = {"schedule": {"method": "kd+mse"}, "decompose": {"blocks": student_layers + 1}, **extra}
    return Spec.model_validate({
        "name": f"{family}-pair", "data": {"dataset": "text", "seq_len": SEQ, "batch_size": 4},
        "teacher": {"model": f"transformers:{family}", "kwargs": _kwargs(64, teacher_layers)},
        "student": {"model": f"transformers:{family}", "kwargs": _kwargs(32, student_layers)}, **extra})


def _layers(model) -> list[str]:
    """The paths of the model's decoder layers, read from its module tree: the items of its
    one ModuleList whose length is the config's depth."""
    depth = model.config.num_hidden_layers
    return [f"{path}.{i}" for path, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) == depth for i in range(depth)]


def _minitron(i: int, lt: int, ls: int) -> int:
    """Student layer i pairs with teacher layer round((i + 1)·Lt / Ls) − 1 (halves rounded up)."""
    x = (i + 1) * lt / ls
    return int(x) + (1 if x - int(x) >= 0.5 else 0) - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_plans_on_meta_cut_at_every_decoder_layer_and_paired_by_depth(family):
    compiled = compile_spec(_spec(family), materialize=False)
    for art in (compiled.teacher, compiled.student):
        assert any(p.is_meta for p in art.model.parameters())
        closed = {path for cut in art.cuts for path in cut.closes}
        layers = _layers(art.model)
        assert len(layers) == art.model.config.num_hidden_layers
        assert set(layers) <= closed, f"{art.role}: layers without a cut: {set(layers) - closed}"
        assert all(cut.layout == "tokens" and cut.shape[0] == SEQ for cut in art.cuts)
    t_layers, s_layers = _layers(compiled.teacher.model), _layers(compiled.student.model)
    blocks = compiled.pairing.blocks
    assert len(blocks) == len(s_layers) + 1 and blocks[-1].is_head
    for i, block in enumerate(blocks[:-2]):  # the last stack block ends after the final norm
        assert block.student.closes[0] == s_layers[i] or s_layers[i] in block.student.closes
        assert t_layers[_minitron(i, len(t_layers), len(s_layers))] in block.teacher.closes
    for block in blocks[:-1]:
        assert block.adapter is not None and block.adapter.kind == "linear"
        assert (block.adapter.student_channels, block.adapter.teacher_channels) == (32, 64)
    out = io.StringIO()
    Console(file=out, width=200).print(plan_view(compiled))
    assert "256 logits per token" in out.getvalue() and "linear" in out.getvalue()


def test_uneven_depths_follow_minitrons_rule_not_equal_chunks():
    compiled = compile_spec(_spec("llama", teacher_layers=5, student_layers=3), materialize=False)
    t_layers = _layers(compiled.teacher.model)
    ends = [next(p for p in b.teacher.closes if p in t_layers) for b in compiled.pairing.blocks[:2]]
    assert ends == [t_layers[_minitron(0, 5, 3)], t_layers[_minitron(1, 5, 3)]] == [t_layers[1], t_layers[2]]


def test_token_ids_are_no_cut_and_the_rotary_tables_are_not_counted():
    model = create_model("transformers:gpt2", _kwargs(32, 2), meta=True)
    traced = trace_exported(model, (1, 1, SEQ))
    cuts = find_cuts(traced)
    assert cuts and all(c.layout == "tokens" for c in cuts)  # no cut on the ids' reshape
    llama = trace_exported(create_model("transformers:llama", _kwargs(32, 2), meta=True), (1, 1, SEQ))
    rotary = [n for n, info in llama.nodes.items() if "rotary_emb" in " ".join(info.modules) and info.shape]
    assert rotary and not any(llama.nodes[n].input_dependent for n in rotary)


def test_fx_cannot_trace_a_decoder_and_trace_takes_it_through_export():
    model = create_model("transformers:llama", _kwargs(32, 2))
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    traced = trace(model, (1, 1, SEQ))
    assert traced.gm.get_parameter("lm.lm_head.weight") is model.lm.lm_head.weight


@pytest.mark.parametrize("family", ("llama", "gpt2", "gemma2"))
def test_the_blocks_recomposed_give_transformers_logits(family):
    torch.manual_seed(0)
    model = create_model(f"transformers:{family}", _kwargs(32, 3)).eval()
    traced = trace(model, (1, 1, SEQ))
    cuts = [c for c in find_cuts(traced) if any(p.endswith((".0", ".1", ".2")) for p in c.closes)]
    segments = split_segments(traced, [c.node for c in cuts])
    ids = torch.randint(0, 256, (3, SEQ))
    h = ids
    with torch.no_grad():
        for segment in segments:
            h = call_segment(segment, h)
        want = model.lm(input_ids=ids, use_cache=False).logits
    assert len(segments) == len(cuts) + 1 >= 4
    assert torch.equal(h, want)


def test_explicit_layer_pairs_override_with_a_linear_lift():
    spec = _spec("qwen3", schedule={"method": "kd"}, decompose={"blocks": 1},
                 loss={"pairs": [{"student": "lm.model.layers.0", "teacher": "lm.model.layers.4"},
                                 {"student": "lm.model.layers.2", "teacher": "lm.model.layers.5", "loss": "mse"}]})
    compiled = compile_spec(spec, materialize=False)
    pairs = compiled.pairing.pairs
    assert [(p.student.closes[0], p.teacher.closes[0]) for p in pairs] == [
        ("lm.model.layers.0", "lm.model.layers.4"), ("lm.model.layers.2", "lm.model.layers.5")]
    assert all(p.adapter.kind == "linear" and p.adapter.lift == (32, 64) for p in pairs)


def test_stablekd_plans_a_decoder_pair_block_by_block():
    compiled = compile_spec(_spec("mistral", schedule={"method": "stablekd"}), materialize=False)
    assert compiled.plan.k == 4 and len(compiled.plan.stages) >= 2
    assert len(compiled.student.segments) == len(compiled.teacher.segments) == 4
