"""Dense distillation losses, registered here in ``LOSSES`` (``kdgraph.registry``'s, which
``kdgraph.losses`` re-exports): ``pixel_ce``, ``pixel_kl``, ``cwd``, ``pkd``; imported for that by
``kdgraph.segmentation.register``. Like every entry, each computes
in float32 whatever the caller's autocast, and teacher tensors get no gradient.

``pixel_kl`` and ``cwd`` are head losses (student logits (B, C, H, W), targets (B, H', W'),
teacher logits (B, C, H'', W'')); ``pkd`` is a feature loss (one tensor, or one per level).
Logits whose spatial size differs from the targets' (another output stride) are resized to it,
bilinearly with ``align_corners=False``, before anything else: every loss then compares
pixels of the label grid. A target pixel equal to ``ignore_index`` is left out of every sum
and every mean (and, in CWD, out of the spatial distribution): its logits change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.registry import LOSSES
from kdgraph.segmentation import IGNORE_INDEX

__all__ = ["ChannelWiseDistillation", "PearsonFeatureLoss", "PixelCE", "PixelKL", "channel_wise_divergence",
           "pearson_normalise", "resize_to"]


def no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device (meta tensors, shapes only, have none)."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def _frozen(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (B, C, H, W) at spatial ``size``: bilinear, ``align_corners=False``; as it is if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B, H, W) float mask: 1 where the pixel is labelled, 0 where it is ``ignore_index``."""
    return (targets != ignore_index).float()


def _ce(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (0, not NaN, where none is)."""
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def _check_dense(student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, name: str) -> None:
    if student.dim() != 4 or targets.dim() != 3:
        raise ValueError(f"{name}: wants (B, C, H, W) logits and (B, H, W) targets, got "
                         f"{tuple(student.shape)} and {tuple(targets.shape)}")
    if teacher is not None and teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"{name}: teacher logits {tuple(teacher.shape)} and student logits "
                         f"{tuple(student.shape)} differ in batch or classes")


def _heads(logits) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, aux) of a forward's heads: one tensor (no aux), or a tuple (out, aux)."""
    if isinstance(logits, (tuple, list)):
        if len(logits) != 2:
            raise ValueError(f"dense heads: one tensor or (out, aux), got {len(logits)} tensors")
        return logits[0], logits[1]
    return logits, None


class _DenseHead(nn.Module):
    """What the dense head losses share: the per-pixel cross-entropy on the student's logits
    resized to the targets, and, with a teacher, the loss's own distillation term (``distil``)."""

    label = ""  # in errors

    def __init__(self, ce_weight: float, temperature: float, ignore_index: int, aux_weight: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.ce_weight, self.temperature, self.ignore_index = float(ce_weight), float(temperature), int(ignore_index)
        self.aux_weight = float(aux_weight)

    def forward(self, student_logits, targets: torch.Tensor, teacher_logits=None) -> dict[str, torch.Tensor]:
        """``student_logits`` and ``teacher_logits``: the ``out`` logits, or a model's heads
        ``(out, aux)``: the aux head adds ``aux_weight`` times its cross-entropy to ``ce``, and
        only ``out`` is distilled."""
        student_logits, aux = _heads(student_logits)
        teacher_logits = _heads(teacher_logits)[0] if teacher_logits is not None else None
        _check_dense(student_logits, targets, teacher_logits, self.label)
        with no_autocast(student_logits):
            s = resize_to(student_logits.float(), targets.shape[-2:])
            ce = _ce(s, targets, self.ignore_index)
            if aux is not None:
                ce = ce + self.aux_weight * _ce(resize_to(aux.float(), targets.shape[-2:]), targets, self.ignore_index)
            out = {"ce": self.ce_weight * ce}
            if teacher_logits is not None:
                out.update(self.distil(s, student_logits, _frozen(teacher_logits).float(), targets))
            return out


@LOSSES.register("pixel_ce")
class PixelCE(_DenseHead):
    """The dense task's head loss without a teacher: ``ce = (1/|V|) Σ_{i∈V} −log softmax_c(z^s_i)_{y_i}``,
    V the pixels whose label is not ``ignore_index``, logits resized to the targets, plus
    ``aux_weight`` times the aux head's where the model has one. Its one term is ``ce``, so the
    plan shows what a supervised dense step computes."""

    label = "pixel_ce"
    summary = "per-pixel cross-entropy with the labels, no teacher (ignore_index honoured)"
    role = "head"
    terms = ("ce",)
    params = {"ignore_index": "ignore_index", "aux_weight": "aux_weight"}

    def __init__(self, ignore_index: int = IGNORE_INDEX, aux_weight: float = 0.5):
        super().__init__(1.0, 1.0, ignore_index, aux_weight)

    def forward(self, student_logits, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().forward(student_logits, targets)


@LOSSES.register("pixel_kl")
class PixelKL(_DenseHead):
    """Pixel-wise KD: ``kl = λ T² (1/|V|) Σ_{i∈V} Σ_c p^t_{i,c} (log p^t_{i,c} − log p^s_{i,c})``,
    ``p_i = softmax_c(z_i / T)`` per pixel i, V the pixels whose label is not ``ignore_index``;
    plus ``ce = w_ce (1/|V|) Σ_{i∈V} −log softmax_c(z^s_i)_{y_i}``. Logits of another spatial size
    than the targets are first resized to it (bilinear, align_corners=False).
    """

    label = "pixel_kl"
    summary = "per-pixel cross-entropy plus weighted KL to the teacher's per-pixel distribution (ignore_index honoured)"
    role = "head"
    terms = ("ce", "kl")
    params = {"ce_weight": "ce_weight", "kl_weight": "kl_weight", "temperature": "temperature",
              "ignore_index": "ignore_index", "aux_weight": "aux_weight"}

    def __init__(self, ce_weight: float = 1.0, kl_weight: float = 1.0, temperature: float = 1.0,
                 ignore_index: int = IGNORE_INDEX, aux_weight: float = 0.5):
        super().__init__(ce_weight, temperature, ignore_index, aux_weight)
        self.kl_weight = float(kl_weight)

    def distil(self, s: torch.Tensor, student_logits: torch.Tensor, teacher: torch.Tensor,
               targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t, valid = self.temperature, _valid(targets, self.ignore_index)
        log_q = F.log_softmax(s / t, dim=1)
        log_p = F.log_softmax(resize_to(teacher, targets.shape[-2:]) / t, dim=1)
        per_pixel = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        kl = (per_pixel * valid).sum() / valid.sum().clamp(min=1)
        return {"kl": self.kl_weight * t * t * kl}


def channel_wise_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Shu et al. 2021, eq. (4): ``T² / (N C) Σ_n Σ_c Σ_i φ(t_{n,c})_i (log φ(t_{n,c})_i − log φ(s_{n,c})_i)``,
    ``φ(y_c) = softmax_i(y_{c,i} / T)`` over the spatial locations i of channel c. Locations where
    ``valid`` (B, H, W) is 0 are left out of the softmax (and so of the sum)."""
    n, c = student.shape[:2]
    s = student.float().flatten(2) / temperature
    t = teacher.float().flatten(2) / temperature
    if valid is not None:
        drop = (valid.flatten(1) == 0).unsqueeze(1)
        s, t = s.masked_fill(drop, float("-inf")), t.masked_fill(drop, float("-inf"))
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # 0 log 0 = 0 (masked places)
    return temperature * temperature * terms.sum() / (n * c)


@LOSSES.register("cwd")
class ChannelWiseDistillation(_DenseHead):
    """Channel-wise distillation of dense logits (Shu et al. 2021): ``cwd = λ · CWD_T(z_s, z_t)``
    with ``CWD_T = T² / (N C) Σ_n Σ_c KL(φ(z^t_{n,c}) || φ(z^s_{n,c}))``, ``φ = softmax over the H·W
    locations of one channel at temperature T`` (mmrazor's PSPNet Cityscapes setting: T = 1, λ = 5);
    plus ``ce = w_ce`` times the per-pixel cross-entropy with the labels (the student's logits resized
    to the labels' grid). CWD is taken on the teacher's logit grid, as the paper and mmrazor take it
    on the logit maps (the student's logits resized to it where the output strides differ); a
    location whose label (the labels taken to that grid by nearest neighbour) is ``ignore_index``
    is left out of the spatial softmax.
    """

    label = "cwd"
    summary = "per-pixel cross-entropy plus channel-wise distillation: KL of per-channel spatial softmaxes (Shu et al. 2021)"
    role = "head"
    terms = ("ce", "cwd")
    params = {"ce_weight": "ce_weight", "weight": "kl_weight", "temperature": "temperature",
              "ignore_index": "ignore_index", "aux_weight": "aux_weight"}

    def __init__(self, ce_weight: float = 1.0, weight: float = 5.0, temperature: float = 1.0,
                 ignore_index: int = IGNORE_INDEX, aux_weight: float = 0.5):
        super().__init__(ce_weight, temperature, ignore_index, aux_weight)
        self.weight = float(weight)

    def distil(self, s: torch.Tensor, student_logits: torch.Tensor, teacher: torch.Tensor,
               targets: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = teacher.shape[-2:]
        valid = _valid(targets, self.ignore_index)
        if tuple(grid) != tuple(targets.shape[-2:]):
            valid = F.interpolate(valid[:, None], size=tuple(grid), mode="nearest-exact")[:, 0]
        s_grid = resize_to(student_logits.float(), grid)
        return {"cwd": self.weight * channel_wise_divergence(s_grid, teacher, self.temperature, valid)}


def pearson_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x − μ_c) / (σ_c + eps)`` with μ_c, σ_c the mean and (population) standard deviation of
    channel c over the batch and every location (Cao et al. 2022, PKD; mmrazor divides by the
    unbiased estimate, larger by a factor sqrt(n / (n − 1)) over n values)."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.var(dim=dims, keepdim=True, unbiased=False).sqrt()
    return (x - mean) / (std + eps)


@LOSSES.register("pkd")
class PearsonFeatureLoss(nn.Module):
    """PKD's feature loss (Cao et al. 2022, eq. 5): ``pkd = w Σ_l a_l · ½ mean (ŝ_l − t̂_l)²`` over the
    levels l (one tensor, or a tuple of FPN levels paired by position), ``ŝ, t̂`` the student's and
    teacher's features normalised per channel to zero mean and unit standard deviation
    (``pearson_normalise``), so the loss is 1 − the Pearson correlation of each channel's values
    up to a constant; ``a_l`` the per-level weights (1 each by default). A student level whose
    spatial size differs from the teacher's is first resized to it (bilinear, align_corners=False).
    """

    summary = "MSE of per-channel Pearson-normalised student and teacher features, levels weighted (Cao et al. 2022)"
    role = "feature"
    terms = ("pkd{block}",)
    params = {"weight": "feature_weight"}

    def __init__(self, weight: float = 1.0, level_weights: Sequence[float] | None = None):
        super().__init__()
        self.weight = float(weight)
        self.level_weights = None if level_weights is None else tuple(float(a) for a in level_weights)

    def forward(self, student_feature, teacher_feature) -> torch.Tensor:
        many = isinstance(student_feature, (tuple, list))
        students = list(student_feature) if many else [student_feature]
        teachers = list(teacher_feature) if isinstance(teacher_feature, (tuple, list)) else [teacher_feature]
        if len(students) != len(teachers):
            raise ValueError(f"pkd: {len(students)} student levels against {len(teachers)} teacher levels")
        weights = self.level_weights or (1.0,) * len(students)
        if len(weights) != len(students):
            raise ValueError(f"pkd: {len(weights)} level weights for {len(students)} levels")
        with no_autocast(students[0]):
            total = sum(a * self._level(s, t) for a, s, t in zip(weights, students, teachers))
            return self.weight * total

    @staticmethod
    def _level(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(f"pkd: student feature {tuple(student.shape)} and teacher feature "
                             f"{tuple(teacher.shape)} differ in batch or channels; an adapter is missing")
        s = student.float()
        if s.dim() == 4:
            s = resize_to(s, teacher.shape[-2:])
        s_hat, t_hat = pearson_normalise(s), pearson_normalise(_frozen(teacher).float())
        return 0.5 * F.mse_loss(s_hat, t_hat)
