"""kdgraph.runtime.stability: the per-block parameter distance ||θ_t − θ_{t−1}|| after each
step (StableKD's entanglement diagnostic), and the advice on a loss that is not finite.

Independent truth: the distances written out from parameter changes set by hand (a change of
3 in one entry and 4 in another of the same block is a distance of 5; a block that did not
move, or has no trainable parameter, is 0)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdgraph.runtime.stability import StabilityTracker, nonfinite_advice


def _blocks():
    a, b, frozen = nn.Linear(2, 2), nn.Linear(3, 1), nn.Linear(1, 1)
    frozen.requires_grad_(False)
    return a, b, frozen


def test_each_steps_distance_per_block_written_out():
    a, b, frozen = _blocks()
    tracker = StabilityTracker([a, b, frozen])
    with torch.no_grad():
        a.weight[0, 0] += 3.0
        a.bias[1] -= 4.0  # block 1: sqrt(3^2 + 4^2) = 5
        frozen.weight += 10.0  # not trainable: not tracked
    tracker.update(1)
    with torch.no_grad():
        b.weight[0, 2] += 2.0  # block 2: 2; block 1 unchanged since step 1: 0
    tracker.update(2)
    assert tracker.flush() == [
        {"kind": "stability", "global_step": 1, "dtheta_block1": 5.0, "dtheta_block2": 0.0, "dtheta_block3": 0.0},
        {"kind": "stability", "global_step": 2, "dtheta_block1": 0.0, "dtheta_block2": 2.0, "dtheta_block3": 0.0}]
    assert tracker.flush() == []  # flushed records are not repeated


def test_distances_are_measured_from_the_previous_step_not_the_start():
    a, b, frozen = _blocks()
    tracker = StabilityTracker([a])
    for step in (1, 2, 3):
        with torch.no_grad():
            a.weight[1, 1] += 0.5 * step  # moves 0.5, 1.0, 1.5: each step's own move
        tracker.update(step)
    assert [r["dtheta_block1"] for r in tracker.flush()] == pytest.approx([0.5, 1.0, 1.5])


def test_the_advice_rules_out_the_learning_rate_before_any_update():
    assert "learning rate is not the cause" in nonfinite_advice(0) and "Lower optim.lr" not in nonfinite_advice(0)
    assert nonfinite_advice(5).startswith("Lower optim.lr, set optim.clip_grad_norm")
