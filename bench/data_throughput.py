"""Data-path throughput: the same KD pair trained the same number of steps from a real image
folder, once through the in-memory loader (DeviceLoader) and once streamed (StreamLoader).

The pair is kdgraph's zoo ResNets at 1x32x32 (teacher widths 16-32-64, student 8-16-32),
method kd, batch 128, on the CPU. The folder is Fashion-MNIST written as PNG files (root/train/<class>/*.png, root/val/...),
at two sizes (6k and 24k training images by default; 1k val). For each folder size and
path, a fresh process builds the run exactly as ``kdgraph train`` does (Trainer), trains
``--warmup`` steps, then times ``--steps`` steps of the Trainer's train_step on the loader's
batches, and reports images/s and peak RSS (the training process, and its worker
processes). Each measurement is repeated ``--repeats`` times, interleaved; the table shows
medians. The machine is shared, so single numbers are noisy.

    python bench/data_throughput.py                       # 6k and 24k images, 32 px, 2 workers
    python bench/data_throughput.py --sizes 6000 --repeats 1 --steps 10
    python bench/data_throughput.py --device cuda --side 224 --workers 8   # on a GPU

Also printed: the streamed loader alone (decoding + augmentation on the workers, no
training), the headroom of the streaming path over the training step. Results (one JSON
line per measurement, then one summary line) go to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_folder(root: Path, n_train: int, n_val: int, fashion: Path = FASHION) -> Path:
    """Fashion-MNIST's first n_train training and n_val test images (IDX files under
    ``fashion``) as PNGs (once; reused)."""
    from PIL import Image

    from kdgraph.data import read_idx

    done = root / ".complete"
    if done.exists():
        return root
    x_tr, y_tr = read_idx(str(fashion / "train-images-idx3-ubyte.gz")), read_idx(str(fashion / "train-labels-idx1-ubyte.gz"))
    x_te, y_te = read_idx(str(fashion / "t10k-images-idx3-ubyte.gz")), read_idx(str(fashion / "t10k-labels-idx1-ubyte.gz"))
    for split, x, y, n in (("train", x_tr, y_tr, n_train), ("val", x_te, y_te, n_val)):
        for i in range(n):
            folder = root / split / f"class{int(y[i]):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(x[i])).save(folder / f"{i:06d}.png")
    done.write_text("")
    return root


def spec_dict(root: Path, loader: str, args) -> dict:
    zoo = "module:kdgraph.zoo:"
    kw = {"num_classes": 10, "in_chans": 1}
    return {
        "name": f"data-{loader}",
        # a light pair (teacher 16-32-64, student 8-16-32 channels): the lighter the step, the
        # more a slow data path shows
        "teacher": {"model": zoo + "resnet_tiny_student", "kwargs": kw},
        "student": {"model": zoo + "resnet_tiny", "kwargs": {**kw, "widths": [8, 16, 32]}},
        "data": {"dataset": "imagefolder", "root": str(root), "input_size": [1, args.side, args.side],
                 "batch_size": args.batch, "loader": loader},
        "decompose": {"blocks": 4},
        "schedule": {"method": "kd", "epochs": 1},
        "runtime": {"device": args.device, "num_threads": args.threads, "num_workers": args.workers},
        "output": str(root.parent / f"run-{loader}"),
    }


def measure(root: Path, loader: str, args) -> dict:
    """One measurement, in this (fresh) process: images/s over args.steps steps, peak RSS."""
    import torch

    from kdgraph.runtime.loop import Trainer
    from kdgraph.spec import load_spec

    spec = load_spec(spec_dict(root, loader, args))
    t0 = time.perf_counter()
    run = Trainer.from_spec(spec)
    build_s = time.perf_counter() - t0
    run.distiller.set_stage(run.compiled.plan.stages[0])
    run.distiller.train()
    need = args.warmup + args.steps

    def batches():
        epoch = 0
        while True:
            yield from run.data.train.epoch(epoch)
            epoch += 1

    it = batches()
    images, t_start, waited = 0, None, 0.0
    for i in range(need):
        if i == args.warmup:
            t_start = time.perf_counter()
        t_wait = time.perf_counter()
        xb, yb = next(it)
        if i >= args.warmup:
            images += len(yb)
            waited += time.perf_counter() - t_wait
        run.train_step(xb, yb)
    if run.config.device.type == "cuda":
        torch.cuda.synchronize()  # the steps are queued, not done
    elapsed = time.perf_counter() - t_start
    train_ips = images / elapsed
    # the loader alone: how fast batches arrive when nothing trains
    t0, n = time.perf_counter(), 0
    for _ in range(args.steps):
        n += len(next(it)[1])
    loader_ips = n / (time.perf_counter() - t0)
    it.close()
    run = None  # drop the run and its loaders: persistent workers stop with them
    gc.collect()  # persistent workers stop with their loader: their peak RSS lands in RUSAGE_CHILDREN
    time.sleep(0.5)
    return {"loader": loader, "train_images": len(list((root / "train").rglob("*.png"))),
            "images_per_s": round(train_ips, 1), "loader_only_images_per_s": round(loader_ips, 1),
            # share of the timed steps spent waiting for the next batch (the rest: training)
            "data_wait_share": round(waited / elapsed, 3),
            "build_s": round(build_s, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "threads": args.threads, "workers": args.workers if loader == "stream" else 0,
            "torch_threads_seen": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[6000, 24000], help="training images per folder")
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--side", type=int, default=32, help="input side (Fashion-MNIST is 28 px)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--workers", type=int, default=2, help="runtime.num_workers of the streaming path")
    p.add_argument("--device", default="cpu", help="cpu (the goal's setting) or cuda (a GPU: decoding overlaps training)")
    p.add_argument("--root", type=Path, default=FASHION, help="Fashion-MNIST's IDX files (default Debian's)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/kdgraph-bench-fashion-png"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data-throughput.jsonl")
    p.add_argument("--measure", nargs=2, metavar=("ROOT", "LOADER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args)))
        return

    rows = []
    passthrough = ["--side", str(args.side), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--workers", str(args.workers),
                   "--device", args.device]
    for size in args.sizes:
        root = write_folder(args.cache / f"n{size}" / "images", size, args.val, args.root)
        for r in range(args.repeats):
            for loader in ("memory", "stream"):  # interleaved: drifting load hits both alike
                res = subprocess.run([sys.executable, __file__, "--measure", str(root), loader, *passthrough],
                                     capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    sys.exit(f"measuring {loader} on {root} failed:\n{res.stderr[-4000:]}")
                row = {**json.loads(res.stdout.strip().splitlines()[-1]), "repeat": r}
                print(json.dumps(row), flush=True)
                rows.append(row)

    def med(size, loader, key):
        return statistics.median(r[key] for r in rows if r["train_images"] == size and r["loader"] == loader)

    print(f"\n{'train images':>12} | {'memory img/s':>12} | {'stream img/s':>12} | {'ratio':>5} | "
          f"{'stream loader alone':>19} | {'stream waits':>12} | {'RSS memory MB':>13} | {'RSS stream MB (+workers)':>24}")
    summary = []
    for size in args.sizes:
        m, s = med(size, "memory", "images_per_s"), med(size, "stream", "images_per_s")
        line = {"train_images": size, "memory_images_per_s": m, "stream_images_per_s": s,
                "ratio": round(s / m, 3), "stream_loader_only_images_per_s": med(size, "stream", "loader_only_images_per_s"),
                "memory_peak_rss_mb": med(size, "memory", "peak_rss_mb"),
                "stream_peak_rss_mb": med(size, "stream", "peak_rss_mb"),
                "stream_data_wait_share": med(size, "stream", "data_wait_share"),
                "stream_worker_peak_rss_mb": med(size, "stream", "worker_peak_rss_mb")}
        summary.append(line)
        print(f"{size:>12,} | {m:>12.1f} | {s:>12.1f} | {s / m:>5.2f} | {line['stream_loader_only_images_per_s']:>19.1f} | "
              f"{line['stream_data_wait_share']:>12.1%} | "
              f"{line['memory_peak_rss_mb']:>13.0f} | {line['stream_peak_rss_mb']:>10.0f} (+{line['stream_worker_peak_rss_mb']:.0f} each)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("measure", "cache", "out", "root")}
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"summary": summary, "config": config, "median_of": args.repeats}) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
