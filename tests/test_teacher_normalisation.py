"""Teacher-side normalisation: where the teacher's and the student's pretrained_cfg mean/std
differ, the data is normalised for the student and the teacher is fed its own normalisation
of the same pixels (timm's distillation task, ``normalize_input``); the plan shows both.

Independent truth: the pixels themselves, normalised here by hand with each model's own
mean/std, against what reaches each model's first layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _runtime_helpers import tiny_spec
from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.spec import load_spec
from kdgraph.zoo import resnet_tiny_student, resnet_tiny_teacher

T_CFG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # ImageNet's
S_CFG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # inception's


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _models(teacher_cfg, student_cfg):
    torch.manual_seed(0)
    teacher, student = resnet_tiny_teacher(num_classes=2, in_chans=3), resnet_tiny_student(num_classes=2, in_chans=3)
    teacher.pretrained_cfg, student.pretrained_cfg = dict(teacher_cfg), dict(student_cfg)
    return teacher, student


def _compiled(tmp_path, teacher_cfg, student_cfg):
    spec = tiny_spec(tmp_path / "run", "kd", data={"dataset": "imagefolder", "root": str(_folder(tmp_path / "img")),
                                                   "input_size": [3, 8, 8], "fraction": 1.0, "batch_size": 4})
    for role in ("teacher", "student"):
        spec[role]["kwargs"] = {"num_classes": 2, "in_chans": 3}
    return compile_spec(load_spec(spec), models=_models(teacher_cfg, student_cfg))


def _first_layer_inputs(d: Distiller, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    hooks = [m.conv1.register_forward_pre_hook(lambda _m, args, role=role: seen.setdefault(role, args[0].clone()))
             for role, m in (("teacher", d.teacher.model), ("student", d.student))]
    try:
        d(x, torch.tensor([0, 1, 0, 1]))
    finally:
        for h in hooks:
            h.remove()
    return seen["teacher"], seen["student"]


def test_each_model_sees_its_own_normalisation_of_the_same_pixels(tmp_path):
    c = _compiled(tmp_path, T_CFG, S_CFG)
    assert (c.data.mean, c.data.std) == (S_CFG["mean"], S_CFG["std"])
    assert (c.data.teacher_mean, c.data.teacher_std) == (T_CFG["mean"], T_CFG["std"])
    pixels = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    as_student = (pixels - view(S_CFG["mean"])) / view(S_CFG["std"])  # what the data gives
    teacher_in, student_in = _first_layer_inputs(Distiller(c), as_student)
    torch.testing.assert_close(student_in, as_student)
    torch.testing.assert_close(teacher_in, (pixels - view(T_CFG["mean"])) / view(T_CFG["std"]), rtol=1e-5, atol=1e-5)
    d = Distiller(c)  # the teacher's own top-1 is measured on its own normalisation too
    logits = d.teacher(as_student)
    torch.testing.assert_close(logits, c.teacher.model((pixels - view(T_CFG["mean"])) / view(T_CFG["std"])),
                               rtol=1e-5, atol=1e-5)


def test_equal_normalisations_feed_the_teacher_the_same_tensor(tmp_path):
    c = _compiled(tmp_path, T_CFG, T_CFG)
    assert c.data.teacher_mean is None and c.data.stats == "the student's pretrained_cfg"
    x = torch.randn(4, 3, 8, 8)
    teacher_in, student_in = _first_layer_inputs(Distiller(c), x)
    assert torch.equal(teacher_in, x) and torch.equal(student_in, x)


def test_the_plan_shows_both_normalisations(tmp_path):
    c = _compiled(tmp_path, T_CFG, S_CFG)
    text = str(c.data)
    assert "student: mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5] from the student's pretrained_cfg" in text
    assert "teacher renormalised to its own mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225]" in text
    data = c.to_dict()["data"]
    assert data["teacher_mean"] == pytest.approx(list(T_CFG["mean"])) and data["mean"] == [0.5, 0.5, 0.5]
