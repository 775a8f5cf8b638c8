"""Denoisers: side inputs in the trace, their cuts and blocks, the DDPM task, BK-SDM's losses
and a StableKD run that resumes exactly.

Independent truth: the zoo's DiffusionUNet's own eager forward (the blocks composed must give
it bit for bit); the live set after each cut recomputed from the fx graph's users by brute
force; the skips listed by hand from its forward; a student that is the teacher (every
feature and output loss exactly 0); DDPM's and DDIM's formulas written out (an oracle noise
predictor of a one-image data set brings DDIM back to that image, and so does an oracle
velocity predictor); v-prediction's target and its conversion back to (x̂₀, ε̂) written out
(Salimans & Ho 2022); the losses written out with sums; and an uninterrupted run against an
interrupted and resumed one.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _runtime_helpers import write_spec
from kdgraph.compiler import compile_spec
from kdgraph.compiler.boundaries import choose_boundaries
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.split import split_segments, split_side
from kdgraph.compiler.stages import find_stages
from kdgraph.compiler.trace import trace
from kdgraph.tasks.denoise.diffusion import DenoiseTask, NoiseSchedule, ddim_sample, gaussians, pixel_range, save_grid, x0_and_eps
from kdgraph.ir import SideInput
from kdgraph.losses import LOSSES, create_loss
from kdgraph.runtime import loop
from kdgraph.runtime.chain import StudentChain
from kdgraph.runtime.distiller import Distiller
from kdgraph.spec import load_spec
from kdgraph.zoo import (diffusion_unet, diffusion_unet_manyskip, diffusion_unet_small,
                         diffusion_unet_teacher)

SIDE = (SideInput("t", "timestep", 1000), SideInput("y", "class", 10))
SIZE = (1, 16, 16)
WIDTHS = (8, 16, 32)

# By hand, from DiffusionUNet.forward: the feature maps live after each level's last block
# (fx names a residual block's output after its final add: the module label is the block).
SKIPS = {
    "enc1.1": ("enc1.1",),  # the first level's output alone
    "enc2.1": ("enc1.1", "enc2.1"),  # enc1 waits for dec1
    "mid.1": ("enc1.1", "enc2.1", "mid.1"),
    "dec2.1": ("enc1.1", "dec2.1"),  # enc2 has been used
}


def _traced(model, side=SIDE):
    return trace(model.eval(), SIZE, "student", side=side)


def _bounds(traced, blocks):
    found = choose_boundaries(find_stages(find_cuts(traced), traced), blocks, traced)
    return [b.cut.nodes if b.cut.multi else b.cut.node for b in found]


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SIZE, generator=g), torch.randint(0, 1000, (n,), generator=g), \
        torch.randint(0, 10, (n,), generator=g)


def test_side_inputs_are_graph_inputs_and_stay_out_of_cuts():
    traced = _traced(diffusion_unet_teacher(widths=WIDTHS, num_classes=10))
    placeholders = [n.name for n in traced.gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "t", "y"]
    info = traced.nodes
    # the time MLP and the class embedding depend on t and y alone: side values, not the image's
    for name in ("time_embed_mlp_2", "class_embed"):
        assert info[name].side_dependent and not info[name].input_dependent
    side = {n for n, i in info.items() if i.side_dependent}
    cuts = find_cuts(traced)
    assert cuts and all(not set(c.nodes) & side for c in cuts)
    labels = {c.label: tuple(m.label for m in c.members) for c in cuts}
    for end, tensors in SKIPS.items():
        assert labels[end] == tensors


def _brute_live(traced, cut):
    """(every value defined up to ``cut`` and read after it, those of the side inputs alone)."""
    nodes = list(traced.gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    info = traced.nodes
    live = {n.name for n in nodes[:cut.index + 1]
            if any(index[u] > cut.index for u in n.users)
            and (info[n.name].input_dependent or info[n.name].side_dependent)}
    return live, {n for n in live if info[n].side_dependent}


def test_cuts_are_the_live_sets_less_the_side_values():
    """Brute force: after each cut's node, the values defined so far and read later. Without
    side inputs no level's end would be a cut (the time embedding is live across them)."""
    traced = _traced(diffusion_unet_teacher(widths=WIDTHS, num_classes=10))
    for cut in find_cuts(traced):
        live, side_live = _brute_live(traced, cut)
        assert set(cut.nodes) == live - side_live, cut.description
        if cut.label in SKIPS:  # at every level's end the time embedding still has blocks to reach
            assert side_live, f"nothing of the time embedding is live after {cut.description}"


@pytest.mark.parametrize("class_conditional", [True, False])
def test_blocks_recompose_the_eager_forward(class_conditional):
    torch.manual_seed(0)
    model = diffusion_unet_teacher(widths=WIDTHS, num_classes=10 if class_conditional else None).eval()
    side = SIDE if class_conditional else SIDE[:1]
    traced = _traced(model, side)
    x, t, y = _batch()
    inputs = (t, y) if class_conditional else (t,)
    expected = model(x, *inputs)
    for blocks in range(1, 6):
        segments = split_segments(traced, _bounds(traced, blocks))
        chain = StudentChain(segments, split_side(traced, segments))
        values = chain.side(inputs)
        h = x
        for i in range(1, blocks + 1):
            h = chain.block(i, h, values)
        assert torch.equal(h, expected), blocks
    # each block takes (cut tensors, its side tensors): the 4-block split, read from the graphs
    segments = split_segments(traced, _bounds(traced, 4))
    args = [[n.name for n in s.graph.nodes if n.op == "placeholder"] for s in segments]
    assert [len([a for a in names if a.startswith("cut_")]) for names in args] == [0, 1, 2, 3]
    assert [len(s.side_inputs) for s in segments] == [2, 2, 2, 4]  # one time projection per residual block
    assert all(names[-len(s.side_inputs):] == [f"side_{n}" for n in s.side_inputs] for names, s in zip(args, segments))


def _spec(tmp_path, method="stablekd", teacher_ckpt=None, student="diffusion_unet_small", epochs=2, **extra):
    spec = {
        "name": "tiny-ddpm", "seed": 0,
        "student": {"model": f"module:kdgraph.zoo:{student}", "kwargs": {"in_chans": 1, "num_classes": 4,
                                                                       "widths": list(WIDTHS)}},
        "data": {"dataset": "synthetic", "input_size": list(SIZE), "num_classes": 4, "samples": 48,
                 "batch_size": 8, "augment": "none"},
        "denoise": {"timesteps": 100, "class_conditional": True, "sample_steps": 3, "sample_images": 4},
        "decompose": {"blocks": 4 if method != "supervised" else 1},
        "schedule": {"method": method, "epochs": epochs, **({"recompositions": 1} if method == "stablekd" else {})},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "runtime": {"device": "cpu", "log_every": 1, "num_threads": 1, "checkpoint_every": 2},
        "output": str(tmp_path / "run"),
        **extra,
    }
    if method != "supervised":
        spec["teacher"] = {"model": "module:kdgraph.zoo:diffusion_unet_teacher",
                           "kwargs": {"in_chans": 1, "num_classes": 4, "widths": list(WIDTHS)}}
        if teacher_ckpt is not None:
            spec["teacher"]["checkpoint"] = str(teacher_ckpt)
    return spec


def _manyskip(spec, student="diffusion_unet_manyskip_half"):
    """``spec`` with the many-skip U-Nets (a skip per encoder block) as teacher and ``student``."""
    kw = {"in_chans": 1, "num_classes": 4}
    spec["student"] = {**spec["student"], "model": f"module:kdgraph.zoo:{student}", "kwargs": kw}
    if "teacher" in spec:
        spec["teacher"] = {**spec["teacher"], "model": "module:kdgraph.zoo:diffusion_unet_manyskip", "kwargs": kw}
    return spec


def test_plan_shows_side_inputs_apart_from_cuts(tmp_path):
    compiled = compile_spec(load_spec(write_spec(_spec(tmp_path), tmp_path / "s.yaml")), materialize=False)
    d = json.loads(json.dumps(compiled.to_dict()))
    for role in ("teacher", "student"):
        assert d[role]["side_inputs"] == [{"name": "t", "kind": "timestep", "high": 100},
                                          {"name": "y", "kind": "class", "high": 4}]
        assert len(d[role]["side_tensors"]) == 4
    assert [[t["module"] for t in b] for b in d["student"]["side_tensors"]] == \
        [["enc1.0"], ["enc2.0"], ["mid.0"], ["dec2.0", "dec1.0"]]
    assert d["graph"]["nodes"][[n["id"] for n in d["graph"]["nodes"]].index("head_loss")]["entry"] == "denoise"
    cut_nodes = {m["node"] for c in d["student"]["cuts"] for m in c.get("tensors", [c])}
    assert not cut_nodes & {t["node"] for b in d["student"]["side_tensors"] for t in b}


def test_a_student_that_is_the_teacher_has_zero_distillation_loss(tmp_path):
    """StableKD's decomposition on a denoiser: each student block is fed the teacher's
    features and its own side tensors; with the teacher's own weights every feature loss and
    the output loss vanish, and the task loss is the teacher's."""
    spec = load_spec(write_spec(_spec(tmp_path, student="diffusion_unet_teacher"), tmp_path / "s.yaml"))
    teacher = diffusion_unet_teacher(in_chans=1, num_classes=4, widths=WIDTHS)
    student = diffusion_unet_teacher(in_chans=1, num_classes=4, widths=WIDTHS)
    student.load_state_dict(teacher.state_dict())
    distiller = Distiller(compile_spec(spec, models=(teacher, student))).eval()
    x, t, y = _batch(4)
    y = y % 4
    eps = torch.randn_like(x)
    terms = distiller(x, eps, side=(t, y))
    assert set(terms) == {"mse1", "mse2", "mse3", "task", "out"}
    for name in ("mse1", "mse2", "mse3", "out"):
        assert terms[name].item() == 0.0, name
    with torch.no_grad():
        assert torch.allclose(terms["task"], ((teacher.eval()(x, t, y) - eps) ** 2).mean(), atol=1e-6)


def test_denoise_loss_entry_against_its_formula():
    g = torch.Generator().manual_seed(1)
    s, e, te = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    loss = create_loss("denoise", {"task_weight": 0.5, "output_weight": 2.0})
    out = loss(s, e, te)
    n = s.numel()
    assert math.isclose(out["task"].item(), 0.5 * sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), e.flatten().tolist())) / n, rel_tol=1e-6)
    assert math.isclose(out["out"].item(), 2.0 * sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), te.flatten().tolist())) / n, rel_tol=1e-6)
    alone = create_loss("ddpm", {"task_weight": 0.5})(s, e)  # no teacher: DDPM's task term alone
    assert torch.equal(alone, out["task"])
    assert LOSSES.get("denoise").role == LOSSES.get("ddpm").role == "head"


def test_noise_schedules_written_out():
    lin = NoiseSchedule.create("linear", 10, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 9 for i in range(10)]
    assert np.allclose(lin.alphas_cumprod, np.cumprod([1 - b for b in betas]), rtol=1e-12)
    cos = NoiseSchedule.create("cosine", 10)
    f = lambda t: math.cos((t / 10 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert np.allclose(cos.alphas_cumprod[:9], [f(t + 1) / f(0) for t in range(9)], rtol=1e-9)
    # the last step would reach ᾱ = 0 (f(T) = cos(π/2)²): its β is clipped at 0.999
    assert math.isclose(cos.alphas_cumprod[9], cos.alphas_cumprod[8] * (1 - 0.999), rel_tol=1e-9)


def test_draws_depend_on_the_sample_alone():
    task = DenoiseTask(NoiseSchedule.create("linear", 1000), seed=3)
    t_all, e_all = task.draws(2, [5, 9, 2, 7], (1, 4, 4))
    t_one, e_one = task.draws(2, [2], (1, 4, 4))
    assert t_one[0] == t_all[2] and torch.equal(e_one[0], e_all[2])  # any batch, any position
    t_next, e_next = task.draws(3, [2], (1, 4, 4))
    assert not torch.equal(e_next[0], e_one[0])  # a new epoch, new noise
    t_ev, e_ev = task.draws(2, [2], (1, 4, 4), evaluation=True)
    assert torch.equal(e_ev, task.draws(7, [2], (1, 4, 4), evaluation=True)[1])  # evaluation: fixed
    assert not torch.equal(e_ev, e_one)
    t_many, e_many = task.draws(0, np.arange(4000), (1, 4, 4))
    assert 0 <= int(t_many.min()) and int(t_many.max()) < 1000
    assert abs(float(e_many.mean())) < 0.01 and abs(float(e_many.std()) - 1.0) < 0.01
    z = gaussians(np.arange(1, 20001, dtype=np.uint64), 1)
    assert abs(float((np.abs(z) < 1).mean()) - 0.6827) < 0.01  # a normal's mass within one sigma


def test_draw_is_ddpm_forward_process():
    task = DenoiseTask(NoiseSchedule.create("cosine", 50), seed=0, class_conditional=True)
    x0, y = torch.randn(3, 1, 4, 4), torch.tensor([1, 2, 3])
    x_t, eps, (t, y_side) = task.draw(x0, y, 1, [10, 11, 12])
    ab = torch.tensor([task.schedule.alphas_cumprod[i] for i in t.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    assert torch.equal(y_side, y)


def test_ddim_with_an_oracle_returns_the_one_image(tmp_path):
    """A data set of one image x*: the best noise predictor is (x_t - sqrt(ᾱ_t) x*) / sqrt(1 - ᾱ_t),
    and DDIM (η = 0) then lands on x* whatever its start noise."""
    schedule = NoiseSchedule.create("linear", 200)
    target = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def oracle(x, t):
        ab = torch.tensor([schedule.alphas_cumprod[i] for i in t.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    out = ddim_sample(oracle, schedule, (1, 4, 4), 3, steps=10, seed=0)
    assert torch.allclose(out, target.expand(3, -1, -1, -1), atol=1e-4)
    assert torch.equal(out, ddim_sample(oracle, schedule, (1, 4, 4), 3, steps=10, seed=0))
    low, high = pixel_range([0.5], [0.25])  # pixels 0..1 normalised: -2..2
    assert low.item() == -2.0 and high.item() == 2.0
    clipped = ddim_sample(oracle, schedule, (1, 4, 4), 3, steps=10, seed=0, clip=(low / 2, high / 2))
    assert torch.allclose(clipped, target.expand(3, -1, -1, -1), atol=1e-4)  # x* lies inside [-1, 1]
    path = save_grid(out, [0.5], [0.5], tmp_path / "grid.png")
    from PIL import Image
    assert Image.open(path).size == (2 + 2 * 6, 2 + 2 * 6)


# -- v-prediction (Salimans & Ho 2022): v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x₀ --------------------------

def test_v_target_is_the_velocity_of_the_drawn_pair():
    """The v task's target at the draws of (t, ε) the ε task makes for the same samples: both
    written out from ᾱ_t of the schedule's table."""
    v_task = DenoiseTask(NoiseSchedule.create("cosine", 50), seed=4, class_conditional=True, prediction="v")
    eps_task = DenoiseTask(NoiseSchedule.create("cosine", 50), seed=4, class_conditional=True)
    x0, y, idx = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.arange(5), [3, 8, 1, 40, 7]
    x_t, v, (t, _) = v_task.draw(x0, y, 2, idx)
    t_drawn, eps = eps_task.draws(2, idx, (1, 4, 4))
    assert torch.equal(t, t_drawn)
    assert torch.equal(eps_task.draw(x0, y, 2, idx)[1], eps)  # ε-prediction's target: the noise itself
    ab = torch.tensor([v_task.schedule.alphas_cumprod[i] for i in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    x0d, epsd = x0.double(), eps.double()
    assert torch.allclose(x_t.double(), ab.sqrt() * x0d + (1 - ab).sqrt() * epsd, atol=1e-6)  # the same x_t
    assert torch.allclose(v.double(), ab.sqrt() * epsd - (1 - ab).sqrt() * x0d, atol=1e-6)
    with pytest.raises(ValueError, match="epsilon, v"):
        DenoiseTask(NoiseSchedule.create("linear", 10), seed=0, prediction="x0")


@pytest.mark.parametrize("alpha_bar", [0.9999, 0.5, 0.01, 4e-5])
def test_x0_and_eps_from_v_reconstruct_the_pair(alpha_bar):
    """From v and x_t, x̂₀ and ε̂ are the x₀ and ε that made them, and sqrt(ᾱ) x̂₀ + sqrt(1-ᾱ) ε̂
    is x_t again; ε-prediction's conversion likewise (float64, written out)."""
    g = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    x_t, v = a * x0 + s * eps, a * eps - s * x0
    x0_hat, eps_hat = x0_and_eps(v, x_t, alpha_bar, "v")
    assert torch.allclose(x0_hat, x0, atol=1e-12) and torch.allclose(eps_hat, eps, atol=1e-12)
    assert torch.allclose(a * x0_hat + s * eps_hat, x_t, atol=1e-12)
    as_tensor = x0_and_eps(v.float(), x_t.float(), torch.tensor(alpha_bar), "v")  # ᾱ as a tensor, float32
    assert torch.allclose(as_tensor[0].double(), x0, atol=1e-5)
    assert torch.allclose(as_tensor[1].double(), eps, atol=1e-5)
    x0_e, eps_e = x0_and_eps(eps, x_t, alpha_bar)  # ε-prediction: ε̂ is the prediction
    assert torch.equal(eps_e, eps) and torch.allclose(a * x0_e + s * eps_e, x_t, atol=1e-12)


def test_ddim_with_an_oracle_velocity_returns_the_one_image():
    """A data set of one image x*: the oracle's ε is (x_t - sqrt(ᾱ) x*) / sqrt(1-ᾱ) and its v
    is sqrt(ᾱ) ε - sqrt(1-ᾱ) x* (written out); DDIM told it predicts v lands on x*."""
    schedule = NoiseSchedule.create("linear", 200)
    target = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def oracle_v(x, t):
        ab = torch.tensor([schedule.alphas_cumprod[i] for i in t.tolist()], dtype=torch.float32).view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * target

    out = ddim_sample(oracle_v, schedule, (1, 4, 4), 3, steps=10, seed=0, prediction="v")
    assert torch.allclose(out, target.expand(3, -1, -1, -1), atol=1e-4)
    assert torch.equal(out, ddim_sample(oracle_v, schedule, (1, 4, 4), 3, steps=10, seed=0, prediction="v"))
    low, high = pixel_range([0.5], [0.5])  # -1..1: x* lies inside
    clipped = ddim_sample(oracle_v, schedule, (1, 4, 4), 3, steps=10, seed=0, clip=(low, high), prediction="v")
    assert torch.allclose(clipped, target.expand(3, -1, -1, -1), atol=1e-4)


def test_denoise_prediction_field_and_its_allowed_values(tmp_path):
    from kdgraph.errors import SpecError

    spec = _spec(tmp_path)
    assert load_spec(spec).denoise.prediction == "epsilon"  # the default: DDPM's
    v = load_spec({**spec, "denoise": {**spec["denoise"], "prediction": "v"}})
    assert DenoiseTask.of(v.denoise, v.seed).prediction == "v"
    with pytest.raises(SpecError) as info:
        load_spec({**spec, "denoise": {**spec["denoise"], "prediction": "v_prediction"}})
    assert info.value.path == "denoise.prediction"
    assert "allowed: epsilon, v" in info.value.message and "'v_prediction'" in info.value.message


class _Stop(Exception):
    pass


def _v_prediction(spec, **_):
    spec["denoise"] = {**spec["denoise"], "prediction": "v"}
    return spec


@pytest.mark.parametrize("pair", ["zoo", "manyskip", "v"])
def test_stablekd_denoiser_trains_and_resumes_exactly(tmp_path, monkeypatch, pair):
    """The zoo pair, the many-skip pair whose block ends carry 4, 6 and 7 tensors, and the zoo
    pair predicting v (teacher and student: the one spec field)."""
    many = {"manyskip": _manyskip, "v": _v_prediction}.get(pair, lambda spec, **_: spec)
    # the teacher: a short supervised denoising run
    t_spec = load_spec(write_spec(many(_spec(tmp_path / "t", method="supervised", student="diffusion_unet_teacher",
                                             epochs=1), student="diffusion_unet_manyskip"), tmp_path / "t.yaml"))
    summary = loop.train(t_spec)
    assert summary["student_mse"] > 0 and summary["student_top1"] is None
    ckpt = tmp_path / "t" / "run" / "student.safetensors"
    a = load_spec(write_spec(many(_spec(tmp_path / "a", teacher_ckpt=ckpt)), tmp_path / "a.yaml"))
    b = load_spec(write_spec(many(_spec(tmp_path / "b", teacher_ckpt=ckpt)), tmp_path / "b.yaml"))
    loop.train(a)
    original = loop.Trainer.checkpoint_if_due

    def stop_after_step_5(self, epoch, step, terms, loss):
        original(self, epoch, step, terms, loss)
        if self.global_step == 5:  # mid-epoch (6 steps an epoch), after a checkpoint at step 4
            raise _Stop

    monkeypatch.setattr(loop.Trainer, "checkpoint_if_due", stop_after_step_5)
    with pytest.raises(_Stop):
        loop.train(b)
    monkeypatch.setattr(loop.Trainer, "checkpoint_if_due", original)
    loop.train(b, resume=True)
    ra, rb = tmp_path / "a" / "run", tmp_path / "b" / "run"
    ta, tb = load_file(str(ra / "student.safetensors")), load_file(str(rb / "student.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    def steps(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["global_step"]: {k: r[k] for k in ("mse1", "mse2", "mse3", "task", "out", "loss") if k in r}
                for r in recs if r["kind"] == "step"}
    assert steps(ra) == steps(rb) and len(steps(ra)) == 12
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ra, rb))
    assert sa["student_mse"] == sb["student_mse"] and sa["teacher_mse"] == sb["teacher_mse"]
    assert (ra / "samples.png").read_bytes() == (rb / "samples.png").read_bytes()
    # `kdgraph eval` scores the exported student at the same fixed draws as training's evaluation
    from kdgraph.runtime.commands import evaluate_spec
    scored = evaluate_spec(a)
    assert scored["student_mse"] == pytest.approx(sa["student_mse"], rel=1e-5)
    assert scored["teacher_mse"] == pytest.approx(sa["teacher_mse"], rel=1e-5)
    if pair == "v":  # the same weights scored against ε instead of v: the field reaches evaluation
        as_eps = evaluate_spec(a.model_copy(update={"denoise": a.denoise.model_copy(update={"prediction": "epsilon"})}))
        assert as_eps["student_mse"] != pytest.approx(scored["student_mse"], rel=1e-3)


# -- judging samples: a Fréchet distance in a kdgraph classifier's feature space ------------------

def test_a_judged_run_reports_fd_and_class_accuracy(tmp_path):
    classifier = {
        "name": "judge", "seed": 0,
        "student": {"model": "module:kdgraph.zoo:resnet_tiny", "kwargs": {"num_classes": 4, "in_chans": 1}},
        "data": {"dataset": "synthetic", "input_size": list(SIZE), "num_classes": 4, "samples": 48, "batch_size": 8},
        "decompose": {"blocks": 1}, "schedule": {"epochs": 1},
        "runtime": {"device": "cpu", "num_threads": 1}, "output": str(tmp_path / "judge"),
    }
    loop.train(load_spec(write_spec(classifier, tmp_path / "judge.yaml")))
    spec = _spec(tmp_path / "d", method="supervised", student="diffusion_unet_teacher", epochs=1)
    spec["denoise"] |= {"judge": str(tmp_path / "judge"), "judge_samples": 12}
    summary = loop.train(load_spec(write_spec(spec, tmp_path / "d.yaml")))
    assert summary["judge"] == "judge" and summary["student_fd"] > 0
    assert 0.0 <= summary["student_class_accuracy"] <= 100.0
    assert "teacher_fd" not in summary  # no teacher
    assert json.loads((tmp_path / "d" / "run" / "summary.json").read_text())["student_fd"] == summary["student_fd"]


def test_a_blocks_removed_student_starts_from_the_teacher(tmp_path):
    from kdgraph.compiler.build import init_from_teacher
    from kdgraph.errors import SpecError
    from kdgraph.zoo import diffusion_unet_half

    torch.manual_seed(0)
    teacher, small = diffusion_unet_teacher(num_classes=4), diffusion_unet_small(num_classes=4)
    note = init_from_teacher(teacher, small)
    t = teacher.state_dict()
    assert all(torch.equal(v, t[k]) for k, v in small.state_dict().items())  # every tensor has its twin
    assert "enc1.0.conv1" in note and "enc1.1" not in note  # the removed blocks have none
    half = diffusion_unet_half(num_classes=4)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    note = init_from_teacher(teacher, half)  # other widths: only conv_out's bias (one output channel) fits
    after = half.state_dict()
    assert torch.equal(after["conv_out.bias"], t["conv_out.bias"])
    assert all(torch.equal(v, before[k]) for k, v in after.items() if k != "conv_out.bias")
    assert note.startswith(f"student.from_teacher: 1 of {len(after)} tensors copied")
    spec = _spec(tmp_path)
    spec["student"]["from_teacher"] = True
    compiled = compile_spec(load_spec(write_spec(spec, tmp_path / "s.yaml")))
    assert any(n.startswith("student.from_teacher: ") for n in compiled.notes)
    ts, ss = compiled.teacher.model.state_dict(), compiled.student.model.state_dict()
    assert all(torch.equal(v, ts[k]) for k, v in ss.items())
    spec["teacher"]["from_teacher"] = True
    with pytest.raises(SpecError, match="teacher.from_teacher"):
        load_spec(spec)


def test_side_inputs_are_split_with_the_batch_into_micro_batches(tmp_path):
    """GroupNorm normalises each sample alone: two micro-batches of a denoiser's batch (each with
    its share of t and y) give the loss and the gradient of the whole batch."""
    losses = {}
    for micro in (1, 2):
        spec = _spec(tmp_path / str(micro), method="supervised", student="diffusion_unet_teacher", epochs=1)
        spec["runtime"] |= {"micro_batches": micro}
        spec["denoise"] |= {"sample_images": 0}
        loop.train(load_spec(write_spec(spec, tmp_path / f"{micro}.yaml")))
        recs = [json.loads(line) for line in (tmp_path / str(micro) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[micro] = [r["task"] for r in recs if r["kind"] == "step"]
        assert not (tmp_path / str(micro) / "run" / "samples.png").exists()  # sample_images: 0
    assert losses[1][0] == pytest.approx(losses[2][0], rel=1e-5)
    assert losses[1] == pytest.approx(losses[2], rel=1e-3)


def test_export_of_a_zoo_denoiser_says_what_export_ships(tmp_path):
    """Only diffusers: denoisers have a layout to ship (tests/test_diffusers.py); the zoo's
    U-Net is told where its trained state_dict is."""
    from kdgraph.errors import KDGraphError
    from kdgraph.runtime.commands import export_spec

    with pytest.raises(KDGraphError, match="diffusers: denoiser.*student.safetensors"):
        export_spec(load_spec(write_spec(_spec(tmp_path), tmp_path / "s.yaml")), tmp_path / "ship")
    assert not (tmp_path / "ship").exists()


def test_a_denoiser_refuses_mixup_and_a_teacher_cache(tmp_path):
    from kdgraph.errors import SpecError

    spec = _spec(tmp_path)
    with pytest.raises(SpecError, match="data.mixup"):
        load_spec({**spec, "data": {**spec["data"], "mixup": {"mixup_alpha": 0.8}}})
    with pytest.raises(SpecError, match="teacher.cache"):
        load_spec({**spec, "teacher": {**spec["teacher"], "cache": str(tmp_path / "cache")}})


# -- many-skip cuts: diffusers' skip layout, a skip per encoder block ------------------------------

# By hand, from DiffusionUNet.forward with skips="block": every encoder block's output waits for
# its decoder block, so each level's end carries the skips of every level so far.
MANY_SKIPS = {
    "enc1.1": ("enc1.0", "enc1.1"),
    "enc2.1": ("enc1.0", "enc1.1", "enc2.0", "enc2.1"),
    "enc3.1": ("enc1.0", "enc1.1", "enc2.0", "enc2.1", "enc3.0", "enc3.1"),
    "mid.1": ("enc1.0", "enc1.1", "enc2.0", "enc2.1", "enc3.0", "enc3.1", "mid.1"),
}


def test_many_skip_cuts_are_the_live_sets():
    """More than four tensors live at a cut (7 at the middle): still found, still exactly the live set."""
    traced = _traced(diffusion_unet_manyskip(num_classes=10))
    cuts = find_cuts(traced)
    assert max(len(c.members) for c in cuts) > 4
    for cut in cuts:
        live, side_live = _brute_live(traced, cut)
        assert set(cut.nodes) == live - side_live, cut.description
    bounds = choose_boundaries(find_stages(cuts, traced), 5, traced)
    assert {b.cut.label: tuple(m.label for m in b.cut.members) for b in bounds} == MANY_SKIPS


def test_many_skip_blocks_recompose_the_eager_forward():
    torch.manual_seed(0)
    model = diffusion_unet_manyskip(num_classes=10).eval()
    traced = _traced(model)
    x, t, y = _batch()
    expected = model(x, t, y)
    for blocks in range(1, 7):
        segments = split_segments(traced, _bounds(traced, blocks))
        chain = StudentChain(segments, split_side(traced, segments))
        values = chain.side((t, y))
        h = x
        for i in range(1, blocks + 1):
            h = chain.block(i, h, values)
        assert torch.equal(h, expected), blocks


def test_more_skips_than_a_diffusers_default_unet_keeps():
    """Five levels of four blocks: 20 skips, 21 tensors at the middle's end (diffusers' default
    UNet2DModel keeps 12 skips, its six-level DDPM configs 18): cut, live sets exact, and the
    seven blocks recompose the eager forward."""
    torch.manual_seed(0)
    model = diffusion_unet(widths=(4, 4, 4, 4, 4, 8), depth=4, skips="block").eval()
    traced = trace(model, (1, 64, 64), "student", side=SIDE[:1])
    bounds = choose_boundaries(find_stages(find_cuts(traced), traced), 7, traced)
    assert [len(b.cut.members) for b in bounds] == [4, 8, 12, 16, 20, 21]
    for b in bounds:
        live, side_live = _brute_live(traced, b.cut)
        assert set(b.cut.nodes) == live - side_live, b.cut.description
    segments = split_segments(traced, [b.cut.nodes for b in bounds])
    chain = StudentChain(segments, split_side(traced, segments))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([3, 700])
    values, h = chain.side((t,)), x
    for i in range(1, 8):
        h = chain.block(i, h, values)
    assert torch.equal(h, model(x, t))


def test_many_skip_stablekd_step_has_a_feature_loss_per_tensor(tmp_path):
    """Teacher and half-width student cut with as many tensors at each block end, shapes paired by
    position; each block's feature loss is the mean over its tensors (0 for a student that is
    the teacher), and one step's gradient reaches every per-tensor adapter."""
    kw = {"in_chans": 1, "num_classes": 4}
    spec = _manyskip(_spec(tmp_path, decompose={"blocks": 5}))
    compiled = compile_spec(load_spec(write_spec(spec, tmp_path / "s.yaml")))
    blocks = compiled.to_dict()["blocks"]
    assert [len(b.get("student_tensors", [b["student"]])) for b in blocks[:4]] == [2, 4, 6, 7]
    assert [t["lift"] for t in blocks[3]["adapter"]["tensors"]] == \
        [[4, 8], [4, 8], [8, 16], [8, 16], [16, 32], [16, 32], [32, 64]]
    distiller = Distiller(compiled).train()
    x, t, y = _batch(4)
    terms = distiller(x, torch.randn_like(x), side=(t, y % 4))
    assert set(terms) == {"mse1", "mse2", "mse3", "mse4", "task", "out"}
    sum(terms.values()).backward()
    for i, adapter in distiller.adapters.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in adapter.parameters() if p.requires_grad), i
    spec["student"]["model"] = spec["teacher"]["model"]
    teacher, student = diffusion_unet_manyskip(**kw), diffusion_unet_manyskip(**kw)
    student.load_state_dict(teacher.state_dict())
    same = Distiller(compile_spec(load_spec(write_spec(spec, tmp_path / "same.yaml")),
                                  models=(teacher, student))).eval()
    terms = same(x, torch.randn_like(x), side=(t, y % 4))
    assert all(terms[f"mse{i}"].item() == 0.0 for i in range(1, 5))


@pytest.mark.parametrize("pair, width", [("zoo", 80), ("manyskip", 120)])
def test_plan_text_summarises_many_cuts_and_json_keeps_them(tmp_path, pair, width):
    """The text plan of a U-Net pair lists the block ends (each named, with its tensor count and
    shapes) and counts the other stages: its cut and block tables fit in 40 lines (the zoo pair's
    99 teacher cuts in an 80-column terminal, the many-skip pair's 7-tensor cuts in 120);
    `--format json` keeps every cut and every tensor."""
    from typer.testing import CliRunner

    from kdgraph.cli.main import app
    spec = _spec(tmp_path)
    if pair == "manyskip":
        spec = _manyskip(_spec(tmp_path, decompose={"blocks": 5}))
    path = write_spec(spec, tmp_path / "s.yaml")
    compiled = compile_spec(load_spec(path), materialize=False)
    res = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": str(width)})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("teacher block ends"))
    end = next(i for i, line in enumerate(lines) if line.startswith("side inputs"))
    cut_tables = "\n".join(lines[start:end])
    assert end - start <= 40, cut_tables
    assert max(len(line) for line in lines) <= width
    for art in (compiled.teacher, compiled.student):
        assert f"{len(art.cuts)} cuts in {len(art.stages)} stages" in cut_tables
        for b in art.boundaries:
            assert f"│ {b.cut.label} " in cut_tables, b.cut.label  # in both tables
            if b.cut.multi:
                assert f"{len(b.cut.tensors)} tensors: " in cut_tables
    data = json.loads(CliRunner().invoke(app, ["plan", str(path), "--format", "json"]).stdout)
    for role, art in (("teacher", compiled.teacher), ("student", compiled.student)):
        assert [c["node"] for c in data[role]["cuts"]] == [c.node for c in art.cuts]
        assert [len(c.get("tensors", [c])) for c in data[role]["cuts"]] == [len(c.members) for c in art.cuts]
    if pair == "manyskip":  # on one line each where the terminal is wide
        wide = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "400"}).output
        row = next(line for line in wide.splitlines() if "│ mid.1 (+ enc1.0, …, enc3.0, enc3.1) " in line)
        assert "│ 7 tensors: 8×16² (2), 16×8² (2), 32×4² (2), 64×2² " in row
        assert "│ 7 / 7 tensors (shapes above) " in wide
        assert "conv1x1 per tensor: 4→8→4 (2), 8→16→8 (2), 16→32→16 (2), 32→64→32, 7,312 params" in wide


def test_each_ddim_step_is_the_update_written_out():
    """Every DDIM step (η = 0, Song et al. eq. 12) against the update written out by hand:
    x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 - ᾱ_{t'}) ε̂ with x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t),
    ᾱ after the last step = 1. The predictor ε̂ = 0.3 x_t + 0.1 depends on x_t (so x̂_0 does),
    so a sign flipped on either term, or a wrong ᾱ, moves the path. With as many steps as
    timesteps the path visits T-1, ..., 0."""
    schedule = NoiseSchedule((0.9, 0.7, 0.5, 0.3))
    seen: list[tuple[int, torch.Tensor]] = []

    def forward(x, t):
        seen.append((int(t[0]), x.clone()))
        return 0.3 * x + 0.1

    out = ddim_sample(forward, schedule, (1, 2, 2), 3, steps=4, seed=0)
    assert [t for t, _ in seen] == [3, 2, 1, 0]
    ab = schedule.alphas_cumprod
    x = seen[0][1].double()
    for i, (t, received) in enumerate(seen):
        assert torch.allclose(received.double(), x, atol=1e-6), t
        eps = 0.3 * x + 0.1
        x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        a_next = ab[seen[i + 1][0]] if i + 1 < len(seen) else 1.0
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    assert torch.allclose(out.double(), x, atol=1e-6)


# -- a class-conditional denoiser must embed the data's classes --------------------------------------

def test_class_conditional_with_a_model_built_without_classes_is_refused_at_plan(tmp_path):
    """num_classes: null built a U-Net without a class embedding: it ignored y and trained unconditional
    while the plan listed the class input."""
    from kdgraph.compiler import compile_spec
    from kdgraph.errors import KDGraphError

    spec = _spec(tmp_path)
    spec["student"]["kwargs"]["num_classes"] = None
    with pytest.raises(KDGraphError, match=r"class_conditional: true, but DiffusionUNet was built without classes "
                                           r"\(num_classes: None\)"):
        compile_spec(load_spec(spec), allow_missing_weights=True, materialize=False)


def test_a_denoiser_with_fewer_classes_than_the_data_is_one_line(tmp_path):
    """3 class embeddings on 4-class data: IndexError in the embedding, now exit 2 before training."""
    from _runtime_helpers import run_cli, write_spec

    spec = _spec(tmp_path)
    for role in ("student", "teacher"):
        spec[role]["kwargs"]["num_classes"] = 3
    proc = run_cli("train", str(write_spec(spec, tmp_path / "s.yaml")), "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "teacher.kwargs.num_classes: the teacher embeds 3 classes, the data has 4" in " ".join(proc.stderr.split())
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "run.json").exists()  # a refused run leaves no record of a run


@pytest.mark.parametrize("other", [{"dataset": "digits"}, {"num_classes": 10}, {"input_size": [1, 8, 8]}])
def test_a_judge_trained_on_other_data_is_refused_before_training(tmp_path, other):
    """An 8x8 digits classifier judged a Fashion-MNIST DDPM and a Fréchet distance was reported anyway."""
    from kdgraph.errors import KDGraphError

    spec = load_spec(_spec(tmp_path / "d", method="supervised", student="diffusion_unet_teacher", epochs=1))
    judge = tmp_path / "judge"
    judge.mkdir()
    data = {**spec.to_dict()["data"], **other}
    (judge / "run.json").write_text(json.dumps({"spec": {"data": data}}))
    (judge / "student.safetensors").write_bytes(b"x")
    (judge / "summary.json").write_text("{}")
    spec = load_spec({**spec.to_dict(), "denoise": {**spec.to_dict()["denoise"], "judge": str(judge)}})
    key = next(iter(other))
    with pytest.raises(KDGraphError, match=f"denoise.judge: .*judge classifies other data \\(data.{key} "):
        loop.Trainer.from_spec(spec)
    assert not (tmp_path / "d" / "run" / "checkpoints").exists()
