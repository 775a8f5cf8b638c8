"""DDP: two gloo ranks on the CPU under torchrun train exactly what the math says.

Why the reference is not "one process with batch 2B": DeviceLoader shards one permutation
by stride, so rank r's batch s holds positions r, r+2, ... of the epoch's order, and the
BatchNorm layers normalise with per-rank batch statistics. DDP therefore computes, per step,
the *average of the two ranks' gradients*, each taken with BN over its own B samples, and
(broadcast_buffers) starts every forward from rank 0's BN buffers. A single process with 2B
samples would normalise over 2B and differ legitimately.

So the independent reference is a single-process emulation of that math, built from the
same seed like the ``Trainer``: for every step, the rank-1 shard's gradient (from rank 0's
buffers, whose update is then discarded), the rank-0 shard's gradient (its buffer update is
kept), their mean fed to the same optimizer and LR schedule. The DDP run through the real
loop (``torchrun -m kdgraph train``, the README's launch command) must export the same student and rank 0 must log the
same per-step losses. The emulation runs with the spec's thread count (as the ``Trainer``
does): CPU conv reductions, and so the last bits, depend on it, and eight SGD steps with
momentum amplify a last-bit difference to ~1e-4.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _runtime_helpers import ROOT, cli_env, tiny_spec, write_spec

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _spec_dict(out, method):
    # stablekd: 2 training stages over 2 epochs (set_stage under DDP); kd+mse: unused
    # parameters (the lower adapters) under find_unused_parameters
    kw = {"recompositions": 1} if method == "stablekd" else {}
    # bn_recalibrate off: rank 0 re-estimates BN statistics before evaluating, outside the
    # DDP step; the emulation models the step only
    # adapters in_path: the emulation writes out the adapters' DDP math (the projected mode's
    # fit under DDP is test_projection.py's test_two_gloo_ranks_fit_the_projection_...)
    return tiny_spec(out, method, epochs=2, fraction=0.1, batch_size=16,
                     optim={"lr_schedule": "stage_cyclic" if method == "stablekd" else "cosine"},
                     runtime={"bn_recalibrate": False}, decompose={"adapters": "in_path"}, **kw)


def _emulate(spec_dict, out: Path):
    """The two-rank DDP step, computed in one process (see the module docstring)."""
    from kdgraph.spec import load_spec

    spec = load_spec(spec_dict)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.runtime.num_threads)  # as the Trainer: conv reductions depend on it
    try:
        return _emulate_steps(spec, out)
    finally:
        torch.set_num_threads(threads)


def _emulate_steps(spec, out: Path):
    from kdgraph.compiler import compile_spec
    from kdgraph.data import build_loaders
    from kdgraph.runtime.distiller import Distiller
    from kdgraph.runtime.export import export_student
    from kdgraph.runtime.steps import optimizer_params
    from kdgraph.runtime.techniques import DistInfo, build_optimizer
    from kdgraph.schedules import build_lr_scheduler, stage_at
    from kdgraph.data import build_data

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    compiled = compile_spec(spec)
    cpu = torch.device("cpu")
    if spec.data.dataset == "imagefolder":  # streamed: each rank's StreamLoader, as the Trainer makes it
        loaders = [build_data(spec, compiled.data, cpu, DistInfo(rank=r, world_size=2)).train for r in (0, 1)]
    else:
        loaders = [build_loaders(spec.data, spec.seed, cpu, r, 2)[0] for r in (0, 1)]
    d = Distiller(compiled)
    params = [p for p in d.parameters() if p.requires_grad]
    opt = build_optimizer(spec.optim, optimizer_params(spec.optim, d), cpu)
    sched = build_lr_scheduler(opt, spec.optim.lr_schedule, spec.optim.lr,
                               [st.epochs for st in compiled.plan.stages], len(loaders[0]), spec.optim.min_lr_ratio)
    rank0_losses = []
    for epoch in range(compiled.plan.epochs):
        stage = compiled.plan.stages[stage_at([st.epochs for st in compiled.plan.stages], epoch)]
        d.set_stage(stage)
        d.train()
        for (x0, y0), (x1, y1) in zip(loaders[0].epoch(epoch), loaders[1].epoch(epoch)):
            buffers = {k: v.clone() for k, v in d.state_dict().items() if "running" in k or "num_batches" in k}
            g1 = torch.autograd.grad(sum(d(x1, y1).values()), params, allow_unused=True)
            d.load_state_dict(buffers, strict=False)  # rank 1's buffer update is not kept
            terms = d(x0, y0)
            loss = sum(terms.values())
            g0 = torch.autograd.grad(loss, params, allow_unused=True)
            for p, a, b in zip(params, g0, g1):
                p.grad = None if a is None and b is None else (
                    (a if a is not None else torch.zeros_like(p)) + (b if b is not None else torch.zeros_like(p))) / 2
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            rank0_losses.append(round(loss.item(), 6))
    export_student(d.eval(), compiled, out / "student.safetensors")
    return rank0_losses, len(loaders[0])


def _stream_spec_dict(out, root):
    """kd on an image folder, streamed by one worker per rank (DistributedSampler-style shards
    of EpochSampler); mean/std given, so that no rank estimates its own."""
    from test_stream import folder_spec

    spec = folder_spec(root, out, epochs=2, workers=1, mean=[0.5], std=[0.25], augment="crop+flip")
    spec["runtime"]["bn_recalibrate"] = False
    return spec


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("method", ["stablekd", "kd+mse", "stream"])
def test_two_gloo_ranks_match_single_process_math(tmp_path, method):
    if method == "stream":
        from test_stream import write_folder

        spec = _stream_spec_dict(tmp_path / "ddp", write_folder(tmp_path / "images", train=12))
    else:
        spec = _spec_dict(tmp_path / "ddp", method)
    spec_path = write_spec(spec, tmp_path / "spec.yaml")
    res = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "kdgraph",
                          "train", str(spec_path), "--quiet"],
                         cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    (tmp_path / "ref").mkdir()
    losses, steps_per_epoch = _emulate(spec, tmp_path / "ref")

    recs = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["global_step"] for r in steps] == list(range(1, 2 * steps_per_epoch + 1))  # one writer: rank 0
    assert len([r for r in recs if r["kind"] == "epoch"]) == 2
    assert [r["loss"] for r in steps] == pytest.approx(losses, abs=2e-6)

    got = load_file(str(tmp_path / "ddp" / "student.safetensors"))
    ref = load_file(str(tmp_path / "ref" / "student.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6, rtol=1e-5), k
