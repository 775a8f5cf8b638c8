"""A trained causal-LM student as a Hugging Face folder: ``config.json``,
``model.safetensors`` and ``generation_config.json`` (``save_pretrained`` of the wrapped
transformers model), the run's tokenizer files where ``data.tokenizer`` named one (its
``save_pretrained``), plus ``kdgraph.json`` (where the weights came from). The folder loads in
plain transformers, ``AutoModelForCausalLM.from_pretrained(folder)``, without kdgraph."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdgraph.errors import KDGraphError

__all__ = ["RECORD", "check_exportable", "ship_causal_lm"]

RECORD = "kdgraph.json"  # where the weights came from; marks the folder as kdgraph's export


def check_exportable(spec) -> None:
    """Refuse, before anything is built, a student that is not a ``transformers:`` model."""
    if not str(spec.student.model).startswith("transformers:"):
        raise KDGraphError(f"export: a causal-LM student ships as a Hugging Face folder, which needs a "
                           f"transformers: model (got {spec.student.model})")


def ship_causal_lm(compiled, maps: dict, path: Path, to: Path, command: str, tokenizer=None) -> dict:
    """Write the trained student (loaded into ``compiled.student.model``) to the folder ``to``
    (the caller, ``CausalLMTask.ship``, checks it and marks the export incomplete until this returns),
    and the run's tokenizer folder (``data.tokenizer``; None: bytes) beside it (``save_pretrained``)."""
    if maps:
        raise KDGraphError("export: this student carries adapter maps that are not part of a transformers model")
    lm = compiled.student.model.lm.eval()
    to = Path(to)
    lm.config.use_cache = True  # generation in plain transformers uses its KV cache
    try:
        lm.save_pretrained(str(to), safe_serialization=True)
    finally:
        lm.config.use_cache = False
    if tokenizer is not None:
        from kdgraph.lm.text import load_tokenizer, tokenizer_key

        tok = load_tokenizer(tokenizer)
        tok.save_pretrained(str(to))
        described = f"{tokenizer} (key {tokenizer_key(tok)})"
    else:
        described = "utf-8 bytes (ids 0..255)"
    tmp = to / f".{RECORD}.tmp"
    tmp.write_text(json.dumps({"weights_from": str(path), "command": command, "tokenizer": described},
                              indent=2) + "\n")
    os.replace(tmp, to / RECORD)
    return {"folder": str(to), "format": "transformers", "reason": None}
