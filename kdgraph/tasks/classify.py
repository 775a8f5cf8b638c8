"""Image classification, and its per-pixel form (dense: a class per pixel, each pixel a sample)."""

from __future__ import annotations

import torch

from kdgraph.tasks import register_task
from kdgraph.tasks.base import Task


@register_task
class Classification(Task):
    """Images -> class logits: ``Task``'s defaults."""

    name = "classification"


@register_task
class Dense(Task):
    """Images -> per-pixel class logits ((B, C, H, W), labels (B, H, W)): top-1 is the pixel
    accuracy; the evaluation also reports ``pixel_acc`` and ``miou``."""

    name = "dense"
    metrics = ("top1", "top5", "miou")

    def score(self, forward, loader, device: torch.device, precision: str = "fp32",
              channels_last: bool = False) -> dict[str, float]:
        from kdgraph.runtime.evaluate import accuracy

        return accuracy(forward, loader, device, precision, channels_last, per_pixel=True)

    def describe(self, score: dict[str, float]) -> str:
        return super().describe(score) + (f", mIoU {score['miou']:.2f}%" if "miou" in score else "")
