"""Top-1 and top-5 accuracy on a split (one host sync per evaluation).

A per-pixel task (``per_pixel``: (B, C, H, W) logits, (B, H, W) labels; the dense task says
so, ``kdgraph.tasks.classify.Dense``) counts every pixel as a sample:
its top-1 is the pixel accuracy; it also reports ``pixel_acc`` (the same number) and ``miou``
(the mean over classes present in labels or predictions of intersection / union).
"""

from __future__ import annotations

import torch

from kdgraph.runtime.techniques import autocast

TOPK = (1, 5)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = TOPK) -> torch.Tensor:
    """How many rows have their target among the k highest logits, for each k in ``ks``
    (a device tensor, no host sync). As timm's ``accuracy``: with C < k classes, top-k is
    top-C (every row counts)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hit = top == target.unsqueeze(1)  # (N, maxk) or, per pixel, (N, maxk, H, W)
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def accuracy(forward, loader, device: torch.device, precision: str = "fp32",
             channels_last: bool = False, per_pixel: bool = False) -> dict[str, float]:
    """{'top1': %, 'top5': %} of ``forward`` over every batch of ``loader`` (``per_pixel``: also
    'pixel_acc' and 'miou')."""
    correct = torch.zeros(len(TOPK), dtype=torch.long, device=device)
    total = 0
    confusion = None
    for xb, yb in loader.epoch(0):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = forward(xb)
        correct += topk_correct(logits, yb)
        total += yb.numel()
        if per_pixel:
            c = logits.shape[1]
            pairs = yb.flatten() * c + logits.argmax(dim=1).flatten()
            counts = torch.bincount(pairs, minlength=c * c).reshape(c, c)
            confusion = counts if confusion is None else confusion + counts
    out = {f"top{k}": 100.0 * c / max(total, 1) for k, c in zip(TOPK, correct.tolist())}
    if confusion is not None:
        out.update(pixel_acc=out["top1"], miou=mean_iou(confusion))
    return out


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean intersection over union (%) from a (true, predicted) confusion matrix, over the
    classes that occur in either."""
    confusion = confusion.double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    seen = union > 0
    return 100.0 * float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else 0.0
