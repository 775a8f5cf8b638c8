"""The stability diagnostic (StableKD's evidence for inter-block optimisation entanglement).

After every optimizer step it measures, per student block, the Euclidean distance between
the block's parameters before and after the step, ||θ_t − θ_{t−1}||. The head block (k)
is the paper's "classifier head" curve. Distances stay on the device and are flushed to
the host only on logging steps, so tracking adds no host sync to ordinary steps.
"""

from __future__ import annotations

import torch
from torch import nn


class StabilityTracker:
    def __init__(self, segments: list[nn.Module]):
        self.blocks = [[p for p in seg.parameters() if p.requires_grad] for seg in segments]
        self.prev = [[p.detach().clone() for p in params] for params in self.blocks]
        self.pending: list[tuple[int, torch.Tensor]] = []

    @torch.no_grad()
    def update(self, global_step: int) -> None:
        dists = []
        for params, prev in zip(self.blocks, self.prev):
            if not params:
                dists.append(torch.zeros((), device=prev[0].device if prev else "cpu"))
                continue
            sq = torch.stack([(p.float() - q.float()).pow(2).sum() for p, q in zip(params, prev)]).sum()
            dists.append(sq.sqrt())
            for p, q in zip(params, prev):
                q.copy_(p)
        self.pending.append((global_step, torch.stack(dists)))

    def flush(self) -> list[dict]:
        """Per-step records {global_step, dtheta_block1..k} (one host sync for all of them)."""
        if not self.pending:
            return []
        steps = [s for s, _ in self.pending]
        values = torch.stack([d for _, d in self.pending]).cpu().tolist()
        self.pending.clear()
        return [{"kind": "stability", "global_step": s,
                 **{f"dtheta_block{i + 1}": round(v, 8) for i, v in enumerate(row)}}
                for s, row in zip(steps, values)]


def nonfinite_advice(updates_before: int) -> str:
    """What to change when the loss became inf or NaN, given how many optimizer updates came
    before the forward that produced it: with none, the learning rate cannot be the cause."""
    inputs = "the data, the teacher's weights or its cache, and loss parameters such as loss.temperature"
    if updates_before == 0:
        return f"It was not finite before any update, so the learning rate is not the cause: check {inputs}"
    return ("Lower optim.lr, set optim.clip_grad_norm, or use precision fp32; if the loss was not finite from the "
            f"first steps on (metrics.jsonl), the learning rate is not the cause: check {inputs}")
