"""The CUDA tier: skipped without a GPU. Run it with ``pytest -m cuda tests/test_cuda.py``
(``-n 8`` with pytest-xdist runs specs side by side on one GPU).

- Every spec in specs/ trains a few steps of its first and last training stage on CUDA in
  bf16: eager with channels_last on and off, and torch.compile'd. Data is replaced by
  synthetic data of the spec's input size and weights files by random weights: the
  runtime is under test, not the data.
- A decomposed and a merged stage's loss terms in bf16 autocast are within 3 % (relative)
  of the same terms in fp32 on the same weights and batch (bf16 keeps an 8-bit mantissa).
- A run stopped mid-epoch and resumed on CUDA ends bit-identical to an uninterrupted one
  (deterministic algorithms on).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS handle exists

from kdgraph.data import resolve_input_size
from kdgraph.runtime import loop
from kdgraph.runtime.loop import Trainer, TrainingInterrupted, train
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))


def _cuda_overrides(path: Path, compiled: bool, channels_last) -> list[str]:
    spec = load_spec(path)
    c, h, w = resolve_input_size(spec.data)
    classes = spec.student.kwargs.get("num_classes") or spec.data.num_classes or 1000
    sets = [f"data={{dataset: synthetic, input_size: [{c}, {h}, {w}], num_classes: {classes}, samples: 16, "
            "batch_size: 8, augment: none}",
            "runtime.device=cuda", "runtime.precision=bf16", f"runtime.compile={str(compiled).lower()}",
            f"runtime.channels_last={channels_last if isinstance(channels_last, str) else str(channels_last).lower()}",
            "student.checkpoint=", "output=/tmp/kdgraph-cuda-tier/" + path.stem]
    if spec.teacher is not None:
        sets.append("teacher.checkpoint=")
    return sets


@pytest.mark.parametrize("mode", ["eager-cl", "eager-nocl", "compiled"])
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_trains_on_cuda(path, mode):
    compiled = mode == "compiled"
    cl = {"eager-cl": True, "eager-nocl": False, "compiled": "auto"}[mode]
    run = Trainer(load_spec(path, _cuda_overrides(path, compiled, cl), allow_code=True))
    stages = run.compiled.plan.stages
    xb, yb = next(iter(run.data.train.epoch(0)))
    for stage in {stages[0].index: stages[0], stages[-1].index: stages[-1]}.values():
        run.distiller.set_stage(stage)
        run.distiller.train()
        for _ in range(2):
            terms, loss = run.train_step(xb, yb)
        assert math.isfinite(loss.item()), (stage.index, {k: v.item() for k, v in terms.items()})
    torch.cuda.synchronize()


def test_bf16_terms_match_fp32_in_decomposed_and_merged_stages():
    raw = {
        "name": "bf16-vs-fp32", "seed": 0,
        "teacher": {"model": "timm:resnet34", "kwargs": {"num_classes": 10}},
        "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
        "data": {"dataset": "synthetic", "input_size": [3, 64, 64], "num_classes": 10, "samples": 64,
                 "batch_size": 64, "augment": "none"},
        "decompose": {"blocks": 5},
        "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 3},
        "runtime": {"device": "cuda", "precision": "bf16", "channels_last": True},
        "output": "/tmp/kdgraph-cuda-tier/bf16",
    }
    run = Trainer(load_spec(raw))
    xb, yb = next(iter(run.data.train.epoch(0)))
    xb = xb.contiguous(memory_format=torch.channels_last)
    for stage in run.compiled.plan.stages[:2]:  # stage 0: five single blocks; stage 1: merged pairs
        run.distiller.set_stage(stage)
        run.distiller.train()
        with torch.no_grad():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = {k: v.float() for k, v in run.distiller(xb, yb).items()}
            ref = run.distiller(xb, yb)
        assert low.keys() == ref.keys()
        for k in ref:
            rel = abs(low[k].item() - ref[k].item()) / max(abs(ref[k].item()), 1e-6)
            assert rel < 3e-2, (stage.index, k, low[k].item(), ref[k].item())


def test_resume_is_exact_on_cuda(tmp_path, monkeypatch):
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    try:
        def spec(name):
            return load_spec(tiny_spec(tmp_path / name, "stablekd", recompositions=1, epochs=3,
                                       runtime={"device": "cuda", "checkpoint_every": 4, "log_every": 1,
                                                "num_threads": 1}))

        train(spec("a"))
        real_step, calls = loop.Trainer.train_step, {"n": 0}

        def stopping_step(trainer, xb, yb):
            calls["n"] += 1
            if calls["n"] == 7:  # mid-epoch: the loop saves at the next step boundary and stops
                signal.raise_signal(signal.SIGTERM)
            return real_step(trainer, xb, yb)

        monkeypatch.setattr(loop.Trainer, "train_step", stopping_step)
        with pytest.raises(TrainingInterrupted):
            train(spec("b"))
        monkeypatch.setattr(loop.Trainer, "train_step", real_step)
        train(spec("b"), resume=True)
        from safetensors.torch import load_file

        a, b = load_file(str(tmp_path / "a" / "student.safetensors")), load_file(str(tmp_path / "b" / "student.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    finally:
        torch.use_deterministic_algorithms(False)
