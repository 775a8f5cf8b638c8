"""The CUDA tier, and the same harness on the CPU so that CI catches its bugs without a GPU.

- Every spec in specs/ trains a few steps of its first and last training stage: eager with
  channels_last on and off, and torch.compile'd. Data is replaced by synthetic data of the
  spec's input size (per-pixel labels where the student predicts per pixel), weights files
  and pretrained weights by random weights: the runtime is under test, not the data, and
  nothing is downloaded.
  CUDA (``pytest -m cuda tests/test_cuda.py``, ``-n 8`` with pytest-xdist runs cases side by
  side on one GPU): batch 8, bf16, inductor. CPU (always): the same overrides at batch 2;
  compiled cases run Dynamo with its ``eager`` backend: the graph capture, guards and
  recompiles inductor would see, without AOT autograd or code generation (``aot_eager`` took
  twice as long, inductor's C++ build a minute or more per graph on a CPU core), and the
  quickstart pair's first stage compiles with inductor itself (slow).
  Every case starts from an empty compile cache and fails if Dynamo hits its recompile limit
  (it would otherwise run the rest eager and say so once in a warning).
- A decomposed and a merged stage's loss terms in bf16 autocast are within 3 % (relative)
  of the same terms in fp32 on the same weights and batch (bf16 keeps an 8-bit mantissa).
  These two run on the CPU as well.
- A run stopped mid-epoch and resumed ends bit-identical to an uninterrupted one
  (deterministic algorithms on).
"""

from __future__ import annotations

import functools
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
from kdgraph.runtime.techniques import RecompileWatch, reset_compile_caches
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
skip_without_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_cuda = [pytest.mark.cuda, skip_without_cuda]

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))
# mode -> (runtime.compile, runtime.channels_last)
MODES = {"eager-cl": (False, True), "eager-nocl": (False, False), "compiled": (True, "auto")}
BATCH = {"cuda": 8, "cpu": 2}
# Under 40 s a case on one CPU thread, most under 10, for all but these (224-px Swin-S: 16-42 s).
SLOW_ON_CPU = {"swin_small-to-resnet18", "swin_small-to-swin_tiny"}
# The CPU case that compiles with inductor: the smallest KD pair's first stage, one step
# (C++ code generation from a cold cache on a loaded 2-core machine: 68 s, 163 s with the last
# stage too; the eager backend checks every stage's capture and recompiles).
INDUCTOR_ON_CPU = ["quickstart"]


def tier_overrides(path: Path, mode: str, device: str, output: Path) -> list[str]:
    """The tier's --set overrides of one spec: synthetic data of the spec's input size (two
    batches; a causal LM: random text the tier writes), the device, bf16, the mode's compile and
    channels_last, and random weights in
    place of weights files and pretrained weights, no judging classifier for a denoiser (the
    tier never reads data, weights or the network)."""
    spec = load_spec(path)
    compiled, channels_last = MODES[mode]
    c, h, w = resolve_input_size(spec.data)
    classes = spec.student.kwargs.get("num_classes") or spec.data.num_classes or 1000
    batch = BATCH[device]
    data = (f"data={{dataset: synthetic, input_size: [{c}, {h}, {w}], num_classes: {classes}, "
            f"samples: {2 * batch}, batch_size: {batch}, augment: none}}")
    if spec.data.dataset == "text":  # a causal LM: random bytes of text written here, windows of 16 tokens
        root = Path(output).parent / "tier-text"
        root.mkdir(parents=True, exist_ok=True)
        (root / "t.txt").write_bytes(bytes(torch.randint(32, 127, (4096,), generator=torch.Generator().manual_seed(0))
                                           .tolist()))
        data = f"data={{dataset: text, root: {root}, seq_len: 16, batch_size: {batch}}}"
    sets = [data,
            f"runtime.device={device}", "runtime.precision=bf16", f"runtime.compile={str(compiled).lower()}",
            f"runtime.channels_last={str(channels_last).lower()}", f"output={output}"]
    for role in ("teacher", "student"):
        model = getattr(spec, role)
        if model is None:
            continue
        if model.checkpoint is not None:
            sets.append(f"{role}.checkpoint=")
        if model.pretrained:
            sets.append(f"{role}.pretrained=false")
    if getattr(spec, "denoise", None) is not None and spec.denoise.judge is not None:
        sets.append("denoise.judge=null")  # a finished classifier run: weights the tier does not read
    return sets


def tier_batch(run) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The run's first training batch as its step reads it: (input, target, side inputs). A
    denoiser's batch is prepared as the Trainer prepares it (noisy images, their noise, the
    timestep and class drawn per sample); per-pixel labels (B, H, W) on the logits' grid where
    the student predicts per pixel (a U-Net), since synthetic data has one label per image."""
    xb, yb, idx = next(iter(run.batches(0)))
    if run.task.indexed:  # a denoiser: its own batch
        return run.prepare(xb, yb, idx, 0, 0)
    student = run.compiled.student
    if student.per_pixel:
        g = torch.Generator().manual_seed(0)
        grid = tuple(student.output_shape[2:])
        yb = torch.randint(0, student.num_classes, (len(yb), *grid), generator=g).to(yb.device)
    return xb, yb, ()


def run_tier_case(path: Path, mode: str, device: str, output: Path, steps: int = 2, last_stage: bool = True) -> None:
    """``steps`` steps of the first and (``last_stage``) the last training stage; every loss
    finite and equal to the sum of its terms, each stage's steps moving the parameters it trains
    and leaving the frozen teacher as it was, no recompile-limit hit (a fresh compile cache
    first: earlier cases' entries would count)."""
    reset_compile_caches()
    with RecompileWatch(strict=True) as watch:
        run = Trainer.from_spec(load_spec(path, tier_overrides(path, mode, device, output), allow_code=True))
        stages = run.compiled.plan.stages
        xb, yb, side = tier_batch(run)
        teacher = run.distiller.teacher
        frozen = {k: v.clone() for k, v in teacher.model.state_dict().items()} if teacher is not None else {}
        for stage in [stages[0]] + ([stages[-1]] if last_stage and len(stages) > 1 else []):
            run.distiller.set_stage(stage)
            run.distiller.train()
            trained = [p for p in run.distiller.parameters() if p.requires_grad]
            before = [p.detach().clone() for p in trained]
            for _ in range(steps):
                terms, loss = run.train_step(xb, yb, side=side)
            assert math.isfinite(loss.item()), (stage.index, {k: v.item() for k, v in terms.items()})
            torch.testing.assert_close(loss.float(), sum(t.float() for t in terms.values()), rtol=1e-3, atol=1e-4)
            assert any(not torch.equal(p.detach(), b) for p, b in zip(trained, before)), stage.index
        if teacher is not None:
            assert all(torch.equal(v, frozen[k]) for k, v in teacher.model.state_dict().items())
        if device == "cuda":
            torch.cuda.synchronize()
    assert watch.hits == 0, f"recompile limit hit (ran eager from there): {watch.functions}"
    reset_compile_caches()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_tier_overrides_read_no_weights_no_data_and_no_network(path, tmp_path):
    for device in BATCH:
        spec = load_spec(path, tier_overrides(path, "compiled", device, tmp_path), allow_code=True)
        models = [m for m in (spec.teacher, spec.student) if m is not None]
        assert [(m.checkpoint, m.pretrained) for m in models] == [(None, False)] * len(models)
        stand_in = "text" if load_spec(path).data.dataset == "text" else "synthetic"  # text: written by the tier
        assert (spec.data.dataset, spec.data.batch_size, spec.runtime.device) == (stand_in, BATCH[device], device)


def _cpu_cases():
    for path in SPECS:
        for mode in MODES:
            marks = [pytest.mark.slow] if path.stem in SLOW_ON_CPU else []
            yield pytest.param(path, mode, id=f"{path.stem}-{mode}", marks=marks)


@pytest.mark.cuda
@skip_without_cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_trains_on_cuda(path, mode, tmp_path):
    run_tier_case(path, mode, "cuda", tmp_path)


@pytest.mark.parametrize("path, mode", list(_cpu_cases()))
def test_every_spec_trains_on_cpu(path, mode, tmp_path, monkeypatch):
    # the runtime calls torch.compile(module): Dynamo's eager backend for this test
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run_tier_case(path, mode, "cpu", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stem", INDUCTOR_ON_CPU)
def test_smallest_specs_train_compiled_by_inductor_on_cpu(stem, tmp_path):
    path = next(p for p in SPECS if p.stem == stem)
    run_tier_case(path, "compiled", "cpu", tmp_path, steps=1, last_stage=False)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda), "cpu"])
def test_bf16_terms_match_fp32_in_decomposed_and_merged_stages(device, tmp_path):
    raw = {
        "name": "bf16-vs-fp32", "seed": 0,
        "teacher": {"model": "timm:resnet34", "kwargs": {"num_classes": 10}},
        "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
        "data": {"dataset": "synthetic", "input_size": [3, 64, 64], "num_classes": 10, "samples": 64,
                 "batch_size": 64 if device == "cuda" else 8, "augment": "none"},
        "decompose": {"blocks": 5},
        "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 3},
        "runtime": {"device": device, "precision": "bf16", "channels_last": True},
        "output": str(tmp_path),
    }
    run = Trainer.from_spec(load_spec(raw))
    xb, yb = next(iter(run.data.train.epoch(0)))
    xb = xb.contiguous(memory_format=torch.channels_last)
    for stage in run.compiled.plan.stages[:2]:  # stage 0: five single blocks; stage 1: merged pairs
        run.distiller.set_stage(stage)
        run.distiller.train()
        with torch.no_grad():
            with torch.autocast(device, dtype=torch.bfloat16):
                low = {k: v.float() for k, v in run.distiller(xb, yb).items()}
            ref = run.distiller(xb, yb)
        assert low.keys() == ref.keys()
        for k in ref:
            rel = abs(low[k].item() - ref[k].item()) / max(abs(ref[k].item()), 1e-6)
            assert rel < 3e-2, (stage.index, k, low[k].item(), ref[k].item())


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda), "cpu"])
def test_resume_is_exact(device, tmp_path, monkeypatch):
    torch.use_deterministic_algorithms(True, warn_only=False)
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        def spec(name):
            return load_spec(tiny_spec(tmp_path / name, "stablekd", recompositions=1, epochs=3,
                                       runtime={"device": device, "checkpoint_every": 4, "log_every": 1,
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
        torch.backends.cudnn.benchmark = benchmark
        torch.set_num_threads(threads)  # the spec's runtime.num_threads would leak into later tests


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda), "cpu"])
def test_half_teacher_runs_in_its_dtype_inside_the_run(device, tmp_path):
    """teacher.dtype: bfloat16 on the device, channels_last and the run's autocast on: the
    teacher's logits are the teacher cast by hand (computed outside autocast), and training
    steps run. (teacher.shard is tested on two gloo ranks of the CPU: tests/test_big_teacher.py.)"""
    import copy

    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.distiller import frozen_teacher

    raw = tiny_spec(tmp_path, "stablekd", runtime={"device": device, "precision": "bf16", "channels_last": True})
    raw["teacher"]["dtype"] = "bfloat16"
    compiled = compile_spec(load_spec(raw))
    ref = copy.deepcopy(compiled.teacher.model).eval().to(device, torch.bfloat16)
    teacher = frozen_teacher(compiled)
    teacher.apply_(lambda t: t.to(device))
    x = torch.randn(8, 1, 8, 8, device=device)
    with torch.no_grad():
        want = ref(x.bfloat16()).float()
    with torch.autocast(device, dtype=torch.bfloat16):
        got = teacher(x)
    tol = 0 if device == "cpu" else 1e-2  # cuDNN may pick another algorithm per call
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    run = Trainer.from_spec(load_spec(raw))
    for stage in run.compiled.plan.stages:
        run.distiller.set_stage(stage)
        run.distiller.train()
        xb, yb = next(iter(run.data.train.epoch(stage.index)))
        run.train_step(xb, yb)
    assert all(p.dtype == torch.bfloat16 for p in run.distiller.teacher.model.parameters())


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda), "cpu"])
def test_prefetched_batches_equal_the_batches_loaded_in_order(device):
    """kdgraph.stream.prefetched: on CUDA the next batch is copied from pinned memory and
    normalised on a side stream while the main stream is busy (a long ``_sleep`` stands for
    the step); every batch the consumer reads still equals the one loaded in order, with no
    side stream: the handover waits for the copy, and the allocator does not hand a batch's
    memory to the next one while the step reads it."""
    from kdgraph.stream import prefetched

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    host = [torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=gen) for _ in range(6)]
    if dev.type == "cuda":
        host = [x.pin_memory() for x in host]

    def load(x):
        return (x.to(dev, non_blocking=True).float().sub_(127.5).div_(64.0),)

    want = [(x.float() - 127.5) / 64.0 for x in host]
    got = []
    for (batch,) in prefetched(iter(host), load, dev):
        if dev.type == "cuda":
            torch.cuda._sleep(50_000_000)  # the step, on the main stream, while the next batch loads
        got.append((batch * 1).cpu())
        del batch
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
