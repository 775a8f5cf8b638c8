"""kdgraph.compiler.repeat: a plan's export of a deep decoder written from a shallow copy's.

Independent truth: torch.export of the whole model (static batch, as a plan exports it),
compared node by node: op, target, name, output shape and dtype, module path, inputs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdgraph.compiler.exported import _export, trace_exported  # noqa: E402
from kdgraph.compiler.repeat import shallow_export  # noqa: E402
from kdgraph.lm.source import create_causal_lm  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "gemma2")


def _meta(family: str, layers: int, **extra):
    kwargs = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2, **extra}
    with torch.device("meta"):
        return create_causal_lm(family, kwargs)


def _nodes(gm) -> list[tuple]:
    def stack(n):
        return tuple(p for p, _ in (n.meta.get("nn_module_stack") or {}).values())

    def val(n):
        v = n.meta.get("val")
        return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None

    return [(n.op, str(n.target), n.name, val(n), stack(n), tuple(a.name for a in n.all_input_nodes))
            for n in gm.graph.nodes]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_repeated_graph_is_the_whole_models_export_node_for_node(family):
    model = _meta(family, 7)
    sample = torch.zeros(2, 12, dtype=torch.long, device="meta")
    repeated = shallow_export(model, sample, "teacher", _export)
    assert repeated is not None
    whole = _export(model, sample, "teacher", symbolic_batch=False)
    assert _nodes(repeated) == _nodes(whole)
    params = dict(model.named_parameters())
    reads = [n.target for n in repeated.graph.nodes if n.op == "get_attr" and n.target in params]
    assert any(".6." in t for t in reads)  # the layers past the shallow copy's read the model's own tensors
    assert all(repeated.get_parameter(t) is params[t] for t in reads)


def test_gemma2s_alternating_layers_repeat_with_their_period():
    model = _meta("gemma2", 8)
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    sample = torch.zeros(2, 12, dtype=torch.long, device="meta")
    assert _nodes(shallow_export(model, sample, "student", _export)) == _nodes(_export(model, sample, "student", False))


def test_it_declines_where_the_shallow_copy_would_not_be_shallower_or_the_layers_do_not_repeat():
    sample = torch.zeros(2, 12, dtype=torch.long, device="meta")
    assert shallow_export(_meta("llama", 2), sample, "student", _export) is None
    # layer types with no period shorter than the depth: nothing to repeat
    odd = _meta("qwen3", 5, layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                         "full_attention", "full_attention"], sliding_window=4, use_sliding_window=True)
    assert shallow_export(odd, sample, "student", _export) is None
    assert shallow_export(torch.nn.Linear(2, 2), sample, "student", _export) is None


def test_a_plan_on_meta_exports_the_shallow_copy_and_keeps_every_layer(monkeypatch):
    import kdgraph.compiler.exported as exported

    depths = []

    def recording(model, sample, role, symbolic_batch):
        depths.append(model.config.num_hidden_layers)
        return _export(model, sample, role, symbolic_batch)

    monkeypatch.setattr(exported, "_export", recording)
    traced = trace_exported(_meta("llama", 6), (1, 1, 12), role="teacher", lazy=True)
    assert depths == [2]  # 2p layers, p = 1
    modules = {m for info in traced.nodes.values() for m in info.modules}
    assert {f"lm.model.layers.{i}" for i in range(6)} <= modules
    assert "lm.model.layers.6" not in modules
