"""kdgraph.lm.hf_export: a causal-LM student written as a Hugging Face folder loads in plain
transformers (``AutoModelForCausalLM.from_pretrained``, the truth) with the student's logits and
weights; its record names where the weights came from; a student that is no transformers model,
or carries adapter maps, is refused in one line before anything is written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.lm.hf_export import RECORD, check_exportable, ship_causal_lm

transformers = pytest.importorskip("transformers")


def _lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _compiled(lm):
    return SimpleNamespace(student=SimpleNamespace(model=SimpleNamespace(lm=lm)))


def test_the_folder_loads_in_plain_transformers_with_the_students_logits(tmp_path):
    lm = _lm()
    to = tmp_path / "hf"
    out = ship_causal_lm(_compiled(lm), {}, tmp_path / "run" / "student.safetensors", to, "kdgraph export x.yaml")
    assert out == {"folder": str(to), "format": "transformers", "reason": None}
    assert {"config.json", "model.safetensors", "generation_config.json", RECORD} <= {p.name for p in to.iterdir()}
    assert not list(to.glob(".*.tmp"))
    record = json.loads((to / RECORD).read_text())
    assert record == {"weights_from": str(tmp_path / "run" / "student.safetensors"),
                      "command": "kdgraph export x.yaml", "tokenizer": "utf-8 bytes (ids 0..255)"}
    back = transformers.AutoModelForCausalLM.from_pretrained(str(to)).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, lm.eval()(input_ids=ids).logits, atol=1e-5)
    assert back.config.use_cache is True  # generation in plain transformers uses its KV cache
    assert lm.config.use_cache is False  # the student's own config is left as training had it


def test_adapter_maps_are_refused_before_anything_is_written(tmp_path):
    to = tmp_path / "hf"
    with pytest.raises(KDGraphError, match="export: this student carries adapter maps that are not part of a "
                                           "transformers model"):
        ship_causal_lm(_compiled(_lm()), {1: object()}, tmp_path / "w", to, "export")
    assert not to.exists()


def test_only_a_transformers_student_is_exportable():
    check_exportable(SimpleNamespace(student=SimpleNamespace(model="transformers:llama")))
    with pytest.raises(KDGraphError, match=r"export: a causal-LM student ships as a Hugging Face folder, which needs "
                                           r"a transformers: model \(got module:my.lm:make\)"):
        check_exportable(SimpleNamespace(student=SimpleNamespace(model="module:my.lm:make")))
