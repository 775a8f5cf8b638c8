"""kdgraph.runtime.config: the runtime settings resolved once from the run's records, and the
batch mix (consistent teaching) as a function of (seed, epoch, position).

Independent truths: the values written in the spec (each resolved field traced back to the
section it comes from), the machine rules stated in techniques (channels_last and cuDNN
autotuning never on the CPU unless asked), and mixup's own definition: a mixed batch is
lam * x + (1 - lam) * x.flip(0) with targets mixed by the same lam, the same for the same
(seed, epoch, position) and drawn anew for another position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _runtime_helpers import tiny_spec
from kdgraph.compiler import resolve_run
from kdgraph.runtime.config import resolve_config
from kdgraph.spec import load_spec

CPU = torch.device("cpu")
CONV = nn.Sequential(nn.Conv2d(1, 4, 3))


def _run(**sections):
    return resolve_run(load_spec(tiny_spec("runs/cfg", "kd", batch_size=24, **sections)))


def test_each_setting_comes_from_its_section():
    run = _run(seed=7, optim={"clip_grad_norm": 2.5},
               runtime={"micro_batches": 3, "log_every": 5, "checkpoint_every": 11, "eval_every": 2,
                        "log": "tensorboard", "bn_recalibrate": True, "bn_recalibrate_batches": 4,
                        "track_stability": True, "precision": "fp32", "deterministic": True})
    cfg = resolve_config(run, CPU, CONV)
    assert (cfg.device, cfg.precision, cfg.micro_batches, cfg.clip_grad_norm, cfg.batch_size) == (CPU, "fp32", 3, 2.5, 24)
    assert (cfg.log_every, cfg.checkpoint_every, cfg.eval_every, cfg.seed) == (5, 11, 2, 7)
    assert (cfg.tensorboard, cfg.bn_recalibrate, cfg.bn_recalibrate_batches, cfg.track_stability) == (True, True, 4, True)
    assert (cfg.deterministic, cfg.cudnn_benchmark, cfg.compile, cfg.mixup) == (True, False, False, None)
    plain = resolve_config(_run(), CPU, CONV)
    assert (plain.tensorboard, plain.clip_grad_norm, plain.deterministic) == (False, None, False)


def test_channels_last_auto_is_off_on_the_cpu_and_as_asked_otherwise():
    assert resolve_config(_run(), CPU, CONV).channels_last is False  # auto, on the CPU
    assert resolve_config(_run(runtime={"channels_last": True}), CPU, CONV).channels_last is True


def test_without_mixup_a_batch_is_passed_as_it_came():
    cfg = resolve_config(_run(), CPU, CONV)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    mx, my = cfg.mix(x, y, epoch=0, position=0, num_classes=10)
    assert mx is x and my is y


def test_mixup_is_a_convex_mix_with_the_flipped_batch_drawn_from_seed_epoch_and_position():
    cfg = resolve_config(_run(data={"mixup": {"mixup_alpha": 0.4}}, loss={"label_smoothing": 0.0}), CPU, CONV)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])
    mx, my = cfg.mix(x, y, epoch=2, position=5, num_classes=10)
    # lam from the targets: the first sample's own class holds lam, its partner's (y.flip(0)[0] = 5) 1 - lam
    lam = my[0, 0].item()
    assert my[0, 5].item() == pytest.approx(1 - lam, abs=1e-6) and 0.0 <= lam <= 1.0
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x.flip(0))
    again = cfg.mix(x, y, epoch=2, position=5, num_classes=10)
    assert torch.equal(again[0], mx) and torch.equal(again[1], my)
    lams = {round(cfg.mix(x, y, epoch=e, position=p, num_classes=10)[1][0, 0].item(), 6)
            for e, p in ((2, 5), (2, 6), (3, 5), (0, 0))}
    assert len(lams) == 4  # another epoch or another position: another draw (Beta(0.4, 0.4) is continuous)
