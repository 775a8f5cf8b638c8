"""Denoisers (side inputs t and y reach every block) combined with the features that landed
apart from them: a bfloat16 teacher, a teacher sharded over two gloo ranks, decompose.adapters
other than in_path, and `kdgraph eval --checkpoint` of a diffusers export folder.

Independent truth: the zoo U-Net's own eager forward, from the same weights file, cast to
bfloat16 by hand (forward hooks at the cut modules for the block features); the unsharded
teacher and the eager model for the sharded one, and two torchrun trainings that differ in
teacher.shard alone (a judge sampling the teacher included); the teacher's features at the noisy images
recomputed by hand (DenoiseTask.draw and a forward hook) for a fitted projection; the trained
run's own evaluation for the exported diffusers folder.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from _runtime_helpers import ROOT, write_spec
from _shard_worker import UNET, denoiser_spec
from kdgraph import zoo
from kdgraph.compiler import compile_spec
from kdgraph.data import build_data
from kdgraph.tasks.denoise.diffusion import DenoiseTask, denoise_mse
from kdgraph.errors import KDGraphError
from kdgraph.runtime import loop
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.techniques import DistInfo
from kdgraph.spec import load_spec
from kdgraph.spec.schema import DecomposeSpec

SIZE = (1, 16, 16)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(5)
    model = zoo.diffusion_unet_teacher(**UNET)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _reference(teacher_file) -> torch.nn.Module:
    ref = zoo.diffusion_unet_teacher(**UNET)
    ref.load_state_dict(load_file(str(teacher_file)))
    return ref.eval()


def _by_hand_bf16(ref: torch.nn.Module) -> torch.nn.Module:
    """``ref`` cast to bfloat16 by hand, but for the time embedding's sinusoid: its frequencies
    stay float32 and so do the features (computed from the integer timesteps), cast where they
    meet the bf16 MLP, as diffusers' UNet2DModel does (``t_emb.to(dtype=self.dtype)``)."""
    half = copy.deepcopy(ref).to(torch.bfloat16)
    half.time_embed.freqs = ref.time_embed.freqs.clone()
    half.time_embed.mlp.register_forward_pre_hook(lambda m, a: (a[0].to(torch.bfloat16),))
    return half


def _spec(tmp_path, teacher_file, **teacher):
    raw = denoiser_spec(tmp_path / "run", str(teacher_file))
    raw["teacher"].update(teacher)
    return raw


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *SIZE, generator=g), torch.randint(0, 100, (n,), generator=g),
            torch.randint(0, 4, (n,), generator=g))


def _cut_outputs(model: torch.nn.Module, boundaries, run) -> dict[int, object]:
    """The outputs of the modules named by each boundary's cut tensors (forward hooks) while
    ``run()`` runs ``model``: block i's feature, a tensor or the tuple of a multi-tensor cut's."""
    seen, hooks = {}, []
    labels = {m.label for b in boundaries for m in b.cut.members}
    for label in labels:
        hooks.append(model.get_submodule(label).register_forward_hook(
            lambda m, a, o, label=label: seen.__setitem__(label, o.float())))
    out = run()
    for h in hooks:
        h.remove()
    feats = {}
    for i, b in enumerate(boundaries, start=1):
        tensors = tuple(seen[m.label] for m in b.cut.members)
        feats[i] = tensors if b.cut.multi else tensors[0]
    return feats | {len(boundaries) + 1: out.float()}


# -- 1. teacher.dtype: bfloat16 --------------------------------------------------------------------

def test_a_bf16_denoiser_teacher_is_the_teacher_cast_by_hand(tmp_path, teacher_file):
    """Its block features and its prediction equal the float32 teacher cast to bf16 by hand,
    bit for bit; the integer timesteps and classes reach it as integers and its sinusoidal time
    features stay float32 (equal to the float32 teacher's); a StableKD step runs on it."""
    compiled = compile_spec(load_spec(write_spec(_spec(tmp_path, teacher_file, dtype="bfloat16"), tmp_path / "s.yaml")))
    d = Distiller(compiled).train()
    teacher = d.teacher
    x, t, y = _batch()
    t_in, y_in = t.clone(), y.clone()
    seen = {}
    teacher.model.class_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))
    teacher.model.time_embed.mlp[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("sinusoid", a[0]))
    side = teacher.side((t, y))
    assert all(v.dtype == torch.bfloat16 for v in side.values())
    assert seen["y"].dtype == torch.int64 and torch.equal(seen["y"], y_in)  # classes index the embedding
    assert torch.equal(t, t_in) and torch.equal(y, y_in)
    blocks = len(teacher.segments)
    got = teacher.features(x, set(range(1, blocks + 1)), side)

    ref = _reference(teacher_file)
    half = _by_hand_bf16(ref)
    ref_seen = {}
    ref.time_embed.mlp[0].register_forward_pre_hook(lambda m, a: ref_seen.__setitem__("sinusoid", a[0]))
    boundaries = compiled.teacher.boundaries
    assert sum(b.cut.multi for b in boundaries) == 2  # the skips: blocks 2 and 3 end at multi-tensor cuts
    with torch.no_grad():
        want = _cut_outputs(half, boundaries, lambda: half(x.bfloat16(), t, y))
        want32 = ref(x, t, y)
    assert seen["sinusoid"].dtype == torch.float32 and torch.equal(seen["sinusoid"], ref_seen["sinusoid"])
    for i in range(1, blocks + 1):
        assert type(got[i]) is type(want[i]), i
        for g, w in zip(*((v if isinstance(v, tuple) else (v,)) for v in (got[i], want[i]))):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"block {i}")
    # the prediction: the teacher called as evaluation and sampling call it
    pred = teacher(x, t, y)
    torch.testing.assert_close(pred, want[blocks], rtol=0, atol=0)
    # against the float32 teacher: bf16 rounds each op to 8 bits of mantissa (2^-9 relative);
    # through 20-odd layers the prediction moves by a few percent of its range, not more
    err = float((pred - want32).abs().max())
    assert 0 < err < 0.05 * float(want32.abs().max()), err
    # a StableKD step: float32 losses, gradients for the student, none for the teacher
    eps = torch.randn_like(x)
    terms = d(x, eps, side=(t, y))
    assert {"mse1", "mse2", "mse3", "task", "out"} <= set(terms)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


def test_a_bf16_denoiser_teacher_trains_and_reports_its_mse(tmp_path, teacher_file):
    """The whole run (the teacher's denoising MSE is evaluated before training and after it the
    student's): the teacher's MSE in the summary is the by-hand bf16 teacher's on the test split."""
    spec = load_spec(write_spec(_spec(tmp_path, teacher_file, dtype="bfloat16"), tmp_path / "s.yaml"))
    summary = loop.train(spec)
    half = _by_hand_bf16(_reference(teacher_file))
    data = build_data(spec, compile_spec(spec).data, torch.device("cpu"), DistInfo())
    want = denoise_mse(lambda x, *side: half(x.bfloat16(), *side).float(), data.test,
                       DenoiseTask.of(spec.denoise, spec.seed))["mse"]
    assert summary["teacher_mse"] == pytest.approx(want, rel=1e-6)
    assert summary["student_mse"] > 0


# -- 2. teacher.shard: two gloo ranks --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sharded_denoiser_teacher_equals_the_unsharded_one(tmp_path, teacher_file, dtype):
    """On each rank its own batch with its own t and y: side tensors, block features and the
    prediction of the sharded teacher equal the unsharded one's, which is the eager model's
    (float32); each rank holds half of every parameter, the time embedding's included."""
    from test_big_teacher import _torchrun

    res = _torchrun(str(ROOT / "tests" / "_shard_worker.py"), str(tmp_path), dtype, "denoiser", str(teacher_file))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref = _reference(teacher_file)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(ranks[0]["inputs"][1], ranks[1]["inputs"][1])  # the ranks' timesteps differ
    for run in ranks:
        before, after = run["before"], run["after"]
        assert run["world_size"] == 2
        assert before["side"].keys() == after["side"].keys() and before["side"]
        for k, v in before["side"].items():
            torch.testing.assert_close(after["side"][k], v, rtol=0, atol=0)
        for i, feature in before["features"].items():
            for a, b in zip(*((v if isinstance(v, tuple) else (v,)) for v in (after["features"][i], feature))):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)
        torch.testing.assert_close(after["logits_only"][max(before["features"])], before["logits"], rtol=0, atol=0)
        if dtype == "float32":
            x, t, y = run["inputs"]
            with torch.no_grad():
                torch.testing.assert_close(before["logits"], ref(x, t, y), rtol=0, atol=0)
        assert 0.49 < after["bytes"] / before["bytes"] < 0.51
    assert sum(r["after"]["bytes"] for r in ranks) == ranks[0]["before"]["bytes"]


# -- 3. decompose.adapters other than in_path ------------------------------------------------------

# projected, and auto wherever the schema offers it (it resolves to projected for StableKD)
ADAPTER_MODES = [m for m in DecomposeSpec.model_fields["adapters"].annotation.__args__ if m != "in_path"]


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_a_denoiser_pair_of_other_widths_keeps_in_path_adapters_and_says_why(tmp_path, mode):
    """The U-Net's skips make its cuts multi-tensor past the first level: no per-tensor PCA, so
    every block keeps its adapters in the path, and the plan's note says which blocks and why."""
    from typer.testing import CliRunner

    from kdgraph.cli.main import app

    raw = denoiser_spec(tmp_path / "run", "unused")
    raw["teacher"].pop("checkpoint")
    raw["student"] = {"model": "module:kdgraph.zoo:diffusion_unet_half", "kwargs": {**UNET, "widths": [4, 8, 16]}}
    raw["decompose"]["adapters"] = mode
    path = write_spec(raw, tmp_path / "s.yaml")
    c = compile_spec(load_spec(path), materialize=False)
    assert [b.student.multi for b in c.pairing.blocks if b.student] == [False, True, True]
    assert c.pairing.adapters_mode == "in_path" and c.pairing.adapters and c.plan.projection_fit is None
    note = (f"decompose.adapters: {mode}: blocks 2, 3: multi-tensor cuts are not projected (a PCA per tensor is "
            "not implemented); every block keeps its adapters in the path (in_path)")
    assert note in c.notes
    res = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and note in res.output, res.output


def test_a_denoiser_projected_at_a_single_tensor_cut_fits_on_its_noisy_images(tmp_path, teacher_file):
    """An explicit cut in the first level (one tensor) is projected: the projection's PCA is fitted
    on what the teacher sees in training, the noisy images of epoch 0 with their t and y (before,
    the fit ran the teacher without its side inputs and failed). Truth: the mean of the eager
    teacher's enc1.1 output over those batches, drawn by hand."""
    raw = _spec(tmp_path, teacher_file)
    raw["student"] = {"model": "module:kdgraph.zoo:diffusion_unet_half", "kwargs": {**UNET, "widths": [4, 8, 16]}}
    raw["decompose"] = {"blocks": 2, "adapters": "projected", "projection_batches": 2,
                        "cuts": [{"teacher": "enc1.1", "student": "enc1.1"}]}
    spec = load_spec(write_spec(raw, tmp_path / "s.yaml"))
    trainer = loop.Trainer.from_spec(spec)
    assert trainer.plan.projection_fit is not None and trainer.compiled.pairing.adapters_mode == "projected"
    notes = []
    trainer.reporter = SimpleNamespace(note=notes.append)  # what train() would have set up
    trainer.fit_projections()
    assert notes == ["projections fitted: PCA of the teacher at block ends [1], 2 batches"]
    got = trainer.distiller.projections["1"].mean.double()

    ref = _reference(teacher_file)
    task = DenoiseTask.of(spec.denoise, spec.seed)
    data = build_data(spec, trainer.compiled.data, torch.device("cpu"), DistInfo())
    feats = []
    hook = ref.enc1[1].register_forward_hook(lambda m, a, o: feats.append(o))
    with torch.no_grad():
        for (xb, yb, idx), _ in zip(data.train.epoch_indexed(0), range(2)):
            x_t, _, side = task.draw(xb, yb, 0, idx)
            ref(x_t, *side)
    hook.remove()
    want = torch.cat(feats).double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    clean = []  # the check can fail: the clean images give another mean
    hook = ref.enc1[1].register_forward_hook(lambda m, a, o: clean.append(o))
    with torch.no_grad():
        for (xb, yb, idx), _ in zip(data.train.epoch_indexed(0), range(2)):
            ref(xb, *task.draw(xb, yb, 0, idx)[2])
    hook.remove()
    assert (torch.cat(clean).double().mean(dim=(0, 2, 3)) - want).abs().max() > 1e-3


# -- 4. kdgraph eval --checkpoint DIFFUSERS_EXPORT ---------------------------------------------------

def test_eval_of_a_diffusers_export_folder_scores_the_trained_run(tmp_path):
    """`kdgraph eval SPEC --checkpoint FOLDER` reads a diffusers export (config.json and
    diffusion_pytorch_model.safetensors) into the spec's diffusers: student: the same denoising
    MSE as evaluating the run itself and as training reported. A folder of another config, or a
    spec whose student is no diffusers: model, is refused in one line naming why."""
    pytest.importorskip("diffusers")
    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    from kdgraph.runtime.commands import evaluate_spec, export_spec
    from test_diffusers import _spec as diffusers_spec

    raw = diffusers_spec(tmp_path / "d", "supervised")
    raw["data"]["samples"] = 32  # 8 test images
    path = write_spec(raw, tmp_path / "d.yaml")
    spec = load_spec(path)
    summary = loop.train(spec)
    export_spec(spec, tmp_path / "ship")
    run = evaluate_spec(spec)
    shipped = evaluate_spec(spec, tmp_path / "ship")
    assert shipped == run and shipped["samples"] == 8
    assert shipped["student_mse"] == pytest.approx(summary["student_mse"], rel=1e-6)
    res = CliRunner().invoke(app, ["eval", str(path), "--checkpoint", str(tmp_path / "ship"), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["student_mse"] == shipped["student_mse"]

    # another config of the same shapes would load and compute something else: refused
    other = copy.deepcopy(raw)
    other["student"]["kwargs"]["act_fn"] = "mish"
    with pytest.raises(KDGraphError, match=r"does not fit the student of this spec: its config.json differs in "
                                           r"act_fn: 'silu', the spec's 'mish'"):
        evaluate_spec(load_spec(other), tmp_path / "ship")
    # a zoo denoiser's spec: said in one line
    zoo_spec = denoiser_spec(tmp_path / "z", "unused")
    zoo_spec["teacher"].pop("checkpoint")
    res = CliRunner().invoke(app, ["eval", str(write_spec(zoo_spec, tmp_path / "z.yaml")),
                                   "--checkpoint", str(tmp_path / "ship")], env={"COLUMNS": "400"})
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a diffusers export" in lines[0] and "diffusers: student" in lines[0], res.output
    # a folder that is no export names both layouts
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDGraphError, match="not a kdgraph export .nor a diffusers export: config.json and "
                                           "diffusion_pytorch_model.safetensors"):
        evaluate_spec(spec, tmp_path / "empty")


@pytest.mark.slow
def test_sharded_denoiser_training_with_a_judge_equals_unsharded_training(tmp_path, teacher_file):
    """The real loop (`torchrun -m kdgraph train`, two gloo ranks): StableKD of a denoiser with
    the teacher sharded or whole on each rank gives the same student, the same teacher MSE and,
    where a judge samples the teacher at the end, the same Fréchet distances (the main rank's
    judge samples a sharded teacher, and every rank must run those samples with it)."""
    from test_big_teacher import _torchrun

    judge = {
        "name": "judge", "seed": 0,
        "student": {"model": "module:kdgraph.zoo:resnet_tiny", "kwargs": {"num_classes": 4, "in_chans": 1}},
        "data": {"dataset": "synthetic", "input_size": list(SIZE), "num_classes": 4, "samples": 16, "batch_size": 8},
        "decompose": {"blocks": 1}, "schedule": {"epochs": 1},
        "runtime": {"device": "cpu", "num_threads": 1}, "output": str(tmp_path / "judge"),
    }
    loop.train(load_spec(write_spec(judge, tmp_path / "judge.yaml")))
    students, summaries = {}, {}
    for shard in (False, True):
        raw = _spec(tmp_path / f"shard-{shard}", teacher_file, shard=shard)
        raw["denoise"] |= {"sample_steps": 2, "sample_images": 0, "judge": str(tmp_path / "judge"), "judge_samples": 4}
        raw["runtime"] |= {"bn_recalibrate": False}
        res = _torchrun("-m", "kdgraph", "train", str(write_spec(raw, tmp_path / f"spec-{shard}.yaml")))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert ("sharded over 2 ranks (FSDP2)" in res.stdout + res.stderr) == shard
        out = tmp_path / f"shard-{shard}" / "run"
        students[shard] = load_file(str(out / "student.safetensors"))
        summaries[shard] = json.loads((out / "summary.json").read_text())
    assert students[True].keys() == students[False].keys()
    for k, v in students[False].items():
        torch.testing.assert_close(students[True][k], v, rtol=1e-5, atol=1e-6)
    for key in ("teacher_mse", "student_mse", "teacher_fd", "student_fd"):
        assert summaries[True][key] == pytest.approx(summaries[False][key], rel=1e-4), key
