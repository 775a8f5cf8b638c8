"""BatchNorm re-estimation's share of a StableKD-5/2 epoch on the CPU, unbounded (a whole pass
over the training split, as before issue 24) and bounded (runtime.bn_recalibrate_batches).

The pair and data of bench/stablekd_study.py at --width-div 4 (ResNet-34 -> ResNet-18 at a
quarter width, Fashion-MNIST at 32 px, batch 128), in the first (decomposed) stage. Times
the median of STEPS training steps and of BATCHES re-estimation batches, and extrapolates to
an epoch (the share = re-estimate / (epoch's steps + re-estimate)): seconds, not an epoch.

    python bench/bn_recalibration.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

STEPS, BATCHES = 12, 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from kdgraph.runtime.loop import Trainer
    from kdgraph.spec import load_spec

    w = 4
    model = lambda name: {"model": f"timm:{name}", "kwargs": {  # noqa: E731
        "num_classes": 10, "in_chans": 1, "channels": [64 // w, 128 // w, 256 // w, 512 // w], "stem_width": 64 // w}}
    out = Path(tempfile.mkdtemp())
    spec = load_spec({"name": "bn-share", "output": str(out / "run"), "teacher": model("resnet34"),
                      "student": model("resnet18"), "decompose": {"blocks": 5},
                      "data": {"dataset": "fashion-mnist", "input_size": [1, 32, 32], "resize": "pad",
                               "batch_size": 128, "augment": "none"},
                      "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 3},
                      "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                      "runtime": {"device": "cpu", "num_threads": args.threads, "bn_recalibrate": True}})
    trainer = Trainer.from_spec(spec)
    batches = trainer.data.train.epoch(0)
    step_s = []
    for _ in range(STEPS):
        xb, yb = next(batches)
        t = time.perf_counter()
        trainer.train_step(xb, yb)
        step_s.append(time.perf_counter() - t)
    per_step = statistics.median(step_s[2:])
    per_batch = []
    for _ in range(3):
        object.__setattr__(trainer.config, "bn_recalibrate_batches", BATCHES)
        trainer.evaluator.bn_recalibrated_at = None
        t = time.perf_counter()
        trainer.evaluator.recalibrate_bn(trainer.global_step)
        per_batch.append((time.perf_counter() - t) / BATCHES)
    per_recal_batch = statistics.median(per_batch)
    n = len(trainer.data.train)
    epoch = n * per_step
    default = spec.runtime.bn_recalibrate_batches
    print(f"StableKD-5/2 stage 1, {n} batches of 128, {args.threads} threads: step {per_step * 1e3:.0f} ms (median "
          f"of {STEPS - 2}), re-estimate batch {per_recal_batch * 1e3:.0f} ms (median of 3 x {BATCHES})")
    for label, k in (("before (whole pass)", n), (f"after (bn_recalibrate_batches {default})", min(default, n))):
        r = k * per_recal_batch
        print(f"  {label:38s} {r:6.1f} s per evaluation, {r / (epoch + r):5.1%} of an epoch of {epoch + r:.0f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
