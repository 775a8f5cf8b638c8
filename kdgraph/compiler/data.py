"""Pass 2: how the data will be read (loader, normalisation), decided without decoding it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from kdgraph.errors import DataError
from kdgraph.imagefolder import scan_imagefolder
from kdgraph.ir import DataPlan
from kdgraph.registry import DATA_PLANNERS
from kdgraph.spec.schema import DEFAULT_CROP_PCT

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import BuildMode, Models
    from kdgraph.spec import DataSpec, Spec


def plan_data(data_spec: DataSpec, teacher: nn.Module | None, student: nn.Module,
              input_size: tuple[int, int, int], missing_ok: bool = False) -> DataPlan:
    """Choose the loader of ``data_spec`` and its normalisation. Image folders are listed and
    checked (scan_imagefolder's errors surface here, in `kdgraph plan`); a dataset with its own
    planner (``DATA_PLANNERS``: a task's image + mask folders) is planned by it; other datasets are
    always held in memory and normalised with their training statistics. With ``missing_ok``
    (planning), an image folder that does not exist yet leaves the loader to be chosen later."""
    if data_spec.dataset in DATA_PLANNERS:  # listed and checked by its own planner
        return DATA_PLANNERS.get(data_spec.dataset)(data_spec, input_size,
                                                    _normalisation(data_spec, teacher, student, input_size[0]),
                                                    missing_ok)
    if data_spec.dataset != "imagefolder":
        return DataPlan(data_spec.dataset, "memory", f"{data_spec.dataset} is held in memory", input_size)
    if missing_ok and (data_spec.root is None or not Path(data_spec.root).exists()):
        return DataPlan("imagefolder", data_spec.loader, f"{data_spec.root} does not exist yet: chosen when it does",
                        input_size, None, None, None, **_normalisation(data_spec, teacher, student, input_size[0]))
    folder = scan_imagefolder(data_spec.root, data_spec.num_classes, validation=data_spec.val_fraction > 0)
    c, h, w = input_size
    if c not in (1, 3):
        raise DataError(f"data.input_size: imagefolder reads 1 (grey) or 3 (RGB) channels, got {c}")
    mb = folder.num_images * c * h * w / 2**20  # held as uint8, one byte a pixel value (kdgraph.data)
    budget = data_spec.memory_budget_mb
    size = f"{folder.num_images:,} images, {mb:,.1f} MB decoded" if mb >= 0.1 else \
        f"{folder.num_images:,} images, {mb * 1024:,.0f} KB decoded"
    if data_spec.loader == "auto":
        loader = "memory" if mb <= budget else "stream"
        reason = f"auto: {size} {'<=' if loader == 'memory' else '>'} data.memory_budget_mb {budget}"
    else:
        loader, reason = data_spec.loader, f"data.loader: {data_spec.loader}, {size}"
    if folder.eval_split == "val" and (Path(folder.root) / "test").is_dir():
        reason += "; val/ is evaluated, test/ is not read"
    elif folder.val_files is not None:
        reason += "; val/ is the validation split, test/ is read once at the end"
    return DataPlan("imagefolder", loader, reason, input_size, len(folder.train_files), len(folder.test_files),
                    round(mb, 1), num_classes=len(folder.classes), **_normalisation(data_spec, teacher, student, c))


def check_num_classes(data: DataPlan, predicted: int | None) -> None:
    """An image folder's classes are its class folders: the student must predict exactly as
    many (``predicted``: what tracing found, None for per-pixel logits)."""
    if data.num_classes is not None and predicted is not None and predicted != data.num_classes:
        raise DataError(f"student.kwargs.num_classes: the student predicts {predicted} classes, the image folder "
                        f"has {data.num_classes} class folders; set num_classes: {data.num_classes} in "
                        "student.kwargs (and teacher.kwargs)")


def _cfg(model: nn.Module | None) -> dict:
    cfg = getattr(model, "pretrained_cfg", None)  # timm models carry one; others do not
    return cfg if isinstance(cfg, dict) else {}


def _cfg_norm(model: nn.Module | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The model's pretrained_cfg mean/std (0..1 pixel units) where it has them for ``channels``."""
    mean, std = _cfg(model).get("mean"), _cfg(model).get("std")
    if mean is not None and std is not None and len(mean) == len(std) == channels:
        return tuple(map(float, mean)), tuple(map(float, std))
    return None


def _normalisation(data_spec: DataSpec, teacher: nn.Module | None, student: nn.Module, channels: int) -> dict:
    """DataPlan's normalisation fields. The data's mean/std: the spec's, else the student's timm
    pretrained_cfg where both models have one (each model is then fed its own, as timm's
    distillation task does: ``teacher_mean``/``teacher_std`` where the teacher's differs), else
    the teacher's (it sees the inputs the student is taught on) or, without a teacher, the
    student's (so that a teacher trained by kdgraph and the runs distilling it agree), else
    None: the training split's statistics, for both."""
    model = teacher if teacher is not None else student
    crop_pct = data_spec.crop_pct or _cfg(model).get("crop_pct") or DEFAULT_CROP_PCT
    out: dict = {"crop_pct": crop_pct}
    if data_spec.mean is not None:
        return out | {"mean": tuple(data_spec.mean), "std": tuple(data_spec.std), "stats": "the spec (data.mean/std)"}
    t_norm, s_norm = _cfg_norm(teacher, channels), _cfg_norm(student, channels)
    if t_norm is not None and s_norm is not None:
        out |= {"mean": s_norm[0], "std": s_norm[1], "stats": "the student's pretrained_cfg"}
        if t_norm != s_norm:
            out |= {"teacher_mean": t_norm[0], "teacher_std": t_norm[1]}
        return out
    norm = t_norm if teacher is not None else s_norm
    if norm is not None:
        return out | {"mean": norm[0], "std": norm[1],
                      "stats": f"the {'teacher' if teacher is not None else 'student'}'s pretrained_cfg"}
    return out | {"stats": "the training split's statistics"}


def data_pass(spec: Spec, models: Models, input_size: tuple[int, int, int], mode: BuildMode) -> DataPlan:
    """Pass 2: how the data will be read (loader, normalisation), without decoding it."""
    return plan_data(spec.data, models.teacher.model if models.teacher else None, models.student.model,
                     input_size, missing_ok=mode.allow_missing)
