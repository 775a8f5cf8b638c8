"""Dense prediction (semantic segmentation): images -> per-pixel class logits (B, C, h, w), labels
(B, H, W).

Its head loss is ``loss.dense`` (``pixel_kl`` or ``cwd``, ``kdgraph.segmentation.losses``) with a
teacher and the per-pixel cross-entropy without (``kdgraph.segmentation.register.dense_head``,
registered there for the compiler with the task's other library entries: its losses, models,
data planner and ``ignore_index`` default). Logits at
another output stride than the labels (torchvision's heads at stride 8 or 16) are resized to the
labels' grid (bilinear, ``align_corners=False``) by every loss and metric. A pixel labelled
``loss.ignore_index`` (255 by default) counts in no loss and no metric.

Data: besides the in-memory datasets, ``data.dataset: voc | cityscapes`` streams an image + mask
folder (``kdgraph.segmentation.data.segmentation_data``, this task's ``build_data``).

Export: a torchvision student (``torchvision:NAME``, a ``SegmentationModel``) ships in torchvision's
own layout (``ship_torchvision``: ``model.safetensors``, ``constructor.json`` and a ``config.json``
holding kdgraph's card under ``_kdgraph``), read back through ``torchvision_layout()``;
any other student in timm's layout (``Task.ship``).

Scores (in %): ``miou`` (the mean IoU over the classes present in labels or predictions; "best"
is chosen by it), ``pixel_acc`` (= ``top1``), ``top5`` (the label among the 5 highest logits),
each over the labelled pixels; the summary's ``per_class`` adds each class's IoU and pixel
accuracy (null where the class occurs nowhere).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

from kdgraph.errors import KDGraphError
from kdgraph.segmentation import IGNORE_INDEX, LAYOUTS
from kdgraph.segmentation.register import dense_head
from kdgraph.tasks import register_task
from kdgraph.tasks.base import Task

__all__ = ["Dense", "dense_scores", "read_torchvision", "ship_torchvision", "torchvision_layout"]


def _head(output) -> torch.Tensor:
    """The ``out`` logits of a forward (the first of several heads)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _percent(values) -> list[float | None]:
    return [None if math.isnan(v) else 100.0 * v for v in values]


@torch.no_grad()
def dense_scores(forward, loader, device: torch.device, ignore_index: int = IGNORE_INDEX,
                 precision: str = "fp32", channels_last: bool = False) -> dict:
    """``forward`` over every batch of ``loader``: {'top1', 'top5', 'pixel_acc', 'miou'} in % over the
    pixels not labelled ``ignore_index``, and the per-class lists 'iou' and 'class_acc' (% or None)."""
    from kdgraph.runtime.evaluate import topk_correct
    from kdgraph.runtime.techniques import autocast
    from kdgraph.segmentation.losses import resize_to
    from kdgraph.segmentation.metrics import ConfusionMatrix

    confusion, top5 = None, 0
    for xb, yb in loader.epoch(0):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = _head(forward(xb))
        logits = resize_to(logits.float(), yb.shape[-2:])
        if confusion is None:
            confusion = ConfusionMatrix(logits.shape[1], ignore_index)
        confusion.update(logits, yb)
        valid = yb != ignore_index
        top5 += int(topk_correct(logits.permute(0, 2, 3, 1)[valid], yb[valid].long(), (5,))[0])
    if confusion is None:
        return {}
    s = confusion.scores()
    pixels = max(s.pixels, 1)
    return {"top1": 100.0 * s.pixel_accuracy if s.pixels else 0.0, "top5": 100.0 * top5 / pixels,
            "pixel_acc": 100.0 * s.pixel_accuracy if s.pixels else 0.0,
            "miou": 100.0 * s.miou if not math.isnan(s.miou) else 0.0,
            "iou": _percent(s.per_class_iou), "class_acc": _percent(s.per_class_accuracy)}


@register_task
class Dense(Task):
    """Images -> per-pixel class logits, scored by ``dense_scores``; a higher mIoU is better."""

    name = "dense"
    head_loss = staticmethod(dense_head)
    metrics = ("top1", "top5", "miou", "pixel_acc")
    best_metric = "miou"

    def __init__(self, spec, compiled):
        super().__init__(spec, compiled)
        self.ignore_index = IGNORE_INDEX if spec.loss.ignore_index is None else int(spec.loss.ignore_index)

    def build_data(self, spec, plan, device: torch.device, dist_info, channels_last: bool = False):
        """An image + mask folder (``data.dataset: voc | cityscapes``) streamed by
        ``segmentation_data``, its masks checked against the student's classes; else ``Task``'s."""
        if spec.data.dataset not in LAYOUTS:
            return super().build_data(spec, plan, device, dist_info, channels_last)
        from kdgraph.segmentation.data import segmentation_data

        return segmentation_data(spec, plan, device, dist_info, channels_last, self.ignore_index, self.num_classes)

    def score(self, forward, loader, device: torch.device, precision: str = "fp32",
              channels_last: bool = False) -> dict:
        return dense_scores(forward, loader, device, self.ignore_index, precision, channels_last)

    def describe(self, score: dict) -> str:
        return f"mIoU {score['miou']:.2f}%, pixel acc {score['pixel_acc']:.2f}%"

    @classmethod
    def headline(cls, summary: dict, teacher: bool = False) -> str | None:
        if summary.get("student_miou") is None:
            return None
        line = f"student mIoU {summary['student_miou']:.2f}% (pixel acc {summary['student_pixel_acc']:.2f}%)"
        if teacher and summary.get("teacher_miou") is not None:
            line += f", teacher mIoU {summary['teacher_miou']:.2f}%"
        return line

    @classmethod
    def render_heads(cls, compiled) -> list[tuple[str, str]] | None:
        """(name, text) of each head of the student: its per-pixel logits and output stride, the
        teacher's beside where it differs (the losses and metrics resize both to the labels' grid)."""
        c = compiled
        if c.student.traced is None or not c.student.per_pixel:
            return None

        def grid(art, shape) -> str:
            stride = art.traced.input_size[1] // shape[2] if shape[2] else 0
            return f"{shape[2]}×{shape[3]}" + (f" (stride {stride})" if stride != 1 else "")

        teacher = dict(c.teacher.heads) if c.teacher is not None and c.teacher.traced is not None else {}
        rows = []
        for name, shape in c.student.heads:
            text = f"{shape[1]} logits per pixel, {grid(c.student, shape)}"
            t_shape = teacher.get(name)
            if t_shape is not None and tuple(t_shape) != tuple(shape):
                text = f"{t_shape[1]} logits per pixel, {grid(c.teacher, t_shape)} / {grid(c.student, shape)}"
            elif c.teacher is not None and t_shape is None:
                text += " (student only)"
            rows.append((name, text))
        student = dict(c.student.heads)
        rows += [(name, f"{shape[1]} logits per pixel, {grid(c.teacher, shape)} (teacher only)")
                 for name, shape in teacher.items() if name not in student]
        return rows

    def reports(self, run) -> dict:
        """The summary's ``per_class``: each class's IoU and pixel accuracy (%), the student's on
        the split its ``student_*`` scores come from, and the teacher's where it was scored."""
        student = run.test_acc if run.test_acc is not None else run.student_acc
        out = {role: {"iou": acc["iou"], "pixel_acc": acc["class_acc"]}
               for role, acc in (("student", student), ("teacher", run.teacher_acc)) if acc and "iou" in acc}
        return {"per_class": out} if out else {}

    # ------------------------------------------------------------------ export

    @classmethod
    def layouts(cls) -> tuple:
        return (torchvision_layout(),)

    def ship(self, spec, compiled, maps: dict, path: Path, to: Path, command: str) -> dict:
        """A torchvision student in torchvision's own layout (``ship_torchvision``), any other
        in timm's (``Task.ship``)."""
        from kdgraph.runtime.runs import RunFolder
        from kdgraph.segmentation.models import SegmentationModel

        model = compiled.student.model
        if not isinstance(model, SegmentationModel):
            return super().ship(spec, compiled, maps, path, to, command)
        if maps:
            raise KDGraphError(f"{spec.student.model}: the trained student keeps adapters after blocks "
                               f"{', '.join(map(str, sorted(maps)))}, which torchvision's layout cannot hold; distil "
                               "into a student of the teacher's widths (no adapter stays in its inference path)")
        summary_file = RunFolder(spec.output_dir).summary
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        pre = summary.get("preprocessing") or {}
        card = {"miou": summary.get("student_miou"), "pixel_acc": summary.get("student_pixel_acc"),
                "teacher_miou": summary.get("teacher_miou"), "method": compiled.plan.method,
                "data": spec.data.dataset, "input_size": list(compiled.input_size),
                "mean": pre.get("mean") or compiled.data.mean, "std": pre.get("std") or compiled.data.std,
                "resize": pre.get("resize"),
                "ignore_index": self.ignore_index, "weights_from": str(path), "command": command}
        return ship_torchvision(model.eval(), to, card, compiled.input_size)


@torch.no_grad()
def ship_torchvision(model, folder: Path, card: dict[str, Any], input_size: tuple[int, int, int], *,
                     atol: float = 1e-5) -> dict[str, Any]:
    """Write the trained ``SegmentationModel`` with ``export_torchvision`` to ``folder`` (and
    ``config.json``: ``{"_kdgraph": card}``, the mark of a kdgraph export), load it back with plain
    torchvision and check its ``out`` (and ``aux``) against the student's own heads, upsampled as
    torchvision's forward does, on a fixed batch of ``input_size``. Returns {"folder", "format":
    "torchvision", "reason", "max_abs_diff"}."""
    from kdgraph.runtime.ship import (CONFIG, INCOMPLETE, ExportError, _begin_export, _write_text,
                                      check_destination, clear_earlier_export)
    from kdgraph.segmentation.export import export_torchvision
    from kdgraph.segmentation.losses import resize_to

    folder = _begin_export(check_destination(Path(folder)))
    clear_earlier_export(folder)
    _write_text(folder / CONFIG, json.dumps({"_kdgraph": {k: v for k, v in card.items() if v is not None}},
                                            indent=2) + "\n")
    export_torchvision(model, folder)
    (folder / INCOMPLETE).write_text("kdgraph export was checking this folder; run it again\n")  # until checked
    device = next(model.parameters()).device
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    heads = model(x)
    heads = heads if isinstance(heads, tuple) else (heads,)
    back = load_torchvision(folder).to(device).eval()(x)
    err = max(float((back[name].float() - resize_to(h, x.shape[-2:]).float()).abs().max())
              for name, h in zip(model.heads, heads))
    if err > atol:
        raise ExportError(f"the torchvision export in {folder} does not reproduce the student (max |diff| {err:.3g})")
    (folder / INCOMPLETE).unlink()
    name, _ = model.constructor
    return {"folder": str(folder), "format": "torchvision", "reason": f"torchvision.models.get_model({name!r})",
            "max_abs_diff": err}


def load_torchvision(folder: Path) -> torch.nn.Module:
    """The model of a torchvision export folder, built and loaded by torchvision alone, as a user does."""
    import torchvision
    from safetensors.torch import load_file

    from kdgraph.segmentation.export import CONSTRUCTOR, WEIGHTS

    ctor = json.loads((Path(folder) / CONSTRUCTOR).read_text())
    net = torchvision.models.get_model(ctor["name"], weights=None, **ctor["kwargs"])
    net.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return net


def read_torchvision(compiled, folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a torchvision export folder as the state dict of the spec's
    ``torchvision:`` student (torchvision's keys under ``net.``), once its constructor.json is
    found to name that model with the same kwargs."""
    from kdgraph.segmentation.export import CONSTRUCTOR, PREFIX, WEIGHTS
    from kdgraph.segmentation.models import SegmentationModel
    from kdgraph.weights import read_weights_file

    model = compiled.student.model
    if not isinstance(model, SegmentationModel):
        raise KDGraphError(f"{folder} is a torchvision export ({CONSTRUCTOR}, {WEIGHTS}); this spec's student is "
                           f"{compiled.run.student.model}: give the spec of the torchvision: student it was exported from")
    try:
        ctor = json.loads((Path(folder) / CONSTRUCTOR).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KDGraphError(f"cannot read {Path(folder) / CONSTRUCTOR}: {str(exc).splitlines()[0]}") from None
    name, kwargs = model.constructor
    got = (ctor.get("name"), ctor.get("kwargs")) if isinstance(ctor, dict) else (None, None)
    if got != (name, kwargs):
        raise KDGraphError(f"{folder} holds torchvision's {got[0]} {got[1]}; this spec's student is {name} {kwargs}: "
                           "give the spec it was exported from")
    return {PREFIX + k: v for k, v in read_weights_file(Path(folder) / WEIGHTS).items()}


@functools.cache
def torchvision_layout():
    """The ``FolderLayout`` of ``ship_torchvision``'s folders (built once, when a
    dense run is exported or read back: registering it names its files for ``clear_earlier_export``)."""
    from kdgraph.runtime.ship import FolderLayout
    from kdgraph.segmentation.export import CONSTRUCTOR, WEIGHTS

    return FolderLayout("torchvision", (CONSTRUCTOR, WEIGHTS), f"a torchvision export: {CONSTRUCTOR} and {WEIGHTS}",
                        read_torchvision)
