"""Segmentation metrics from a confusion matrix accumulated over batches.

``M[i, j]`` counts the pixels of true class i predicted as class j, over every labelled pixel
(a label equal to ``ignore_index`` is not counted; any other label outside 0..C-1 is an error).
From it: IoU_c = M[c, c] / (Σ_j M[c, j] + Σ_i M[i, c] − M[c, c]), the class's pixel accuracy
M[c, c] / Σ_j M[c, j], mIoU the mean over the classes
that occur in the labels or the predictions (a class in neither has no IoU: NaN, left out of the
mean, as mmseg's and torchvision's reference scripts do), pixel accuracy Σ_c M[c, c] / Σ M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdgraph.segmentation import IGNORE_INDEX

__all__ = ["ConfusionMatrix", "SegmentationScores"]


@dataclass(frozen=True)
class SegmentationScores:
    """What a summary shows: mIoU, pixel accuracy, and each class's IoU (NaN: the class occurs nowhere)."""

    miou: float
    pixel_accuracy: float
    per_class_iou: tuple[float, ...]
    pixels: int
    per_class_accuracy: tuple[float, ...] = ()  # M[c, c] / Σ_j M[c, j]: NaN where class c has no pixel

    def as_dict(self, class_names: list[str] | None = None) -> dict[str, float]:
        """Flat metric names: ``miou``, ``pixel_acc``, ``iou/NAME`` (NAME the class index without names)."""
        names = class_names or [str(c) for c in range(len(self.per_class_iou))]
        return {"miou": self.miou, "pixel_acc": self.pixel_accuracy,
                **{f"iou/{n}": v for n, v in zip(names, self.per_class_iou)}}


class ConfusionMatrix:
    """A (C, C) int64 confusion matrix, updated batch by batch (``update``), merged across
    workers by addition (``matrix`` is plain state: ``state_dict`` / ``load_state_dict``)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch: ``predictions`` (B, C, H, W) logits (argmax over C) or (B, H, W) class
        indices, ``targets`` (B, H, W) labels. Logits of another size than the targets are an error
        (resize them first: ``kdgraph.segmentation.losses.resize_to``)."""
        if predictions.dim() == targets.dim() + 1:
            predictions = predictions.argmax(dim=1)
        if predictions.shape != targets.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
        y, p = targets.reshape(-1).long().cpu(), predictions.reshape(-1).long().cpu()
        keep = y != self.ignore_index
        y, p = y[keep], p[keep]
        c = self.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            bad = y[(y < 0) | (y >= c)][0].item()
            raise ValueError(f"label {bad} is outside 0..{c - 1} and not ignore_index {self.ignore_index}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise ValueError(f"a prediction is outside 0..{c - 1}")
        self.matrix += torch.bincount(y * c + p, minlength=c * c).reshape(c, c)

    def scores(self) -> SegmentationScores:
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(dim=1) + m.sum(dim=0) - tp
        iou = [float(tp[c] / union[c]) if union[c] > 0 else math.nan for c in range(self.num_classes)]
        present = [v for v in iou if not math.isnan(v)]
        rows = m.sum(dim=1)
        accuracy = [float(tp[c] / rows[c]) if rows[c] > 0 else math.nan for c in range(self.num_classes)]
        total = float(m.sum())
        return SegmentationScores(
            miou=sum(present) / len(present) if present else math.nan,
            pixel_accuracy=float(tp.sum()) / total if total else math.nan,
            per_class_iou=tuple(iou), pixels=int(total), per_class_accuracy=tuple(accuracy))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.matrix.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        matrix = state["matrix"]
        if tuple(matrix.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"a confusion matrix of shape {tuple(matrix.shape)} for {self.num_classes} classes")
        self.matrix = matrix.to(torch.int64).clone()
