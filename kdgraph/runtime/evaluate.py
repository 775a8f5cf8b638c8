"""Top-1 accuracy on a test split (one host sync per evaluation)."""

from __future__ import annotations

import torch

from .techniques import autocast


@torch.no_grad()
def top1(forward, loader, device: torch.device, precision: str = "fp32", channels_last: bool = False) -> float:
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for xb, yb in loader.epoch(0):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = forward(xb)
        correct += (logits.argmax(1) == yb).sum()
        total += len(yb)
    return 100.0 * correct.item() / max(total, 1)
