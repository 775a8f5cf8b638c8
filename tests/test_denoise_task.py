"""kdgraph.tasks.denoise.task: the denoise task's batches against DDPM's forward process written
out (x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, drawn from (seed, epoch, index)), its score's
lines, and its one-line refusals (classes past the embedding, streamed data, an
unfinished judge, a student diffusers' layout cannot hold)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.spec import load_spec
from kdgraph.stream import StreamLoader
from kdgraph.tasks.denoise.task import Denoise, check_class_inputs

SIZE = (1, 8, 8)


def _spec(tmp_path, student="module:kdgraph.zoo:diffusion_unet_small", **denoise):
    return load_spec({
        "name": "tiny-ddpm", "seed": 5,
        "student": {"model": student, "kwargs": {"in_chans": 1, "num_classes": 4}},
        "data": {"dataset": "synthetic", "input_size": list(SIZE), "num_classes": 4, "samples": 16, "batch_size": 4},
        "denoise": {"timesteps": 100, "class_conditional": True, **denoise},
        "schedule": {"method": "supervised", "epochs": 1}, "decompose": {"blocks": 1},
        "output": str(tmp_path / "run"),
    })


def _compiled(student_classes=4, teacher_classes=None):
    teacher = None if teacher_classes is None else SimpleNamespace(model=SimpleNamespace(num_classes=teacher_classes))
    return SimpleNamespace(num_classes=4, input_size=SIZE, teacher=teacher,
                           student=SimpleNamespace(model=SimpleNamespace(num_classes=student_classes)))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_a_batch_is_ddpms_forward_process_drawn_per_sample(tmp_path, prediction):
    task = Denoise(_spec(tmp_path, prediction=prediction), _compiled())
    g = torch.Generator().manual_seed(0)
    x0, y, idx = torch.randn(4, *SIZE, generator=g), torch.tensor([0, 1, 2, 3]), torch.tensor([7, 2, 11, 4])
    x_t, target, (t, y_side) = task.prepare(x0, y, idx, 1, 0, mix=None)
    assert torch.equal(y_side, y) and t.dtype == torch.int64 and ((0 <= t) & (t < 100)).all()
    a = task.draws.schedule.at(t).view(-1, 1, 1, 1).float()
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε
    assert abs(float(eps.std()) - 1.0) < 0.2  # standard normal noise
    want = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0
    assert torch.allclose(target, want, atol=1e-4)
    # drawn from (seed, epoch, index): one sample alone draws its row of the batch; another epoch differs
    alone = task.prepare(x0[2:3], y[2:3], idx[2:3], 1, 99, mix=None)
    assert torch.equal(alone[0], x_t[2:3]) and torch.equal(alone[2][0], t[2:3])
    assert not torch.equal(task.prepare(x0, y, idx, 2, 0, mix=None)[0], x_t)
    x_in, side = task.inputs(x0, y, idx)
    assert torch.equal(x_in, task.prepare(x0, y, idx, 0, 0, mix=None)[0]) and len(side) == 2


def test_the_lines_say_mse(tmp_path):
    """(Lower MSE is better, a tie keeps the earlier: tests/test_tasks.py's builtin-task parametrisation.)"""
    task = Denoise(_spec(tmp_path), _compiled())
    assert task.describe({"mse": 0.0123456}) == "denoising MSE 0.01235"
    assert Denoise.headline({"student_mse": 0.5, "teacher_mse": 0.25}, teacher=True) == \
        "student denoising MSE 0.50000, teacher 0.25000"
    assert Denoise.headline({"student_mse": 0.5}, teacher=True) == "student denoising MSE 0.50000"
    assert Denoise.headline({}) is None


def test_a_model_embedding_fewer_classes_than_the_data_is_refused(tmp_path):
    spec = _spec(tmp_path)
    check_class_inputs(_compiled(4, 4), 4, spec.denoise)  # as many: fine
    check_class_inputs(_compiled(2), 4, None)  # no denoise block: nothing to check
    check_class_inputs(_compiled(2), 4, _spec(tmp_path, class_conditional=False).denoise)  # no class input
    with pytest.raises(KDGraphError, match="teacher.kwargs.num_classes: the teacher embeds 3 classes, the data has "
                                           "4; set num_classes: 4"):
        check_class_inputs(_compiled(4, 3), 4, spec.denoise)
    with pytest.raises(KDGraphError, match="student.kwargs.num_classes: the student embeds 2 classes"):
        check_class_inputs(_compiled(2), 4, spec.denoise)


def test_streamed_data_and_an_unfinished_judge_are_refused_before_training(tmp_path):
    memory = SimpleNamespace(train=object(), num_classes=4)
    Denoise(_spec(tmp_path), _compiled()).check_data(memory, "synthetic")
    streamed = SimpleNamespace(train=object.__new__(StreamLoader), num_classes=4)
    with pytest.raises(KDGraphError, match=r"denoise: a denoiser is trained from data held in memory"):
        Denoise(_spec(tmp_path), _compiled()).check_data(streamed, "synthetic")
    judge = tmp_path / "judge"
    judge.mkdir()
    with pytest.raises(KDGraphError, match="denoise.judge: .*judge is not a finished kdgraph run"):
        Denoise(_spec(tmp_path, judge=str(judge)), _compiled()).check_data(memory, "synthetic")


def test_only_a_diffusers_student_ships_and_never_with_adapters(tmp_path):
    spec = _spec(tmp_path)
    with pytest.raises(KDGraphError, match="module:kdgraph.zoo:diffusion_unet_small is neither: its trained "
                                           "weights are .*student.safetensors"):
        Denoise.check_export(spec)
    Denoise.check_export(_spec(tmp_path, student="diffusers:UNet2DModel"))  # no error
    to = tmp_path / "ship"
    with pytest.raises(KDGraphError, match="keeps adapters after blocks 1, 3, which diffusers' layout cannot hold"):
        Denoise(spec, _compiled()).ship(spec, _compiled(), {3: None, 1: None}, tmp_path / "w", to, "export")
    assert not to.exists()
