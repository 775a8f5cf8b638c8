"""Every shipped spec whose student is a timm model exports, with the method it ships with, to
a folder that plain timm loads (``timm.create_model("local-dir:...")``, in a process that never
imports kdgraph), and gives kdgraph's logits (issue 28's goal).

The students are untrained (random weights, BatchNorm statistics randomised so that folding
has to use them): what is checked is the export path, which depends on the plan alone. As
shipped, StableKD specs whose widths differ are projected (``decompose.adapters: auto``); the
same specs with ``decompose.adapters: projected`` named explicitly are checked too. No shipped
timm student falls back to adapters in its path: a spec that did would fail here."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.export import folded_maps
from kdgraph.runtime.ship import fold_into_student, ship_student
from kdgraph.spec import load_spec

from _runtime_helpers import ROOT, plain_timm_outputs, randomise_bn

SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def _timm_student(path: Path) -> bool:
    return str((yaml.safe_load(path.read_text()).get("student") or {}).get("model", "")).startswith("timm:")


def _heavy(path: Path) -> bool:
    size = (yaml.safe_load(path.read_text()).get("data") or {}).get("input_size") or [0, 0, 0]
    return size[-1] >= 128


def _decomposes_with_adapters(path: Path) -> bool:
    doc = yaml.safe_load(path.read_text())
    return bool(doc.get("teacher")) and (doc.get("schedule") or {}).get("method", "stablekd") == "stablekd"


def _params():
    for p in SPECS:
        if not _timm_student(p):
            continue
        marks = [pytest.mark.slow] if _heavy(p) else []
        yield pytest.param(p.stem, "as shipped", marks=marks, id=p.stem)
        if _decomposes_with_adapters(p):
            yield pytest.param(p.stem, "projected", marks=marks, id=f"{p.stem}-projected")


def _compiled(stem: str, mode: str):
    doc = yaml.safe_load((ROOT / "specs" / f"{stem}.yaml").read_text())
    sets = ["student.pretrained=false"]  # no network here; the weights do not matter
    if doc.get("teacher"):
        sets += ["teacher.checkpoint=null", "teacher.pretrained=false"]
    if mode == "projected":
        sets.append("decompose.adapters=projected")
    spec = load_spec(ROOT / "specs" / f"{stem}.yaml", sets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_spec(spec, allow_missing_weights=True)


@pytest.mark.parametrize("stem,mode", list(_params()))
def test_the_exported_student_loads_with_plain_timm(stem, mode, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # checkpoint and data paths in specs are relative to the repo root
    compiled = _compiled(stem, mode)
    d = Distiller(compiled)
    randomise_bn(d, 0)
    d.eval()
    maps = folded_maps(d)
    assert not compiled.pairing.fallback, (stem, compiled.pairing.fallback)
    if mode == "projected" or _decomposes_with_adapters(ROOT / "specs" / f"{stem}.yaml"):
        assert compiled.pairing.adapters_mode == "projected" and not maps, stem
    folded = fold_into_student(compiled, maps)
    assert folded.model is not None, f"{stem} ships a torch.export program: {folded.reason}"
    c, h, w = compiled.input_size
    pre = {"input_size": [c, h, w], "mean": [0.5] * c, "std": [0.25] * c}
    result = ship_student(compiled, maps, tmp_path / "ship", pre, {"top1": None})
    assert result["format"] == "state_dict"
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(1))
    got = plain_timm_outputs(tmp_path / "ship", x, tmp_path, timeout=600)
    with torch.no_grad():
        expected = d.inference(x)
    assert torch.allclose(got, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=1e-4)
