"""The ``transformers:`` model source: a Hugging Face causal language model as a kdgraph
model ``forward(input_ids) -> logits``.

    transformers:llama             a fresh model of that ``model_type``, kwargs its config
    transformers:path/config.json  a fresh model of that config file, kwargs override fields
    transformers:path/to/folder    a saved model (config.json; with pretrained: true its weights)
    transformers:org/name          a hub model (its config; with pretrained: true its weights)

Any ``AutoModelForCausalLM`` architecture builds (Llama, Qwen2, Qwen3, Mistral, GPT-2,
Phi-3, Gemma-2 are planned in the tests). ``CausalLM`` wraps it: its state_dict is the
model's under ``lm.``, its forward calls it without a KV cache and returns the logits.
A relative path is taken from the working directory.

transformers is an optional dependency (``pip install 'kdgraph[lm]'``), imported only when
such a model is built.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from kdgraph.errors import ModelError

__all__ = ["CausalLM", "create_causal_lm", "import_transformers", "pretrained_causal_lm"]


def import_transformers():
    """The transformers package, or a ModelError saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(f"transformers: models need the transformers package ({exc}); "
                         "pip install 'kdgraph[lm]'") from None
    return transformers


class CausalLM(nn.Module):
    """A transformers causal LM as ``forward(input_ids) -> logits`` (B, T) -> (B, T, V).
    ``lm`` is the transformers model itself (``save_pretrained`` it)."""

    takes_tokens = True  # fed token ids: traced with torch.export (kdgraph.compiler.exported)

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        lm.config.use_cache = False

    @property
    def config(self):
        return self.lm.config

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding (the logits' width; a padded vocabulary counts its padding)."""
        return int(self.lm.get_output_embeddings().weight.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _config(rest: str, kwargs: dict[str, Any]):
    """The config ``rest`` names, with ``kwargs`` as its fields (a model_type) or overriding them.
    A per-layer list the override of the depth invalidates (``layer_types``) is derived anew."""
    transformers = import_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if rest in CONFIG_MAPPING:
        return transformers.AutoConfig.for_model(rest, **kwargs)
    path = Path(rest).expanduser()
    if path.is_file() or path.is_dir():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelError(f"transformers:{rest}: the folder has no config.json")
        fields = _read_json(path / "config.json" if path.is_dir() else path, rest)
    elif rest.endswith(".json") or rest.startswith((".", "/", "~")):
        raise ModelError(f"transformers:{rest}: no such file or folder")
    elif rest.count("/") == 1:
        fields = _hub_config(transformers, rest).to_dict()
    else:
        raise ModelError(f"transformers:{rest}: neither a model type ({', '.join(sorted(CONFIG_MAPPING)[:6])}, "
                         "...), a config.json, a model folder nor a hub id org/name")
    if "num_hidden_layers" in kwargs and "layer_types" not in kwargs:
        fields.pop("layer_types", None)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"transformers:{rest}: its config names no known model_type (got {model_type!r})")
    fields.pop("transformers_version", None)
    return transformers.AutoConfig.for_model(model_type, **{**fields, **kwargs})


def _read_json(path: Path, rest: str) -> dict:
    import json

    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"transformers:{rest}: cannot read {path.name}: {exc}") from None
    if not isinstance(fields, dict):
        raise ModelError(f"transformers:{rest}: {path.name} holds no JSON object")
    return fields


def _hub_unreachable(repo: str, filename: str) -> str | None:
    """Why ``filename`` of hub ``repo`` cannot be had here, found in seconds (None: cached or reachable)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"{host} is not reachable ({exc}) and it is not in the local cache"
    return None


def _offline(rest: str, what: str, problem: str) -> ModelError:
    return ModelError(f"transformers:{rest}: cannot load its {what} ({problem}); where no network is reachable, "
                      "download the model elsewhere and give its folder as transformers:PATH")


def _hub_config(transformers, repo: str):
    if (problem := _hub_unreachable(repo, "config.json")) is not None:
        raise _offline(repo, "config", problem)
    try:
        return transformers.AutoConfig.from_pretrained(repo)
    except (OSError, ValueError) as exc:
        raise _offline(repo, "config", " ".join(str(exc).split())[:200]) from None


def _no_remote_code(rest: str, kwargs: dict[str, Any]) -> None:
    """A spec's kwargs may not ask transformers to run a folder's or the hub's modeling code."""
    if kwargs.get("trust_remote_code"):
        raise ModelError(f"transformers:{rest}: trust_remote_code would run the model's own Python code, "
                         "which kdgraph never does for an input; use a model type transformers implements")


def create_causal_lm(rest: str, kwargs: dict[str, Any]) -> CausalLM:
    """``transformers:REST`` with random weights (its config from REST and ``kwargs``)."""
    _no_remote_code(rest, kwargs)
    transformers = import_transformers()
    config = _config(rest, kwargs)
    try:
        return CausalLM(transformers.AutoModelForCausalLM.from_config(config))
    except ValueError as exc:
        raise ModelError(f"transformers:{rest}: {type(config).__name__} has no causal-LM model "
                         f"({' '.join(str(exc).split())[:160]})") from None


def pretrained_causal_lm(rest: str, kwargs: dict[str, Any]) -> CausalLM:
    """``transformers:REST`` with its saved weights (a local folder, or the hub / its cache);
    never with the folder's or the hub's own modeling code (trust_remote_code is refused)."""
    _no_remote_code(rest, kwargs)
    transformers = import_transformers()
    local = Path(rest).expanduser().is_dir()
    if not local:
        if rest.count("/") != 1:
            raise ModelError(f"transformers:{rest}: pretrained: true needs a model folder or a hub id org/name")
        if (problem := _hub_unreachable(rest, "config.json")) is not None:
            raise _offline(rest, "pretrained weights", problem)
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(rest, local_files_only=local,
                                                           **{"dtype": torch.float32, **kwargs},
                                                           trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _offline(rest, "pretrained weights", " ".join(str(exc).split())[:200]) from None
    return CausalLM(lm)
