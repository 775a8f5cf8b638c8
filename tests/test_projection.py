"""Adapter-free StableKD (``decompose.adapters: projected``, issue 28): the frozen PCA projection
of the teacher's features equals an SVD computed here; the plan has a fit stage and no adapter
in the student's path; the inference program is the plain student; the fit is saved with the
checkpoints; the exported student loads with plain timm; pairs the projection cannot carry
fall back to in_path and say why."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdgraph.compiler import compile_spec
from kdgraph.errors import SpecError
from kdgraph.ir import FeatureFormat, ProjectionSpec
from kdgraph.projection import Projection, fit_projections
from kdgraph.runtime.chain import run_program
from kdgraph.runtime.distiller import Distiller, StepState
from kdgraph.spec import load_spec

from _runtime_helpers import ROOT, plain_timm_outputs, train_here, write_spec


def _resnet(name: str, c: int) -> dict:
    return {"model": f"timm:{name}", "kwargs": {"num_classes": 10, "in_chans": 1, "channels": [c, 2 * c, 4 * c, 8 * c],
                                                 "stem_width": c}}


def wide_pair_spec(out, adapters="projected", **schedule) -> dict:
    """A ResNet-50-shaped teacher (bottleneck: outputs 4x wider) and a ResNet-18 student at
    widths 8..64: a width mismatch at every block end, residual stages that a lower∘lift cannot
    fold into (3x3 padded convs and identity shortcuts read the cuts)."""
    return {"name": "wide-pair", "seed": 0, "teacher": _resnet("resnet50", 8), "student": _resnet("resnet18", 8),
            "data": {"dataset": "synthetic", "input_size": [1, 32, 32], "num_classes": 10, "batch_size": 16,
                     "fraction": 0.02},
            "decompose": {"blocks": 5, "adapters": adapters, "projection_batches": 2},
            "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 3, **schedule},
            "optim": {"name": "sgd", "lr": 0.05, "lr_schedule": "stage_cyclic"},
            "runtime": {"device": "cpu", "log_every": 1000, "num_threads": 1}, "output": str(out)}


def _pca_truth(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-k right singular vectors of the centred rows (SVD), each signed so its
    entry of largest magnitude is positive."""
    mean = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return mean, comps * signs


@pytest.mark.parametrize("split", [False, True])
def test_pca_projection_equals_the_svd_of_the_teachers_features(split):
    torch.manual_seed(0)
    t_fmt, s_fmt = FeatureFormat("NCHW", 12, (4, 4)), FeatureFormat("NCHW", 6, (2, 2))
    proj = Projection(ProjectionSpec(1, s_fmt, t_fmt, split))
    # features with a few dominant directions (distinct eigenvalues) and an offset
    basis = torch.randn(12, 12)
    feats = [torch.einsum("bchw,cd->bdhw", torch.randn(8, 12, 4, 4) * torch.linspace(3, 0.1, 12)[None, :, None, None],
                          basis) + 0.5 for _ in range(3)]
    used = fit_projections({"1": proj}, lambda x, blocks: {1: x}, ((f, None) for f in feats), limit=2)
    assert used == 2 and bool(proj.fitted)
    # the truth: the same maps pooled to the student's 2x2 grid, one row per position
    maps = torch.cat([F.adaptive_avg_pool2d(f, (2, 2)) for f in feats[:2]]).double()
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 12)
    k = 3 if split else 6
    mean, comps = _pca_truth(rows, k)
    assert torch.allclose(proj.mean.double(), mean, atol=1e-5)
    assert torch.allclose(proj.components.double(), comps, atol=1e-4)
    x = feats[2]
    z = torch.einsum("kc,bchw->bkhw", comps, F.adaptive_avg_pool2d(x, (2, 2)).double() - mean[:, None, None])
    want = torch.cat([z.clamp(min=0), (-z).clamp(min=0)], 1) if split else z
    got = proj(x)
    assert got.shape == (8, 6, 2, 2)
    assert torch.allclose(got.double(), want, atol=1e-4)
    if split:
        assert (got >= 0).all()  # a ReLU output can match it exactly
    # the pseudo-inverse lifts back what was kept: mu + C^T C (x - mu)
    kept = torch.einsum("kc,kd,bdhw->bchw", comps, comps, F.adaptive_avg_pool2d(x, (2, 2)).double() - mean[:, None, None])
    assert torch.allclose(proj.lift(got).double(), kept + mean[:, None, None], atol=1e-4)


def test_tokens_project_into_a_map_of_the_students_grid():
    """A ViT teacher's tokens (a class token, 4x4 patches) into a CNN's 2x2 map: the prefix is
    dropped, the grid resampled, the channels projected."""
    t_fmt, s_fmt = FeatureFormat("tokens", 16, (4, 4), prefix=1), FeatureFormat("NCHW", 4, (2, 2))
    proj = Projection(ProjectionSpec(1, s_fmt, t_fmt))
    tokens = torch.randn(5, 17, 16)
    fit_projections({"1": proj}, lambda x, blocks: {1: x}, [(tokens, None)], limit=1)
    grid = tokens[:, 1:].transpose(1, 2).reshape(5, 16, 4, 4)
    rows = F.adaptive_avg_pool2d(grid, (2, 2)).permute(0, 2, 3, 1).reshape(-1, 16).double()
    mean, comps = _pca_truth(rows, 4)
    assert torch.allclose(proj.components.double(), comps, atol=1e-4)
    assert proj(tokens).shape == (5, 4, 2, 2)


def test_projected_plan_has_a_fit_stage_and_no_adapter_in_the_students_path(tmp_path):
    compiled = compile_spec(load_spec(wide_pair_spec(tmp_path / "run")))
    plan, pairing = compiled.plan, compiled.pairing
    assert pairing.adapters_mode == "projected" and not pairing.adapters
    assert [p.index for p in pairing.projections] == [1, 2, 3, 4]
    assert all(p.split for p in pairing.projections)  # timm's BasicBlock ends in a ReLU
    assert plan.projection_fit.blocks == (1, 2, 3, 4) and plan.projection_fit.batches == 2
    for st in plan.stages:
        assert [op.kind for op in st.inference.ops] == ["student"] * 5
        assert not st.program.adapter_blocks
    first = plan.stages[0].program
    # S2 is fed the projected teacher feature; mse1 compares S1 with it, in the student's space
    ops = {op.node: op for op in first.ops}
    assert ops["project1"].inputs == ("T1",) and ops["S2"].inputs == ("project1",)
    assert ops["mse1"].inputs == ("S1", "project1")
    last = plan.stages[-1].program
    assert {op.node: op for op in last.ops}["S2"].inputs == ("S1",)  # recomposed: the student's own chain
    data = compiled.to_dict()
    assert data["schedule"]["projection_fit"] == {"method": "pca", "blocks": [1, 2, 3, 4], "batches": 2}
    assert data["adapters_mode"] == "projected" and data["adapters_in_use"] is False
    json.dumps(data)


def test_the_inference_program_is_the_plain_students_forward(tmp_path):
    compiled = compile_spec(load_spec(wide_pair_spec(tmp_path / "run")))
    d = Distiller(compiled).eval()
    assert not d.adapters_in_inference and not d.adapters
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        # op by op through the segments, not the whole-model shortcut
        by_ops = run_program(d.inference_program, x, lambda op, inputs: d.run_op(op, inputs, StepState()))
        assert torch.allclose(by_ops, compiled.student.model(x), atol=1e-5)
        assert torch.allclose(d.inference(x), compiled.student.model(x), atol=1e-6)


def test_projections_are_frozen_and_saved_with_the_checkpoint(tmp_path):
    spec = load_spec(wide_pair_spec(tmp_path / "run", epochs=3))
    summary = train_here(spec)
    assert summary["student_top1"] >= 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert state["projections.1.fitted"].item() and state["projections.4.components"].shape == (32, 256)  # 64 channels: 32 split pairs
    assert not any(k.startswith("adapters.") for k in state)
    # a resumed run loads the fit instead of fitting again
    d = Distiller(compile_spec(spec))
    assert not d.projections_fitted
    d.load_state_dict(state)
    assert d.projections_fitted
    assert torch.equal(d.projections["2"].components, state["projections.2.components"])
    # and nothing in the projection is trained
    assert not any(p.requires_grad for p in d.projections.parameters())


def test_explicit_layer_pairs_compose_with_projected_blocks(tmp_path):
    """loss.pairs with decompose.adapters: projected: the blocks meet in the student's space
    through frozen projections, the pair's lift (student -> teacher width) trains beside them,
    and neither enters the student's inference path. Truth for the pair's term in the
    recomposed stage: the eager models' module outputs (forward hooks) and the pair's lift."""
    spec = wide_pair_spec(tmp_path / "run")
    spec["loss"] = {"pairs": [{"student": "layer2.0", "teacher": "layer2.1", "weight": 2.0}]}
    c = compile_spec(load_spec(spec))
    assert c.pairing.adapters_mode == "projected" and not c.pairing.adapters
    assert c.pairing.pairs[0].adapter.lift == (16, 64)
    for st in c.plan.stages:
        assert [op.kind for op in st.inference.ops] == ["student"] * 5
        assert "mse_p1" in {op.node for op in st.program.ops}
    first = {op.node: op for op in c.plan.stages[0].program.ops}
    assert first["S3"].inputs == ("project2",) and first["mse2"].inputs == ("S2", "project2")
    assert first["xlift_p1"].inputs == ("xs_p1",) and first["mse_p1"].inputs == ("xlift_p1", "xt_p1")
    d = Distiller(c)
    assert not d.adapters and not d.adapters_in_inference
    torch.manual_seed(0)
    batches = [(torch.randn(8, 1, 32, 32), torch.arange(8) % 10) for _ in range(2)]
    d.fit_projections(batches, 2)
    x, y = batches[0]
    terms = d(x, y)
    assert {"mse1", "mse2", "mse_p1"} <= set(terms)
    terms["mse_p1"].backward()
    assert d.pair_lifts["xlift_p1"].conv.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in d.projections.parameters())
    d.zero_grad(set_to_none=True)
    d.set_stage(c.plan.stages[-1])  # recomposed: the student's own chain, as KD
    terms = d(x, y)
    seen = {}
    hooks = [c.student.model.get_submodule("layer2.0").register_forward_hook(lambda m, a, o: seen.setdefault("s", o)),
             c.teacher.model.get_submodule("layer2.1").register_forward_hook(lambda m, a, o: seen.setdefault("t", o))]
    with torch.no_grad():
        c.student.model(x)
        d.teacher(x)
        want = 2.0 * torch.mean((d.pair_lifts["xlift_p1"](seen["s"]) - seen["t"]) ** 2)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(terms["mse_p1"].detach(), want)


@pytest.mark.slow
def test_the_exported_projected_student_loads_with_plain_timm(tmp_path):
    from kdgraph.runtime.commands import export_spec
    from kdgraph.runtime.export import load_student

    spec = load_spec(write_spec(wide_pair_spec(tmp_path / "run"), tmp_path / "s.yaml"))
    train_here(spec)
    result = export_spec(spec, tmp_path / "ship")
    assert result["format"] == "state_dict"
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        expected = load_student(compile_spec(spec), tmp_path / "run" / "student.safetensors").eval()(x)
    got = plain_timm_outputs(tmp_path / "ship", x, tmp_path)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_projected_mode_refuses_tpp_and_cap(tmp_path):
    spec = wide_pair_spec(tmp_path / "run")
    with pytest.raises(SpecError, match="decompose.adapters: projected"):
        load_spec({**spec, "loss": {"tpp": True}})
    with pytest.raises(SpecError, match="decompose.adapters: projected"):
        load_spec({**spec, "decompose": {**spec["decompose"], "projector": "cap"}})


@pytest.mark.parametrize("change, mode", [
    ({}, "projected"),  # StableKD: lower∘lift would stay in the student's path
    ({"schedule": {"method": "kd", "recompositions": 0}}, "in_path"),  # no decomposition: nothing in the path
    ({"schedule": {"method": "kd+mse", "recompositions": 0}}, "in_path"),  # lifts for its MSEs, training-only
    ({"loss": {"tpp": True}}, "in_path"),  # TPP lifts the student into the teacher's width
    ({"decompose": {"projector": "cap"}}, "in_path"),  # ScaleKD's CAP projects into the teacher's space
], ids=["stablekd", "kd", "kd+mse", "tpp", "cap"])
def test_auto_projects_exactly_where_adapters_would_stay_in_the_students_path(tmp_path, change, mode):
    """decompose.adapters: auto (the default) resolves by the method and the lifts it needs."""
    raw = wide_pair_spec(tmp_path / "run", adapters="auto")
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value}
    raw["decompose"].pop("adapters")  # the default
    c = compile_spec(load_spec(raw))
    assert c.run.decompose.adapters == "auto" and c.pairing.adapters_mode == mode
    assert bool(c.pairing.adapters) == (mode == "in_path") and not c.pairing.fallback
    assert (c.plan.projection_fit is not None) == (mode == "projected")
    if mode == "in_path" and c.plan.chains_adapters:  # only tpp/cap keep adapters in the path
        assert change.get("loss") or change.get("decompose")


def test_auto_falls_back_where_the_projection_cannot_carry_and_says_why():
    c = _shipped("fashion-unet")  # StableKD on a U-Net: multi-tensor cuts
    assert c.run.decompose.adapters == "auto" and c.pairing.adapters_mode == "in_path"
    assert any(n.startswith("decompose.adapters: auto: ") and "multi-tensor" in n for n in c.notes)


def _shipped(stem: str, *sets: str):
    spec = load_spec(ROOT / "specs" / f"{stem}.yaml", ["teacher.checkpoint=null", *sets])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_spec(spec, allow_missing_weights=True, materialize=False)


def test_cross_architecture_tokens_to_maps_are_projected():
    c = _shipped("vit_small-to-resnet18", "decompose.adapters=projected")
    assert c.pairing.adapters_mode == "projected" and not c.pairing.adapters
    p = c.pairing.projections[0]
    assert p.teacher_format.layout == "tokens" and p.student_format.layout == "NCHW"
    assert all(op.kind == "student" for op in c.plan.stages[-1].inference.ops)


def test_a_cnn_teacher_feeds_a_vit_students_class_token_its_pooled_map():
    c = _shipped("resnet50-to-vit_tiny", "decompose.adapters=projected")
    assert c.pairing.adapters_mode == "projected" and not c.pairing.adapters and not c.pairing.fallback
    p = c.pairing.projections[0]
    assert p.student_format.prefix == 1 and p.teacher_format.prefix == 0 and not p.split
    # the class token is the projection of the teacher's map pooled over the student's grid
    t_fmt, s_fmt = FeatureFormat("NCHW", 8, (4, 4)), FeatureFormat("tokens", 3, (2, 2), prefix=1)
    proj = Projection(ProjectionSpec(1, s_fmt, t_fmt))
    x = torch.randn(6, 8, 4, 4)
    fit_projections({"1": proj}, lambda x, blocks: {1: x}, [(x, None)], limit=1)
    pooled = F.adaptive_avg_pool2d(x, (2, 2))
    out = proj(x)
    assert out.shape == (6, 5, 3)
    want_cls = (pooled.mean(dim=(2, 3)) - proj.mean) @ proj.components.T
    assert torch.allclose(out[:, 0], want_cls, atol=1e-5)
    want_patches = proj.coordinates(pooled).flatten(2).transpose(1, 2)
    assert torch.allclose(out[:, 1:], want_patches, atol=1e-5)


def test_tokens_to_tokens_keep_the_teachers_class_token_projected():
    t_fmt, s_fmt = FeatureFormat("tokens", 8, (2, 2), prefix=1), FeatureFormat("tokens", 4, (2, 2), prefix=1)
    proj = Projection(ProjectionSpec(1, s_fmt, t_fmt))
    x = torch.randn(3, 5, 8)
    fit_projections({"1": proj}, lambda x, blocks: {1: x}, [(x, None)], limit=1)
    assert torch.allclose(proj(x)[:, 0], (x[:, 0] - proj.mean) @ proj.components.T, atol=1e-5)


def test_a_pair_the_projection_cannot_carry_falls_back_and_says_why():
    """A U-Net's multi-tensor cuts: no per-tensor projection yet, so adapters stay in the path."""
    c = _shipped("fashion-unet", "decompose.adapters=projected")
    assert c.pairing.adapters_mode == "in_path" and c.pairing.adapters
    assert "multi-tensor" in c.pairing.fallback and "in_path" in c.pairing.fallback
    assert any("decompose.adapters: projected" in n and "multi-tensor" in n for n in c.notes)
    assert c.plan.projection_fit is None


@pytest.mark.slow
def test_a_killed_projected_run_resumes_exactly(tmp_path):
    """Run B is killed mid-run and resumed in a fresh process: it keeps the projection it
    fitted (from its checkpoint) and ends with run A's student and losses."""
    import signal
    import time

    from safetensors.torch import load_file

    from _runtime_helpers import popen_cli, run_cli, tiny_spec

    def spec(name):
        d = tiny_spec(tmp_path / name, "stablekd", recompositions=1, epochs=2,
                      decompose={"adapters": "projected", "projection_batches": 3},
                      runtime={"checkpoint_every": 3, "log_every": 1})
        return write_spec(d, tmp_path / f"{name}.yaml")

    def steps(out):
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        recs = []
        for ln in lines:
            try:
                recs.append(json.loads(ln))
            except json.JSONDecodeError:  # a line being written
                break
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_share", "time")}
                for r in recs if r["kind"] == "step"]

    assert run_cli("train", str(spec("a")), "--quiet").returncode == 0
    proc = popen_cli("train", str(spec("b")), "--quiet")
    t0 = time.time()
    while not (steps(tmp_path / "b") and steps(tmp_path / "b")[-1]["global_step"] >= 10):
        assert proc.poll() is None and time.time() - t0 < 240, "run B ended or stalled before step 10"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fitted = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["model"]
    res = run_cli("train", str(spec("b")), "--quiet", "--resume")
    assert res.returncode == 0, res.stderr
    final = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in (k for k in fitted if k.startswith("projections.")):
        assert torch.equal(final[key], fitted[key]), key
    a, b = load_file(str(tmp_path / "a" / "student.safetensors")), load_file(str(tmp_path / "b" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert steps(tmp_path / "a") == steps(tmp_path / "b")


_VIT = {"model": "timm:vit_tiny_patch16_224",
        "kwargs": {"num_classes": 10, "in_chans": 1, "img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48,
                   "num_heads": 2}}


@pytest.mark.parametrize("teacher,student", [(_VIT, _resnet("resnet18", 8)), (_resnet("resnet50", 8), _VIT)],
                         ids=["vit-to-cnn", "cnn-to-vit"])
def test_cross_architecture_projected_pairs_train_and_stay_their_own_architecture(tmp_path, teacher, student):
    spec = load_spec({**wide_pair_spec(tmp_path / "run", epochs=3), "teacher": teacher, "student": student})
    compiled = compile_spec(spec)
    assert compiled.pairing.adapters_mode == "projected" and compiled.plan.projection_fit is not None
    assert {p.teacher_format.layout for p in compiled.pairing.projections} != \
        {p.student_format.layout for p in compiled.pairing.projections}  # the projection carries the layout
    summary = train_here(spec)
    assert summary["student_top1"] >= 0
    d = Distiller(compile_spec(spec))
    assert all(op.kind == "student" for op in d.inference_program.ops)


@pytest.mark.slow
def test_two_gloo_ranks_fit_the_projection_of_the_batches_they_share_out(tmp_path):
    """Under DDP each rank sees its shard (positions r, r+2, ... of the epoch's order); the fit
    adds both ranks' sums, so it equals one process's fit on batches twice as large."""
    from _runtime_helpers import cli_env, tiny_spec

    # the ranks' first 2 batches of 8 are positions 0..31 of the epoch's order, as the single
    # process's first 2 batches of 16 (padding only ever repeats the order's start at its end)
    spec = tiny_spec(tmp_path / "ddp", "stablekd", recompositions=1, epochs=2, fraction=0.04, batch_size=8,
                     decompose={"adapters": "projected", "projection_batches": 2})
    path = write_spec(spec, tmp_path / "ddp.yaml")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kdgraph", "train", str(path),
                          "--quiet"], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)["model"]

    from kdgraph.data import build_data
    from kdgraph.runtime.techniques import DistInfo

    single = load_spec({**spec, "data": {**spec["data"], "batch_size": 16}})
    torch.manual_seed(single.seed)  # the teacher's random weights, as build_run draws them
    compiled = compile_spec(single)
    d = Distiller(compiled)
    data = build_data(single, compiled.data, torch.device("cpu"), DistInfo())
    d.fit_projections(data.train.epoch(0), 2)
    keys = [k for k in ddp if k.startswith("projections.")]
    assert keys
    for k in keys:
        assert torch.allclose(d.state_dict()[k].double(), ddp[k].double(), atol=1e-4), k


def test_the_distillers_fit_is_the_pca_of_the_teachers_features_not_the_students(tmp_path):
    """Distiller.fit_projections: each projection's mean is the mean of the teacher's features
    at its block end (on the student's grid) over the fitted batches; the student's features
    would give another mean."""
    c = compile_spec(load_spec(wide_pair_spec(tmp_path / "run")))
    d = Distiller(c)
    torch.manual_seed(0)
    batches = [(torch.randn(8, 1, 32, 32), torch.arange(8) % 10) for _ in range(2)]
    d.fit_projections(batches, 2)
    assert d.projections
    for key, proj in d.projections.items():
        with torch.no_grad():
            feats = [d.teacher.features(x, {int(key)})[int(key)] for x, _ in batches]
        grid = torch.cat([proj.to_student_grid(f) for f in feats])
        want = grid.transpose(0, 1).flatten(1).double().mean(1)
        assert proj.mean.shape == (feats[0].shape[1],)  # the teacher's width
        torch.testing.assert_close(proj.mean.double(), want, rtol=1e-5, atol=1e-6)
