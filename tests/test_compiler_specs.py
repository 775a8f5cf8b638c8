"""Every example spec compiles; pairings, the JSON contract, mismatches and explicit cuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdgraph.compiler import compile_spec
from kdgraph.errors import PlanError
from kdgraph.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def _heavy(path: Path) -> bool:
    """224-input ImageNet-size pairs compile in seconds each: marked slow."""
    import yaml

    size = (yaml.safe_load(path.read_text()).get("data") or {}).get("input_size") or [0, 0, 0]
    return size[-1] >= 128


HEAVY = {p.stem for p in SPECS if _heavy(p)}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # checkpoint paths in specs are relative to the repo root


def _load(path: Path):
    spec = load_spec(path)
    ckpt = spec.teacher.checkpoint if spec.teacher else None
    if ckpt is not None and not Path(ckpt).exists():
        spec = load_spec(path, ["teacher.checkpoint=null"])
    return spec


_CACHE: dict[str, object] = {}


def _compiled(stem: str):
    if stem not in _CACHE:
        # as `kdgraph plan` does: an image folder or weights file that does not exist yet is noted
        _CACHE[stem] = compile_spec(_load(ROOT / "specs" / f"{stem}.yaml"), allow_missing_weights=True)
    return _CACHE[stem]


def _params():
    for p in SPECS:
        marks = [pytest.mark.slow] if p.stem in HEAVY else []
        yield pytest.param(p.stem, marks=marks, id=p.stem)


@pytest.mark.parametrize("stem", list(_params()))
def test_every_spec_compiles(stem):
    c = _compiled(stem)
    spec = c.run
    assert c.pairing.k == spec.decompose.blocks
    assert c.plan.k == spec.decompose.blocks
    assert len(c.student.boundaries) == spec.decompose.blocks - 1
    if c.teacher:
        assert len(c.teacher.boundaries) == spec.decompose.blocks - 1
    assert c.plan.epochs == spec.schedule.epochs
    assert set(c.timings) >= {"build", "trace", "cuts", "stages", "boundaries", "pair", "block_graph", "plan"}
    d = c.to_dict()
    assert json.loads(json.dumps(d))["name"] == spec.name


def _labels(bounds):
    return [b.cut.label for b in bounds]


def test_resnet34_to_resnet18():
    c = _compiled("resnet34-to-resnet18")
    assert _labels(c.teacher.boundaries) == ["layer1", "layer2", "layer3", "layer4"]
    assert _labels(c.student.boundaries) == ["layer1", "layer2", "layer3", "layer4"]
    assert c.pairing.adapters == []
    assert [b.rule for b in c.pairing.blocks] == ["stage end"] * 4 + ["head"]
    assert c.num_classes == 100 and c.input_size == (3, 32, 32)
    assert [b.cut.shape for b in c.student.boundaries] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]


def test_resnet50_to_resnet18_projects_by_default_and_keeps_adapters_in_path_when_asked():
    """The flagship pair: decompose.adapters: auto projects each teacher block end (ResNet-18's
    block ends are ReLU outputs: sign-split PCA, Cs/2 components); in_path plans 1x1 adapters."""
    c = _compiled("resnet50-to-resnet18")
    assert _labels(c.teacher.boundaries) == ["layer1", "layer2", "layer3", "layer4"]
    assert c.pairing.adapters_mode == "projected" and not c.pairing.adapters
    assert [(b.projection.student_format.channels, b.projection.teacher_format.channels, b.projection.components,
             b.projection.split) for b in c.pairing.blocks[:4]] == [
        (64, 256, 32, True), (128, 512, 64, True), (256, 1024, 128, True), (512, 2048, 256, True)]
    spec = load_spec(ROOT / "specs" / "resnet50-to-resnet18.yaml", ["teacher.checkpoint=null", "decompose.adapters=in_path"])
    c = compile_spec(spec, allow_missing_weights=True)
    assert [(a.index, a.student_channels, a.teacher_channels, a.kind) for a in c.pairing.adapters] == [
        (1, 64, 256, "conv1x1"), (2, 128, 512, "conv1x1"), (3, 256, 1024, "conv1x1"), (4, 512, 2048, "conv1x1")]
    assert [a.lift for a in c.pairing.adapters] == [(64, 256), (128, 512), (256, 1024), (512, 2048)]


def test_wide_resnet_to_resnet50_needs_no_adapters():
    c = _compiled("wide_resnet50_2-to-resnet50")
    assert c.pairing.adapters == [] and _labels(c.teacher.boundaries) == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.slow
def test_vit_depth_split():
    c = _compiled("vit_small-to-vit_small_d8")
    t, s = c.teacher.boundaries, c.student.boundaries
    assert [b.cut.module for b in t[:3]] == ["blocks.2", "blocks.5", "blocks.8"]
    assert [b.cut.module for b in s[:3]] == ["blocks.1", "blocks.3", "blocks.5"]
    assert "blocks.11" in t[3].cut.closes and "blocks.7" in s[3].cut.closes
    assert all(b.rule.endswith("(3/3/3/3)") for b in t)
    assert all(b.rule.endswith("(2/2/2/2)") for b in s)
    assert all(b.cut.shape == (197, 384) and b.cut.prefix_tokens == 1 for b in t + s)
    assert c.pairing.adapters == []


@pytest.mark.slow
def test_swin_stages():
    c = _compiled("swin_small-to-swin_tiny")
    for art in (c.teacher, c.student):
        cuts = [b.cut for b in art.boundaries]
        assert [c_.module for c_ in cuts[:3]] == ["layers.0", "layers.1", "layers.2"]
        assert "layers.3" in cuts[3].closes
        assert [c_.layout for c_ in cuts] == ["NHWC"] * 4
        assert [c_.reduction for c_ in cuts] == [4, 8, 16, 32]
    assert c.pairing.adapters == []


@pytest.mark.slow
def test_convnext_projections():
    """ConvNeXt-T -> Atto: every block end projected (the default for StableKD), NHWC stages;
    its block ends are not ReLU outputs, so a plain PCA keeps Cs components."""
    c = _compiled("convnext_tiny-to-convnext_atto")
    assert c.pairing.adapters_mode == "projected" and not c.pairing.adapters
    assert [(p.student_format.channels, p.teacher_format.channels, p.components, p.split)
            for p in c.pairing.projections] == [
        (40, 96, 40, False), (80, 192, 80, False), (160, 384, 160, False), (320, 768, 320, False)]


def test_json_contract():
    c = _compiled("resnet50-to-resnet18")
    d = json.loads(json.dumps(c.to_dict()))
    for role in ("teacher", "student"):
        art = d[role]
        assert art["cuts"] and art["stages"]
        for cut in art["cuts"]:
            assert {"node", "module", "closes", "shape", "layout", "channels", "reduction"} <= set(cut)
            assert isinstance(cut["closes"], list) and isinstance(cut["shape"], list)
        for st in art["stages"]:
            assert {"module", "node", "shape", "layout", "channels", "reduction"} <= set(st)
    assert [b["index"] for b in d["blocks"]] == [1, 2, 3, 4, 5]
    for b in d["blocks"]:
        assert {"index", "teacher", "student", "adapter"} <= set(b)
    assert d["adapters_mode"] == "projected" and all(b["adapter"] is None for b in d["blocks"])
    assert d["blocks"][0]["projection"] == {"kind": "pca", "split": True, "components": 32,
                                            "student_format": ["NCHW", [64, 8, 8]],
                                            "teacher_format": ["NCHW", [256, 8, 8]]}
    assert d["blocks"][-1]["teacher"] == d["blocks"][-1]["student"] == "output"
    sched = d["schedule"]
    assert {"method", "k", "n", "stages"} <= set(sched)
    assert (sched["method"], sched["k"], sched["n"]) == ("stablekd", 5, 2)
    for st in sched["stages"]:
        assert {"index", "epochs", "groups", "losses"} <= set(st)
    assert [st["epochs"] for st in sched["stages"]] == [20, 20, 20]
    assert d["input_size"] == [3, 32, 32] and d["num_classes"] == 100
    assert {n["id"] for n in d["graph"]["nodes"]} >= {"T1", "S5", "project4", "head_loss"}
    assert not {n["id"] for n in d["graph"]["nodes"]} & {"lift4", "lower4"}


def _pair(teacher: str, student: str, size: int, t_kw=None, s_kw=None, **extra) -> dict:
    return {
        "name": "pair",
        "teacher": {"model": f"timm:{teacher}", "kwargs": {"num_classes": 10, **(t_kw or {})}},
        "student": {"model": f"timm:{student}", "kwargs": {"num_classes": 10, **(s_kw or {})}},
        "data": {"dataset": "synthetic", "input_size": [3, size, size], "num_classes": 10},
        **extra,
    }


def test_unconvertible_pair_names_both_cuts():
    # A pooled vector cannot be converted to a map: pairing it with a map fails, naming both.
    raw = _pair("resnet34", "resnet18", 32, schedule={"recompositions": 1}, decompose={"blocks": 2, "cuts": [
        {"teacher": "global_pool", "student": "layer4"}]})
    with pytest.raises(PlanError) as info:
        compile_spec(load_spec(raw))
    msg = str(info.value)
    assert "teacher cut 'global_pool'" in msg and "student cut 'layer4'" in msg
    assert "vector" in msg and "NCHW" in msg


def test_prebuilt_models_are_used_as_given():
    import timm

    spec = load_spec(_pair("resnet34", "resnet18", 32))
    t, s = timm.create_model("resnet34", num_classes=10), timm.create_model("resnet18", num_classes=10)
    c = compile_spec(spec, models=(t, s))
    assert c.teacher.model is t and c.student.model is s
    assert c.teacher.traced.gm.get_submodule("layer1.0.conv1") is t.layer1[0].conv1


def test_passes_run_in_order_numbered_and_return_frozen_artifacts():
    """compile_spec runs every pass of PASSES once, in order; each pass's docstring gives its
    number; the artifacts it returns cannot be changed in place."""
    import dataclasses

    import networkx as nx

    from kdgraph.compiler import PASSES

    c = _compiled("quickstart")
    assert list(c.timings) == [p.fn.__name__.removesuffix("_pass") for p in PASSES]
    for number, p in enumerate(PASSES, start=1):
        assert p.fn.__doc__.startswith(f"Pass {number}: "), p.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.plan = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.student.boundaries = ()
    with pytest.raises(nx.NetworkXError):
        c.graph.add_node("extra")


def test_a_pass_is_called_by_name_with_what_it_requires_and_checks_what_it_ensures():
    """Each pass reads the artifacts its Pass names, in the order its function takes them; a
    missing one, or a result that breaks the pass's invariant, is an error naming the pass."""
    import inspect

    from kdgraph.compiler import PASSES, Pass
    from kdgraph.errors import PlanError

    for p in PASSES:
        assert p.reads == tuple(inspect.signature(p.fn).parameters), p.name
    written = {"spec", "run", "mode", "given", "input_size", "cache_header"}  # what _compile starts with
    for p in PASSES:  # every artifact a pass reads was written before it
        assert set(p.reads) <= written, p.name
        written.add(p.writes)

    def double_pass(models):
        return models * 2

    doubled = Pass(double_pass, ("models",), "models", lambda spec, size, out: ["odd"] if out % 2 else [])
    env = {"spec": None, "input_size": (1, 8, 8), "models": 3}
    assert doubled(env) == 6 and env["models"] == 6
    with pytest.raises(PlanError, match="compiler pass 'double' reads models"):
        doubled({"spec": None, "input_size": (1, 8, 8)})
    with pytest.raises(PlanError, match="compiler pass 'half' broke an invariant: odd"):
        def half_pass(models):
            return models // 2
        Pass(half_pass, ("models",), "models", doubled.ensures)({"spec": None, "input_size": (1,), "models": 6})
