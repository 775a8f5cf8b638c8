"""The runtime's settings, resolved once from the run's records: what the training step and
the loop read.

    resolve_config(run, device, model) -> RuntimeConfig

``auto`` values that depend on the machine or the model (channels_last) are decided here;
``bn_recalibrate: auto`` stays ``auto`` because it depends on the training stage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import torch

from kdgraph.runtime.techniques import use_channels_last, use_cudnn_benchmark
from kdgraph.transforms import MixupCutmix

if TYPE_CHECKING:
    from kdgraph.compiler import RunRecord


@dataclass(frozen=True)
class RuntimeConfig:
    device: torch.device
    precision: str  # autocast: see techniques.autocast_dtype
    channels_last: bool
    compile: bool
    deterministic: bool  # torch's deterministic algorithms; no cuDNN autotuning
    cudnn_benchmark: bool  # cuDNN autotuning: on CUDA unless deterministic
    micro_batches: int  # a batch is split into this many parts, one optimizer step
    clip_grad_norm: float | None
    batch_size: int  # per rank
    log_every: int  # optimizer steps between step records (each one host sync)
    checkpoint_every: int  # optimizer steps between mid-epoch checkpoints; 0: none (every epoch ends with one)
    eval_every: int  # epochs between evaluations (the last epoch always has one)
    bn_recalibrate: bool | Literal["auto"]  # auto: where the stage trained more than one group
    bn_recalibrate_batches: int | None  # training batches the re-estimate reads; None: an epoch
    track_stability: bool
    tensorboard: bool
    seed: int  # keys the per-batch draws of mixup
    # consistent teaching: the one batch teacher and student see is mixed (None: off); the CE
    # term's label smoothing applies to the mixed targets, so the mix itself adds none
    mixup: MixupCutmix | None = None
    shard_student: bool = False  # FSDP2 over the ranks instead of DDP; DCP checkpoints
    shard_dtype: str = "float32"  # FSDP2's mixed-precision policy: the gathered parameters' dtype
    activation_checkpointing: bool = False  # the student's repeated layers recompute their activations

    def __str__(self) -> str:
        return "\n".join(f"{f.name}: {getattr(self, f.name)}" for f in fields(self))

    def mix(self, xb: torch.Tensor, yb: torch.Tensor, epoch: int, position: int,
            num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``position`` (step * world size + rank) of ``epoch`` as the step sees it:
        mixed by ``mixup`` (a function of seed, epoch and position), else as it came. The
        trainer and the teacher-cache builder both call this, so a cache holds the teacher's
        logits of the mixed batch the live teacher reads."""
        if self.mixup is None:
            return xb, yb
        return self.mixup(xb, yb, self.seed, epoch, [position], num_classes)


def resolve_config(run: RunRecord, device: torch.device, model: torch.nn.Module) -> RuntimeConfig:
    """The settings of the run ``run`` on ``device`` for the student ``model``."""
    rt = run.runtime
    return RuntimeConfig(
        device=device, precision=rt.precision, channels_last=use_channels_last(rt.channels_last, model, device),
        compile=rt.compile, deterministic=rt.deterministic,
        cudnn_benchmark=use_cudnn_benchmark(device, rt.deterministic), micro_batches=rt.micro_batches, clip_grad_norm=run.optim.clip_grad_norm,
        batch_size=run.data.batch_size, log_every=rt.log_every, checkpoint_every=rt.checkpoint_every,
        eval_every=rt.eval_every, bn_recalibrate=rt.bn_recalibrate,
        bn_recalibrate_batches=rt.bn_recalibrate_batches, track_stability=rt.track_stability,
        tensorboard=rt.log == "tensorboard", seed=run.seed,
        mixup=None if run.data.mixup is None else MixupCutmix(**run.data.mixup.model_dump(), label_smoothing=0.0),
        shard_student=rt.shard_student, shard_dtype=rt.shard_dtype, activation_checkpointing=rt.activation_checkpointing)
