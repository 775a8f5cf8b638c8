"""Shared fixtures: cached timm models and traced models (tracing is the slow part of most tests).

``timm_model(name, size)`` builds a small random-weight timm model (num_classes=10) at a
small input where the architecture allows it; ``traced_timm(name)`` returns (model, traced,
cuts, stages), each computed once per session. Tests must not mutate what they get back
(copy.deepcopy it first when they need to).
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch

# One intra-op thread: the test inputs are tiny, and with the cores shared (a loaded CI box,
# parallel sessions) OpenMP's spinning threads made a densenet121 forward at 64x64 take 5 s
# instead of 0.04 s. KDGRAPH_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("KDGRAPH_TEST_THREADS", "1")))

# Input size per timm model family: small where the model accepts it.
# ViT / DeiT / Mixer / Swin need their img_size given to timm as well.
SMALL = 64


def timm_kwargs(name: str) -> tuple[dict, int]:
    """(timm kwargs, input side) that keep ``name`` small and fast."""
    kw: dict = {"num_classes": 10}
    if name.startswith(("vit_", "deit_", "mixer_", "levit_")):
        kw["img_size"] = SMALL
    if name.startswith("swin_"):
        kw.update(img_size=SMALL, window_size=2)
    return kw, SMALL


@functools.lru_cache(maxsize=None)
def timm_model(name: str, **extra) -> torch.nn.Module:
    import timm

    kw, _ = timm_kwargs(name)
    kw.update(extra)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, **kw).eval()


@functools.lru_cache(maxsize=None)
def traced_timm(name: str):
    """(model, traced, cuts, stages) of timm model ``name`` at its small input size."""
    from kdgraph.compiler.cuts import find_cuts
    from kdgraph.compiler.stages import find_stages
    from kdgraph.compiler.trace import trace

    model = timm_model(name)
    _, side = timm_kwargs(name)
    traced = trace(model, (3, side, side))
    cuts = find_cuts(traced)
    return model, traced, cuts, find_stages(cuts, traced)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    """With KDGRAPH_TEST_JSONL set, one JSON line per test outcome appended there as it comes
    (bench/gpu/driver.py reads it: a part killed at its time limit keeps what finished)."""
    path = os.environ.get("KDGRAPH_TEST_JSONL")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist's controller writes its workers' reports
        return
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    import json

    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "seconds": round(report.duration, 2)}) + "\n")
