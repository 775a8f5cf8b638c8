"""Teacher cache: epoch time with the live teacher against the cache, in one run.

For a pair whose teacher forward is most of the step (default resnet50 -> resnet18 at 64 px
on the CPU, random weights, synthetic images of 100 classes), it

1. builds the cache (`build_cache`, top-10 fp16 unless --full) and times it: the whole
   build per epoch, and the teacher's forward inside it (what a live epoch pays for the
   teacher);
2. trains ``--epochs`` epochs of plain KD with the live teacher, then the same run from the
   cache, and takes the median epoch time of each (the first epoch of each run left out:
   warm-up);
3. prints the ratio, the teacher's share of a live epoch, the build cost against one live
   epoch's teacher forwards, and the cache's bytes per image per epoch. A JSON line goes to
   --out.

    python bench/teacher_cache.py                      # resnet50 -> resnet18, 64 px, 256 images
    python bench/teacher_cache.py --teacher timm:resnet152 --student timm:resnet10t

Threads: --threads (2 by default). Pause other CPU work while it runs (the accuracy grid:
see BENCHMARKS.md for the pause/resume wrapper).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from kdgraph.runtime.cache import build_cache
from kdgraph.runtime.loop import train
from kdgraph.spec import load_spec
from kdgraph.teacher_cache import read_header, shard_path


def spec(args, root: Path, out: str, cache: bool):
    kw = {"num_classes": args.classes}
    d = {
        "name": f"cache-bench-{out}", "seed": 0,
        "teacher": {"model": args.teacher, "kwargs": kw, **({"cache": str(root / "cache")} if cache else {})},
        "student": {"model": args.student, "kwargs": kw},
        "data": {"dataset": "synthetic", "input_size": [3, args.size, args.size], "samples": args.images,
                 "num_classes": args.classes, "batch_size": args.batch},
        "schedule": {"method": "kd", "epochs": args.epochs},
        "optim": {"name": "sgd", "lr": 0.05},
        "runtime": {"device": "cpu", "num_threads": args.threads, "log_every": 1000, "eval_every": 1000},
        "output": str(root / out),
    }
    return load_spec(d)


def epoch_times(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_s"] for r in records if r.get("kind") == "epoch"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="timm:resnet50")
    p.add_argument("--student", default="timm:resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = build_cache(spec(args, root, "build", cache=True), args.epochs, full=args.full, top_k=args.top_k,
                            quiet=True)
        header = read_header(root / "cache")
        tail = None
        if not args.full:
            rows = np.load(shard_path(root / "cache", 0, 0))
            tail = float(1 - rows["p"].astype(np.float32).sum(axis=1).mean())
        t0 = time.perf_counter()
        train(spec(args, root, "live", cache=False))
        live_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        train(spec(args, root, "cached", cache=True))
        cached_wall = time.perf_counter() - t0
        live, cached = epoch_times(root / "live"), epoch_times(root / "cached")
    live_med, cached_med = statistics.median(live[1:] or live), statistics.median(cached[1:] or cached)
    n = len(built.built)
    forward_per_epoch, build_per_epoch = built.teacher_forward_s / n, built.seconds / n
    result = {
        "pair": f"{args.teacher} -> {args.student}", "size": args.size, "images": args.images,
        "batch": args.batch, "threads": args.threads, "mode": built.mode, "k": built.k,
        "live_epoch_s": live, "cached_epoch_s": cached,
        "live_median_s": round(live_med, 3), "cached_median_s": round(cached_med, 3),
        "speedup": round(live_med / cached_med, 2),
        "teacher_share_of_live_epoch": round(forward_per_epoch / live_med, 3),
        "build_s_per_epoch": round(build_per_epoch, 3), "teacher_forward_s_per_epoch": round(forward_per_epoch, 3),
        "build_over_live_teacher_forward": round(build_per_epoch / forward_per_epoch, 3),
        "bytes_per_image_per_epoch": header["bytes_per_row"],
        "mean_mass_outside_top_k": tail and round(tail, 4),
        "live_run_wall_s": round(live_wall, 1), "cached_run_wall_s": round(cached_wall, 1),
    }
    print(f"{result['pair']} at {args.size} px, {args.images} images, batch {args.batch}, {args.threads} threads, "
          f"{built.mode}{'' if args.full else f' k={built.k}'}")
    print(f"  epoch (median of epochs 2-{args.epochs}): live {live_med:.2f} s, cached {cached_med:.2f} s "
          f"-> {live_med / cached_med:.2f}x")
    print(f"  teacher forward: {forward_per_epoch:.2f} s per epoch = {forward_per_epoch / live_med:.0%} of a live epoch")
    print(f"  build: {build_per_epoch:.2f} s per epoch = {build_per_epoch / forward_per_epoch:.2f}x one epoch's "
          f"teacher forwards; {header['bytes_per_row']} bytes per image per epoch"
          + (f"; mean mass outside the top {built.k}: {tail:.3f}" if tail is not None else ""))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
