"""Distillation losses: small modules with one job each, and ``LOSSES``, their registry.

All of them compute in float32 whatever the surrounding autocast says: the inputs are
cast up and autocast is switched off inside, because softmax/log and squared errors of
bf16 activations lose the small differences distillation is made of. Teacher tensors
are detached: gradients never flow into the teacher.

The contract of a ``LOSSES`` entry (what a new recipe, DKD or DIST say, must provide; one
entry and, where users choose it, one spec field):

- it is an ``nn.Module`` class registered here, where it is defined
  (``@LOSSES.register("name")``), with no parameters or buffers of its own (the distiller
  keeps it outside the student's module tree: checkpoints do not change);
- its docstring gives the formula, its symbols named; the test checks it against that
  formula written out, never against itself;
- class attributes: ``summary`` (one line, for help and the plan); ``role``, what it reads
  (``head``: student logits, labels, teacher logits, the last absent without a teacher;
  ``feature``: a student feature, lifted where widths differ, and the teacher's at one
  block end; ``tpp``: TPP's proxy logits and the teacher's logits); ``terms``, the names
  it writes (the training log's columns), where ``{block}`` stands for the block index of a
  feature loss (``term_names``); ``params``, constructor argument -> the ``loss.*`` spec
  field the compiler resolves it from (``resolve_params``; ``fmt`` is special: the teacher's
  ``FeatureFormat`` at the block end);
- ``forward(*inputs)`` returns one scalar, or a dict of scalars in the order of ``terms``,
  weighted already: the step's loss is the sum of every term.

The compiler (``compiler.blockgraph``) chooses each loss node's entry: the head's is ``kd``
with a teacher and ``ce`` without; a block end's is ``loss.feature``; TPP's is ``tpp``. It
writes the entry, its resolved params and its term names into the block graph; every loss op
of a stage's program carries them, and the distiller builds the op's module from the program
alone (``create_loss``), never from the spec. A new head recipe (DKD, DIST, logit
standardisation) is a ``head`` entry here plus the spec field that names it (read where the
head's entry is chosen); a new feature loss is a ``feature`` entry plus its name among
``loss.feature``'s choices.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.ir import FeatureFormat
from kdgraph.layouts import to_map
from kdgraph.registry import Registry

__all__ = ["LOSSES", "CrossEntropy", "DualViewFeatureMimicking", "FeatureMSE", "HeadLoss", "KLDivergence",
           "TeacherParameterPerception", "create_loss", "no_autocast", "resolve_params", "term_names"]

LOSSES: Registry[type[nn.Module]] = Registry("loss")
"""Loss name (a loss op's ``entry``) -> its module class (see the contract above)."""


def term_names(name: str, block: int | None = None) -> tuple[str, ...]:
    """The names loss ``name`` writes at block ``block`` (``mse`` at block 2: ``mse2``)."""
    return tuple(t.format(block=block) for t in LOSSES.get(name).terms)


def resolve_params(name: str, loss_spec: Mapping[str, Any], fmt: FeatureFormat | None = None) -> dict[str, Any]:
    """The constructor arguments of loss ``name``, read from the spec's ``loss`` section (plain
    data: the plan's JSON shows them; ``fmt`` as a dict of the FeatureFormat's fields)."""
    return {arg: asdict(fmt) if field == "fmt" else loss_spec[field] for arg, field in LOSSES.get(name).params.items()}


def create_loss(name: str, params: Mapping[str, Any]) -> nn.Module:
    """The module of loss ``name`` with its resolved ``params`` (a loss op's)."""
    return LOSSES.get(name)(**params)


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


@LOSSES.register("mse")
class FeatureMSE(nn.Module):
    """``mse = w * mean_elements (s - t)^2``: the mean squared error over every element between a
    (projected) student feature s and the teacher feature t of the same shape, times the
    weight w (FitNets / StableKD block loss).

    At a multi-tensor cut (a U-Net's skips) both are tuples of tensors, paired by position:
    the loss is w times the mean of the per-tensor MSEs (each tensor weighs the same,
    whatever its size).
    """

    summary = "mean squared error between student and teacher block features"
    role = "feature"
    terms = ("mse{block}",)
    params = {"weight": "feature_weight"}

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, student_feature, teacher_feature) -> torch.Tensor:
        if isinstance(student_feature, (tuple, list)) or isinstance(teacher_feature, (tuple, list)):
            if not isinstance(student_feature, (tuple, list)) or not isinstance(teacher_feature, (tuple, list)) \
                    or len(student_feature) != len(teacher_feature):
                raise ValueError("FeatureMSE: a multi-tensor feature must meet one of as many tensors")
            losses = [self._one(s, t) for s, t in zip(student_feature, teacher_feature)]
            return self.weight * torch.stack(losses).mean()
        return self.weight * self._one(student_feature, teacher_feature)

    def _one(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        if student_feature.shape != teacher_feature.shape:
            raise ValueError(
                f"FeatureMSE: student feature {tuple(student_feature.shape)} and teacher feature "
                f"{tuple(teacher_feature.shape)} differ in shape; an adapter is missing"
            )
        with no_autocast(student_feature):
            return F.mse_loss(student_feature.float(), teacher_feature.detach().float())


@LOSSES.register("kd")
class HeadLoss(nn.Module):
    """Loss of the head block: cross-entropy with the labels plus weighted KD (Hinton et al.).

    ``ce = CE(y, z_s)`` (with label smoothing), ``kl = λ T^2 KL(softmax(z_t/T) || softmax(z_s/T))``
    for student logits z_s, teacher logits z_t, labels y, weight λ and temperature T.

    Dense (B, C, H, W) logits with (B, H, W) targets (a per-pixel task) give the per-pixel
    CE and KL, each averaged over every pixel of the batch.

    Returns ``{"ce": CE(y, label_smoothing), "kl": kl_weight * KLDivergence(T)}``; the
    ``"kl"`` entry is absent when ``teacher_logits`` is None (plain supervised training).
    The entries are already weighted, so the step's loss is the sum of the values.
    """

    summary = "cross-entropy with the labels plus weighted KL to the teacher's logits"
    role = "head"
    terms = ("ce", "kl")
    params = {"kl_weight": "kl_weight", "temperature": "temperature", "label_smoothing": "label_smoothing"}

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


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """``ce = CE(y, z_s)``: cross-entropy of student logits z_s with labels y (label smoothing
    ε: the target is (1 - ε) one-hot + ε / C); a per-pixel task averages over every pixel.
    The head loss of plain supervised training (no teacher)."""

    summary = "cross-entropy with the labels (no teacher)"
    role = "head"
    terms = ("ce",)
    params = {"label_smoothing": "label_smoothing"}

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with no_autocast(student_logits):
            return F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)


@LOSSES.register("tpp")
class TeacherParameterPerception(nn.Module):
    """ScaleKD's TPP loss: ``tpp = w * T^2 KL(softmax(z_t/T) || softmax(z_p/T))``, where z_p
    are the logits of the proxy path (the student's feature at a block end, lifted, through
    the frozen teacher's later blocks), z_t the teacher's own logits, w the weight, T the
    temperature."""

    summary = "KL between the teacher's logits and the student's feature run through the teacher's later blocks"
    role = "tpp"
    terms = ("tpp",)
    params = {"weight": "tpp_weight", "temperature": "temperature"}

    def __init__(self, weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.weight = float(weight)
        self.kl = KLDivergence(temperature)

    def forward(self, proxy_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.weight * self.kl(proxy_logits, teacher_logits)


# ScaleKD's dual-view feature mimicking (Fan et al., "ScaleKD: Strong Vision Transformers
# Could Be Excellent Teachers").

def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n x n): X = D @ x transforms along one axis."""
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two axes (scipy.fft.dctn(type=2, norm='ortho'))."""
    dh = dct_matrix(x.shape[-2], x.device, x.dtype)
    dw = dct_matrix(x.shape[-1], x.device, x.dtype)
    return dh @ x @ dw.T


def idct2(X: torch.Tensor) -> torch.Tensor:
    dh = dct_matrix(X.shape[-2], X.device, X.dtype)
    dw = dct_matrix(X.shape[-1], X.device, X.dtype)
    return dh.T @ X @ dw


def remove_direct(x: torch.Tensor) -> torch.Tensor:
    """The feature with its zero-frequency DCT component removed, transformed back."""
    X = dct2(x)
    X = X.clone()
    X[..., 0, 0] = 0
    return idct2(X)


@LOSSES.register("dfm")
class DualViewFeatureMimicking(nn.Module):
    """DFM: ``dfm_direct = w * alpha * MSE(s, t)`` and ``dfm_alt = w * beta * MSE(R(s), R(t))``,
    where s, t are the student and teacher features as NCHW maps of the teacher's grid
    (prefix tokens dropped), L2-normalised along channels, R removes the direct
    (zero-frequency) component of the 2-D DCT over the spatial axes, w is the feature weight.
    Returns the two terms separately.
    """

    summary = "ScaleKD's dual-view feature mimicking: normalised MSE, and MSE without the DCT's direct component"
    role = "feature"
    terms = ("dfm{block}_direct", "dfm{block}_alt")
    params = {"fmt": "fmt", "alpha": "dfm_alpha", "beta": "dfm_beta", "weight": "feature_weight"}

    def __init__(self, fmt: FeatureFormat | Mapping[str, Any], alpha: float = 0.08, beta: float = 0.06,
                 weight: float = 1.0):
        super().__init__()
        self.fmt = fmt if isinstance(fmt, FeatureFormat) else FeatureFormat(**fmt)
        self.alpha, self.beta, self.weight = alpha, beta, float(weight)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        with no_autocast(student):
            s, _ = to_map(student.float(), self.fmt)
            t, _ = to_map(teacher.detach().float(), self.fmt)
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
            direct = F.mse_loss(s, t)
            alternative = F.mse_loss(remove_direct(s), remove_direct(t))
        return {"dfm_direct": self.weight * (self.alpha * direct), "dfm_alt": self.weight * (self.beta * alternative)}
