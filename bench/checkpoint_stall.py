"""How long a checkpoint save stops training, per MB of state, on the CPU: the synchronous
save (snapshot, hash, write, fsync, rename: what the Trainer did before issue 24) against
the BackgroundWriter's submit (the snapshot only; hashing and writing run in a thread).

State: a ResNet-50's model and SGD-momentum states (~200 MB). Medians of --repeats saves.

    python bench/checkpoint_stall.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from kdgraph.runtime import checkpoint as ckpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = timm.create_model("resnet50")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "rng": ckpt.rng_state(),
             "position": {"epoch": 0, "step": 0, "global_step": 0}, "plan": {}}
    mb = sum(t.numel() * t.element_size() for t in list(state["model"].values())
             + [v["momentum_buffer"] for v in state["optimizer"]["state"].values()]) / 2**20
    path = Path(tempfile.mkdtemp()) / "last.pt"
    sync, stall, total = [], [], []
    writer = ckpt.BackgroundWriter()
    for _ in range(args.repeats):
        t = time.perf_counter()
        ckpt.save_atomic(state, path, keep_previous=True)
        sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        writer.submit(state, path, keep_previous=True)
        stall.append(time.perf_counter() - t)
        writer.wait()
        total.append(time.perf_counter() - t)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"{mb:.0f} MB of state, medians of {args.repeats}:")
    print(f"  before (synchronous save_atomic): {ms(sync):7.0f} ms stall, {ms(sync) / mb:6.2f} ms/MB")
    print(f"  after (BackgroundWriter.submit):  {ms(stall):7.0f} ms stall, {ms(stall) / mb:6.2f} ms/MB "
          f"(the write then takes {ms(total):.0f} ms in its thread)")


if __name__ == "__main__":
    main()
