"""Distillation losses: small modules with one job each.

All of them compute in float32 whatever the surrounding autocast says: the inputs are
cast up and autocast is switched off inside, because softmax/log and squared errors of
bf16 activations lose the small differences distillation is made of. Teacher tensors
are detached: gradients never flow into the teacher.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KLDivergence", "FeatureMSE", "HeadLoss", "no_autocast"]


def no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Losses in float32 whatever the caller's autocast (meta tensors, shapes only, have none)."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def per_sample(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits as they are; dense (B, C, *spatial) logits as (B*H*W, C), one row per pixel."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


class KLDivergence(nn.Module):
    """Hinton's KD term: ``T^2 * mean_batch sum_c p_t (log p_t - log p_s)``.

    ``p = softmax(logits / T)``; the ``T^2`` keeps the gradient scale independent of T.
    Inputs are (B, C) logits, or dense (B, C, H, W) logits of a per-pixel task: there each
    pixel is a sample, and the sum over classes is averaged over B*H*W pixels. The result is
    a float32 scalar.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        student_logits, teacher_logits = per_sample(student_logits), per_sample(teacher_logits)
        with no_autocast(student_logits):
            log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
            log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
            kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
            return kl * (t * t)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class FeatureMSE(nn.Module):
    """Mean squared error over every element between a (projected) student feature and
    the teacher feature of the same shape (FitNets / StableKD block loss).

    At a multi-tensor cut (a U-Net's skips) both are tuples of tensors, paired by position:
    the loss is the mean of the per-tensor MSEs (each tensor weighs the same, whatever its size).
    """

    def forward(self, student_feature, teacher_feature) -> torch.Tensor:
        if isinstance(student_feature, (tuple, list)) or isinstance(teacher_feature, (tuple, list)):
            if not isinstance(student_feature, (tuple, list)) or not isinstance(teacher_feature, (tuple, list)) \
                    or len(student_feature) != len(teacher_feature):
                raise ValueError("FeatureMSE: a multi-tensor feature must meet one of as many tensors")
            losses = [self._one(s, t) for s, t in zip(student_feature, teacher_feature)]
            return torch.stack(losses).mean()
        return self._one(student_feature, teacher_feature)

    def _one(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        if student_feature.shape != teacher_feature.shape:
            raise ValueError(
                f"FeatureMSE: student feature {tuple(student_feature.shape)} and teacher feature "
                f"{tuple(teacher_feature.shape)} differ in shape; an adapter is missing"
            )
        with no_autocast(student_feature):
            return F.mse_loss(student_feature.float(), teacher_feature.detach().float())


class HeadLoss(nn.Module):
    """Loss of the head block: cross-entropy with the labels plus weighted KD.

    Dense (B, C, H, W) logits with (B, H, W) targets (a per-pixel task) give the per-pixel
    CE and KL, each averaged over every pixel of the batch.

    Returns ``{"ce": CE(y, label_smoothing), "kl": kl_weight * KLDivergence(T)}``; the
    ``"kl"`` entry is absent when ``teacher_logits`` is None (plain supervised training).
    The entries are already weighted, so the step's loss is the sum of the values.
    """

    def __init__(self, kl_weight: float = 1.0, temperature: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.kl_weight = float(kl_weight)
        self.label_smoothing = float(label_smoothing)
        self.kl = KLDivergence(temperature)

    def forward(
        self,
        student_logits: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        with no_autocast(student_logits):
            ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        out = {"ce": ce}
        if teacher_logits is not None:
            out["kl"] = self.kl_weight * self.kl(student_logits, teacher_logits)
        return out

    def extra_repr(self) -> str:
        return f"kl_weight={self.kl_weight}, label_smoothing={self.label_smoothing}"
