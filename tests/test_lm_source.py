"""The transformers: model source (kdgraph/lm/source.py): a Hugging Face causal LM from a
model type and kwargs, a config.json, a saved folder (with pretrained: true its weights) or
the hub, with one-line errors.

Independent truth: transformers' own model built from the same config (logits compared), and
its own from_pretrained of the saved folder.
"""

from __future__ import annotations

import builtins

import pytest
import torch

from kdgraph.errors import ModelError
from kdgraph.models import create_model
from kdgraph.registry import MODEL_SOURCES, PRETRAINED_SOURCES
from kdgraph.spec import ModelSpec

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def test_a_model_type_with_kwargs_is_that_config_and_returns_transformers_logits():
    torch.manual_seed(0)
    model = create_model("transformers:llama", TINY)
    assert type(model.lm).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.vocab_size == 97
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    ref.load_state_dict({k.removeprefix("lm."): v for k, v in model.state_dict().items()})
    ids = torch.randint(0, 97, (2, 7))
    model.eval(), ref.eval()
    assert torch.equal(model(ids), ref(input_ids=ids).logits)
    assert all(k.startswith("lm.") for k in model.state_dict())


def test_a_config_json_builds_a_fresh_model_and_kwargs_override_it(tmp_path):
    transformers.Qwen2Config(**TINY).to_json_file(tmp_path / "config.json")
    model = create_model(f"transformers:{tmp_path / 'config.json'}", {"num_hidden_layers": 3})
    assert type(model.lm).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 32


def test_a_saved_folder_gives_its_config_and_with_pretrained_its_weights(tmp_path):
    torch.manual_seed(1)
    saved = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4))
    saved.save_pretrained(tmp_path)
    fresh = create_model(f"transformers:{tmp_path}", {})
    assert type(fresh.lm).__name__ == "GPT2LMHeadModel" and fresh.config.n_layer == 2
    fetch = PRETRAINED_SOURCES.get("transformers")[1]
    loaded = fetch(str(tmp_path), {})
    ids = torch.randint(0, 97, (2, 5))
    saved.eval(), loaded.eval()
    assert torch.equal(loaded(ids), saved(input_ids=ids).logits)
    assert not torch.equal(fresh.state_dict()["lm.transformer.wte.weight"], saved.transformer.wte.weight)


def test_a_hub_model_offline_is_one_line_saying_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for ref, pretrained in (("nobody-here/no-such-model", False), ("nobody-here/no-such-model", True)):
        with pytest.raises(ModelError) as err:
            if pretrained:
                PRETRAINED_SOURCES.get("transformers")[1](ref, {})
            else:
                create_model(f"transformers:{ref}", {})
        text = str(err.value)
        assert "\n" not in text and "not in the local cache" in text and "transformers:PATH" in text


def test_bad_references_are_one_line_errors(tmp_path):
    cases = {"transformers:no-such-type": "neither a model type",
             f"transformers:{tmp_path / 'missing.json'}": "no such file",
             f"transformers:{tmp_path}": "no config.json",
             "transformers:vit": "no causal-LM model"}
    for ref, said in cases.items():
        with pytest.raises(ModelError, match=said) as err:
            create_model(ref, {})
        assert "\n" not in str(err.value)


def test_a_missing_transformers_says_how_to_install_it(monkeypatch):
    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ModelError, match=r"pip install 'kdgraph\[lm\]'"):
        create_model("transformers:llama", TINY)


def test_the_spec_accepts_the_source_and_pretrained_for_it():
    assert "transformers" in MODEL_SOURCES and "transformers" in PRETRAINED_SOURCES
    spec = ModelSpec(model="transformers:Qwen/Qwen2.5-0.5B", pretrained=True)
    assert spec.pretrained


def _folder_with_remote_code(tmp_path):
    """A saved GPT-2 folder whose config.json maps AutoModelForCausalLM to a modeling file of its
    own that, once imported, writes a marker file (what trust_remote_code would run)."""
    import json

    folder = tmp_path / "model"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4)).save_pretrained(folder)
    marker = tmp_path / "ran.txt"
    (folder / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2LMHeadModel as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.mark.parametrize("value", [True, 1, "yes"])
def test_trust_remote_code_is_refused_and_a_folders_modeling_code_never_runs(tmp_path, value):
    folder, marker = _folder_with_remote_code(tmp_path)
    fetch = PRETRAINED_SOURCES.get("transformers")[1]
    for load in (lambda: fetch(str(folder), {"trust_remote_code": value}),
                 lambda: create_model(f"transformers:{folder}", {"trust_remote_code": value})):
        with pytest.raises(ModelError, match="trust_remote_code") as info:
            load()
        assert "\n" not in str(info.value)
    assert not marker.exists()
    loaded = fetch(str(folder), {})          # without it: transformers' own GPT-2, the file unrun
    assert type(loaded.lm).__name__ == "GPT2LMHeadModel" and not marker.exists()
