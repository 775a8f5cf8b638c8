"""Top-1 and top-5 accuracy on a split (one host sync per evaluation)."""

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
    hit = top == target[:, None]
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def accuracy(forward, loader, device: torch.device, precision: str = "fp32",
             channels_last: bool = False) -> dict[str, float]:
    """{'top1': %, 'top5': %} of ``forward`` over every batch of ``loader``."""
    correct = torch.zeros(len(TOPK), dtype=torch.long, device=device)
    total = 0
    for xb, yb in loader.epoch(0):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = forward(xb)
        correct += topk_correct(logits, yb)
        total += len(yb)
    return {f"top{k}": 100.0 * c / max(total, 1) for k, c in zip(TOPK, correct.tolist())}
