"""Dense prediction (semantic segmentation): images -> per-pixel class logits (B, C, h, w), labels
(B, H, W).

Its head loss is ``loss.dense`` (``pixel_kl`` or ``cwd``, ``kdgraph.segmentation.losses``) with a
teacher and the per-pixel cross-entropy without (``kdgraph.registry.dense_head``). Logits at
another output stride than the labels (torchvision's heads at stride 8 or 16) are resized to the
labels' grid (bilinear, ``align_corners=False``) by every loss and metric. A pixel labelled
``loss.ignore_index`` (255 by default) counts in no loss and no metric.

Scores (in %): ``miou`` (the mean IoU over the classes present in labels or predictions; "best"
is chosen by it), ``pixel_acc`` (= ``top1``), ``top5`` (the label among the 5 highest logits),
each over the labelled pixels; the summary's ``per_class`` adds each class's IoU and pixel
accuracy (null where the class occurs nowhere).
"""

from __future__ import annotations

import math

import torch

from kdgraph.segmentation import IGNORE_INDEX
from kdgraph.tasks import register_task
from kdgraph.tasks.base import Task

__all__ = ["Dense", "dense_scores"]


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
    metrics = ("top1", "top5", "miou", "pixel_acc")
    best_metric = "miou"

    def __init__(self, spec, compiled):
        super().__init__(spec, compiled)
        self.ignore_index = IGNORE_INDEX if spec.loss.ignore_index is None else int(spec.loss.ignore_index)

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

    def reports(self, run) -> dict:
        """The summary's ``per_class``: each class's IoU and pixel accuracy (%), the student's on
        the split its ``student_*`` scores come from, and the teacher's where it was scored."""
        student = run.test_acc if run.test_acc is not None else run.student_acc
        out = {role: {"iou": acc["iou"], "pixel_acc": acc["class_acc"]}
               for role, acc in (("student", student), ("teacher", run.teacher_acc)) if acc and "iou" in acc}
        return {"per_class": out} if out else {}
