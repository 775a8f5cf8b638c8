"""A trained causal-LM student as a Hugging Face folder: ``config.json``,
``model.safetensors`` and ``generation_config.json`` (``save_pretrained`` of the wrapped
transformers model), plus ``kdgraph.json`` (where the weights came from). The folder loads in
plain transformers, ``AutoModelForCausalLM.from_pretrained(folder)``, without kdgraph."""

from __future__ import annotations

import json
from pathlib import Path

from kdgraph.errors import KDGraphError

__all__ = ["check_exportable", "ship_causal_lm"]


def check_exportable(spec) -> None:
    """Refuse, before anything is built, a student that is not a ``transformers:`` model."""
    if not str(spec.student.model).startswith("transformers:"):
        raise KDGraphError(f"export: a causal-LM student ships as a Hugging Face folder, which needs a "
                           f"transformers: model (got {spec.student.model})")


def ship_causal_lm(compiled, maps: dict, path: Path, to: Path, command: str) -> dict:
    """Write the trained student (loaded into ``compiled.student.model``) to the new folder ``to``."""
    if maps:
        raise KDGraphError("export: this student carries adapter maps that are not part of a transformers model")
    lm = compiled.student.model.lm.eval()
    to = Path(to)
    to.mkdir(parents=True)
    lm.config.use_cache = True  # generation in plain transformers uses its KV cache
    try:
        lm.save_pretrained(str(to), safe_serialization=True)
    finally:
        lm.config.use_cache = False
    (to / "kdgraph.json").write_text(json.dumps({"weights_from": str(path), "command": command,
                                                  "tokenizer": "utf-8 bytes (ids 0..255)"}, indent=2) + "\n")
    return {"folder": str(to), "format": "transformers", "reason": None}
