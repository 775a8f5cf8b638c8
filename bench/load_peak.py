"""Peak memory of loading a dataset into memory (issue 24): a fresh process imports kdgraph,
then builds the in-memory loaders on the CPU (``build_loaders``: create_dataset and
DeviceLoader, as ``kdgraph train`` does) and reports its peak RSS (``ru_maxrss``) above the
peak after the imports, beside the bytes the splits hold and their pixel count (the
bytes data.memory_budget_mb counts: one per pixel value, uint8) and four times that (the
float32 bytes it counted before).

    python bench/load_peak.py                       # Fashion-MNIST (apt-get install dataset-fashion-mnist)
    python bench/load_peak.py --dataset digits

Fashion-MNIST on the CPU (issue 24): 480 MB above the baseline before (float32 splits, 209 MB
held), 61 MB after (uint8, 52 MB held): 1.17x the bytes data.memory_budget_mb counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CHILD = """
import json, resource, sys
import torch
from kdgraph import data
from kdgraph.spec import DataSpec
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
train, test, ds = data.build_loaders(DataSpec(dataset=sys.argv[1]), 0, "cpu")
load = peak() - base
values = ds.train_x.numel() + ds.test_x.numel()
print(json.dumps({"dataset": sys.argv[1], "dtype": str(ds.train_x.dtype).removeprefix("torch."),
                  "baseline_mb": round(base, 1), "load_peak_mb": round(load, 1),
                  "held_mb": round(values * ds.train_x.element_size() / 2**20, 1),
                  "uint8_count_mb": round(values / 2**20, 1), "float32_count_mb": round(4 * values / 2**20, 1),
                  "peak_over_uint8_count": round(load / (values / 2**20), 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    args = parser.parse_args()
    out = subprocess.run([sys.executable, "-c", CHILD, args.dataset], capture_output=True, text=True, check=True)
    print(out.stdout.strip())


if __name__ == "__main__":
    main()
