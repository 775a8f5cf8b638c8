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
  block end; ``tpp``: TPP's proxy logits and the teacher's logits; ``token``: a causal LM's
  (B, T, V) logits, its (B, T) next-token targets and the teacher's logits); ``terms``, the names
  it writes (the training log's columns), where ``{block}`` stands for the block index of a
  feature loss (``term_names``); ``params``, constructor argument -> the ``loss.*`` spec
  field the compiler resolves it from (``resolve_params``; ``fmt`` is special: the teacher's
  ``FeatureFormat`` at the block end);
- ``forward(*inputs)`` returns one scalar, or a dict of scalars in the order of ``terms``,
  weighted already: the step's loss is the sum of every term;
- optionally ``progress = True``: ``forward`` also takes the keyword ``progress``, the epochs
  done by the end of this step (fractional: step i of n in 0-based epoch e is e + (i + 1) / n, a
  0-dim tensor or None), which the distiller passes from its caller (DKD's warm-up); nothing
  else of the training state reaches a loss.

The compiler (``compiler.blockgraph``) chooses each loss node's entry: the head's is the
``entry`` of ``loss.logit``'s ``kdgraph.registry.LOGIT_LOSSES`` record (``kd``, ``dkd``,
``dist``) with a teacher and ``ce`` without; a block end's is ``loss.feature``; TPP's is ``tpp``. It
writes the entry, its resolved params and its term names into the block graph; every loss op
of a stage's program carries them, and the distiller builds the op's module from the program
alone (``create_loss``), never from the spec. A new logit recipe is a ``head`` entry here
plus its torch-free ``LOGIT_LOSSES`` record (name, entry, own spec fields, summary), which the
spec's ``loss.logit`` offers; a new feature loss is a ``feature`` entry plus its name among
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
from kdgraph.lm.token_losses import chunked_token_loss, spread_topk
from kdgraph.registry import LOGIT_LOSSES, LOSSES

__all__ = ["LOSSES", "CrossEntropy", "DDPMLoss", "DenoiseHead", "DualViewFeatureMimicking", "FKDHeadLoss", "FeatureMSE", "HeadLoss", "KLDivergence",
           "TeacherParameterPerception", "DecoupledKDHead", "DISTHead", "create_loss", "no_autocast", "resolve_params",
           "term_names",
           "DIST", "DKD", "LogitStandardization", "dkd_warmup", "standardize_logits",
           "ForwardKLTokens", "ReverseKLTokens", "SkewKLTokens", "GeneralisedJSDTokens"]

# LOSSES (kdgraph.registry's): loss name (a loss op's ``entry``) -> its module class (the contract
# above). A task's own losses register themselves in their own module, as these do here.


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
    """Losses in float32 whatever the caller's autocast (meta tensors, shapes only, have none;
    where none is on, nothing to turn off: no context to build)."""
    if t.device.type == "meta" or not torch.is_autocast_enabled(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def per_sample(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits as they are; per-pixel (B, C, *spatial) logits as (B*H*W, C), one row per pixel."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x * factor``, skipped at factor 1 (a weight or temperature left at its default): x * 1
    is x exactly, so the values are the same and the step runs one op (and its backward) less."""
    return x if factor == 1.0 else x * factor


def _tempered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z / T``, skipped at T = 1: z / 1 is z exactly (the same values, one op fewer)."""
    return z if temperature == 1.0 else z / temperature


def _frozen(t: torch.Tensor) -> torch.Tensor:
    """``t`` without a gradient path: the teacher's features come from a no-grad pass already
    (no detach op then); a proxy path's or a caller's tensor is detached."""
    return t.detach() if t.requires_grad else t


class KLDivergence(nn.Module):
    """Hinton's KD term: ``T^2 * mean_batch sum_c p_t (log p_t - log p_s)``.

    ``p = softmax(logits / T)``; the ``T^2`` keeps the gradient scale independent of T.
    Inputs are (B, C) logits, or per-pixel (B, C, H, W) logits of a per-pixel task: there each
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
            log_p_s = F.log_softmax(_tempered(student_logits.float(), t), dim=-1)
            log_p_t = F.log_softmax(_tempered(_frozen(teacher_logits).float(), t), dim=-1)
            kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
            return _scaled(kl, t * t)

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
            return _scaled(torch.stack(losses).mean(), self.weight)
        return _scaled(self._one(student_feature, teacher_feature), self.weight)

    def _one(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        if student_feature.shape != teacher_feature.shape:
            raise ValueError(
                f"FeatureMSE: student feature {tuple(student_feature.shape)} and teacher feature "
                f"{tuple(teacher_feature.shape)} differ in shape; an adapter is missing"
            )
        with no_autocast(student_feature):
            return F.mse_loss(student_feature.float(), _frozen(teacher_feature).float())


@LOSSES.register("cosine")
class FeatureCosine(nn.Module):
    """``cos = w * mean_positions (1 - <s, t> / (|s| |t|))``: one minus the cosine similarity of the
    (projected) student feature s and the teacher feature t along the channel axis, averaged over
    every other position (a causal LM's hidden states: each token's D-vector; a map: each pixel's
    C-vector), times the weight w (the cosine hidden-state loss of DistilBERT / Minitron). Norms
    are floored at 1e-8. Scale-free: s and c·s (c > 0) have the same loss."""

    summary = "one minus the cosine similarity of student and teacher features along channels"
    role = "feature"
    terms = ("cos{block}",)
    params = {"fmt": "fmt", "weight": "feature_weight"}

    def __init__(self, fmt: FeatureFormat | Mapping[str, Any], weight: float = 1.0):
        super().__init__()
        self.fmt = fmt if isinstance(fmt, FeatureFormat) else FeatureFormat(**fmt)
        self.weight = float(weight)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        if student_feature.shape != teacher_feature.shape:
            raise ValueError(f"FeatureCosine: student feature {tuple(student_feature.shape)} and teacher feature "
                             f"{tuple(teacher_feature.shape)} differ in shape; an adapter is missing")
        axis = 1 if self.fmt.layout == "NCHW" else -1
        with no_autocast(student_feature):
            sim = F.cosine_similarity(student_feature.float(), _frozen(teacher_feature).float(), dim=axis, eps=1e-8)
            return _scaled((1 - sim).mean(), self.weight)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``CE(y, z_s)`` in float32: ``targets`` class indices, or per-class probabilities (mixed
    by Mixup/CutMix; the smoothing ε then gives (1 - ε) y + ε / C, timm's mixed smoothed target)."""
    with no_autocast(student_logits):
        return F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)


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
        return cross_entropy(student_logits, targets, self.label_smoothing)


@LOSSES.register("kd")
class HeadLoss(nn.Module):
    """Loss of the head block: cross-entropy with the labels plus weighted KD (Hinton et al.).

    ``ce = w_ce CE(y, z_s)`` (with label smoothing), ``kl = λ T^2 KL(softmax(z_t/T) || softmax(z_s/T))``
    for student logits z_s, teacher logits z_t, labels y, CE weight w_ce, weight λ and
    temperature T. With ``standardize`` both logits are first Z-scored per sample
    (``LogitStandardization``, Sun et al. 2024): ``z -> (z - mean(z)) / std(z)``, T the base
    temperature. ``w_ce = 0`` is function matching (Beyer et al.): the KL alone.

    Per-pixel (B, C, H, W) logits with (B, H, W) targets (a per-pixel task) give the per-pixel
    CE and KL, each averaged over every pixel of the batch.

    Returns ``{"ce": w_ce CE(y, label_smoothing), "kl": kl_weight * KLDivergence(T)}``; the
    ``"kl"`` entry is absent when ``teacher_logits`` is None (plain supervised training).
    The entries are already weighted, so the step's loss is the sum of the values.
    """

    summary = LOGIT_LOSSES.get("kl").summary
    role = "head"
    terms = (*CrossEntropy.terms, "kl")
    params = {"ce_weight": "ce_weight", "kl_weight": "kl_weight", "temperature": "temperature",
              "label_smoothing": "label_smoothing", "standardize": "standardize"}

    def __init__(self, kl_weight: float = 1.0, temperature: float = 1.0, label_smoothing: float = 0.0,
                 ce_weight: float = 1.0, standardize: bool = False):
        super().__init__()
        self.kl_weight, self.ce_weight = float(kl_weight), float(ce_weight)
        self.label_smoothing = float(label_smoothing)
        kl = KLDivergence(temperature)
        self.kl = LogitStandardization(kl) if standardize else kl

    def forward(
        self,
        student_logits: torch.Tensor,
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = {"ce": _scaled(cross_entropy(student_logits, targets, self.label_smoothing), self.ce_weight)}
        if teacher_logits is not None:
            out["kl"] = _scaled(self.kl(student_logits, teacher_logits), self.kl_weight)
        return out

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, label_smoothing={self.label_smoothing}"


@LOSSES.register("fkd")
class FKDHeadLoss(nn.Module):
    """The head loss on a top-k teacher cache: cross-entropy plus KL to FKD's soft label
    (Shen & Xing, "A Fast Knowledge Distillation Framework", 2021, marginal smoothing).

    The cache holds, per sample, the k largest teacher probabilities ``p_c = softmax(z_t/T)_c``
    (c in K, the top-k classes) and their indices. The remainder ``r = 1 - sum_{c in K} p_c`` is
    spread uniformly over the other C - k classes:

        p~_c = p_c                    for c in K
        p~_c = r / (C - k)            otherwise  (r clamped at 0: fp16 sums may pass 1)

    ``kl = λ T^2 mean_batch sum_c p~_c (log p~_c - log softmax(z_s/T)_c)`` (0 log 0 = 0),
    ``ce = w_ce CE(y, z_s)`` with label smoothing (``y`` class indices, or Mixup/CutMix's mixed
    soft targets), for student logits z_s (B, C), labels y, CE weight w_ce, weight λ,
    temperature T (the cache's, which the cache key fixes). With k = C it is ``kd`` on the
    teacher's probabilities rounded to fp16. ``loss.standardize`` has no top-k form (it
    rescales the logits before the softmax): the compiler refuses it with a top-k cache.

    ``teacher`` is the cache's ``(probs (B, k), indices (B, k))`` pair. Returns
    ``{"ce", "kl"}``, weighted, as ``kd`` does.
    """

    summary = "cross-entropy plus KL to the teacher's cached top-k probabilities, the rest spread uniformly (FKD)"
    role = "head"
    terms = ("ce", "kl")
    params = {"ce_weight": "ce_weight", "kl_weight": "kl_weight", "temperature": "temperature",
              "label_smoothing": "label_smoothing"}

    def __init__(self, kl_weight: float = 1.0, temperature: float = 1.0, label_smoothing: float = 0.0,
                 ce_weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kl_weight, self.temperature, self.ce_weight = float(kl_weight), float(temperature), float(ce_weight)
        self.label_smoothing = float(label_smoothing)

    soft_label = staticmethod(spread_topk)  # p~ (B, C) of the top-k probabilities and indices; a token cache's too

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        probs, indices = teacher
        t = self.temperature
        ce = self.ce_weight * cross_entropy(student_logits, targets, self.label_smoothing)
        with no_autocast(student_logits):
            z = student_logits.float()
            p = self.soft_label(probs.detach(), indices, z.shape[-1])
            log_q = F.log_softmax(z / t, dim=-1)
            kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1).mean() * (t * t)
        return {"ce": ce, "kl": self.kl_weight * kl}

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, temperature={self.temperature}, "
                f"label_smoothing={self.label_smoothing}")


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
        return _scaled(self.kl(proxy_logits, teacher_logits), self.weight)


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
            t, _ = to_map(_frozen(teacher).float(), self.fmt)
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
            direct = F.mse_loss(s, t)
            alternative = F.mse_loss(remove_direct(s), remove_direct(t))
        return {"dfm_direct": _scaled(self.alpha * direct, self.weight),
                "dfm_alt": _scaled(self.beta * alternative, self.weight)}


# --- logit losses of the recipes (issue 22) ----------------------------------------------------
# Each takes (B, C) logits, or per-pixel (B, C, *spatial) logits whose pixels are samples (per_sample),
# computes in float32 with autocast off and never sends a gradient into the teacher. ``terms``
# returns the weighted named terms (what metrics.jsonl logs); ``forward`` is their sum.


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sun et al.'s Z-score of each row over the classes: ``(z - mean(z)) / (std(z) + eps)``.

    ``std`` is Bessel-corrected (1/(C-1)), as the authors' code (``logit.std(dim=-1)``); the
    paper's 1/C variance differs by the constant factor sqrt(C/(C-1)), which a base temperature
    absorbs. Rows of at least 2 classes."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + eps)


class DKD(nn.Module):
    r"""Decoupled KD (Zhao et al., CVPR 2022, Sec. 3): ``T^2 * mean_n (alpha TCKD + beta NCKD)``.

    For one sample with target class t and ``p = softmax(z / T)`` (teacher T, student S):

    - binary probabilities ``b = [p_t, p_\t]`` with ``p_\t = 1 - p_t`` (target vs all others);
    - ``TCKD = KL(b^T || b^S) = sum_{i in {t, \t}} b_i^T log(b_i^T / b_i^S)``;
    - non-target distribution ``p^_i = p_i / p_\t = softmax_{i != t}(z_i / T)``, i != t;
    - ``NCKD = KL(p^^T || p^^S) = sum_{i != t} p^_i^T log(p^_i^T / p^_i^S)``.

    The paper's decomposition of Hinton's KD: ``KL(p^T || p^S) = TCKD + (1 - p_t^T) NCKD``
    per sample, so DKD with alpha = 1 and beta = 1 - p_t^T is KD, and DKD decouples the weight.
    ``T^2`` and the batch mean are mdistiller's: ``dkd_loss = (alpha * tckd + beta * nckd)`` with
    both KLs summed over classes, multiplied by T^2 and divided by the batch size. mdistiller
    forms p^ by subtracting 1000 from the target logit before the softmax; here the target
    logit is put 200 below the row's lowest other logit: the same distribution (both weigh the
    target exactly 0 in float32), whatever the logits' range. mdistiller's CIFAR-100 setting:
    alpha 1, beta 8, T 4, CE weight 1, and the DKD term ramped in over the first 20 of 240
    epochs (``dkd_warmup``, which the caller multiplies the loss by).

    ``targets`` are class indices, (B,) or (B, *spatial) for per-pixel logits, each in 0..C-1 (not
    checked: that would read them on the host every step; an index outside gives inf or nan).
    """

    TERMS = ("tckd", "nckd")

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"tckd": T^2 alpha mean TCKD, "nckd": T^2 beta mean NCKD}``."""
        t = self.temperature
        s, te = per_sample(student_logits), per_sample(teacher_logits)
        targets = targets.reshape(-1)
        if s.shape[0] != targets.shape[0] or s.shape[1] < 2:
            raise ValueError(f"DKD: {s.shape[0]} rows of {s.shape[1]} logits for {targets.shape[0]} targets "
                             "(one target per row, at least 2 classes)")
        with no_autocast(s):
            s, te = _tempered(s.float(), t), _tempered(_frozen(te).float(), t)
            # no one_hot / boolean indexing: both read the targets on the host (a sync per step)
            gt = torch.arange(s.shape[1], device=s.device) == targets[:, None]
            tckd = _binary_kl(s, te, gt)
            nckd = _kl_rows(_drop_target(s, gt), _drop_target(te, gt))
            # alpha T^2 and beta T^2 are one float each (as written before): skipped where 1
            return dict(zip(self.TERMS, (_scaled(tckd.mean(), self.alpha * t * t),
                                         _scaled(nckd.mean(), self.beta * t * t))))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(student_logits, teacher_logits, targets).values())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


def _drop_target(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Tempered logits whose target entry lies 200 below the row's lowest other entry: its
    softmax weight is exactly 0 in float32 (exp(-200) underflows), so the softmax is the
    distribution over the non-target classes, finite everywhere and without a gradient to the
    target logit (mdistiller subtracts a fixed 1000 instead)."""
    floor = _frozen(z).masked_fill(gt, float("inf")).amin(dim=-1, keepdim=True) - 200.0
    return torch.where(gt, floor, z)


def _kl_rows(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Per row ``KL(softmax(log_p) || softmax(log_q))`` of unnormalised log-probabilities."""
    log_q, log_p = F.log_softmax(log_q, dim=-1), F.log_softmax(log_p, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _binary_kl(s: torch.Tensor, te: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per row KL between the teacher's and the student's [p_t, 1 - p_t], from tempered logits:
    log p_t = z_t - logsumexp(z) and log p_\\t = logsumexp(z_{i != t}) - logsumexp(z), so that
    neither is the log of a probability that underflowed."""
    def binary(z: torch.Tensor) -> torch.Tensor:
        target = z.masked_fill(~gt, float("-inf")).logsumexp(dim=-1)
        other = z.masked_fill(gt, float("-inf")).logsumexp(dim=-1)
        return torch.stack([target, other], dim=-1)
    return _kl_rows(binary(s), binary(te))


def dkd_warmup(epoch: float, warmup_epochs: float) -> float:
    """The factor DKD's loss is multiplied by (Zhao et al. / mdistiller): ``min(epoch / warmup_epochs, 1)``.

    ``epoch`` counts from 1: per epoch, as mdistiller (whose first epoch is 1 and trains at
    1 / warmup_epochs), the 0-based epoch e gives ``e + 1``; per step, for a smooth ramp (a
    warm-up shorter than a few epochs), step i of n in epoch e gives ``e + (i + 1) / n``.
    ``warmup_epochs`` 0 switches the warm-up off. Pure: a resumed run gets the factor from its
    counters alone."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return 1.0
    return min(max(float(epoch), 0.0) / float(warmup_epochs), 1.0)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b (DIST's code: the cosine
    of the centred rows, eps added to the product of norms)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(nn.Module):
    r"""DIST (Huang et al., NeurIPS 2022, Sec. 3): ``beta * L_inter + gamma * L_intra``.

    ``Y = softmax(Z / tau)`` row-wise, a (B, C) matrix for student (S) and teacher (T), and
    ``rho_p(u, v) = cov(u, v) / (std(u) std(v))`` (Pearson correlation).

    - inter-class relation: ``L_inter = tau^2 * (1 - 1/B sum_i rho_p(Y^S_{i,:}, Y^T_{i,:}))``,
      each sample's class distribution correlated with the teacher's;
    - intra-class relation: ``L_intra = tau^2 * (1 - 1/C sum_j rho_p(Y^S_{:,j}, Y^T_{:,j}))``,
      each class's probabilities over the batch correlated with the teacher's.

    Pearson's rho is invariant to a positive affine map of either argument, so the student
    only has to match relations, not the teacher's probabilities ("exact match" relaxed);
    identical logits give 0, and each term lies in [0, 2 tau^2]. The authors' code adds
    eps = 1e-8 to the product of norms, as here, and defaults to beta = gamma = tau = 1; the
    loss is added to CE. With per-pixel logits the batch of the intra-class term is every pixel of
    the batch.
    """

    TERMS = ("inter", "intra")

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"beta and gamma must be >= 0, got {beta} and {gamma}")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)

    def terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"inter": beta L_inter, "intra": gamma L_intra}``."""
        tau = self.temperature
        s, te = per_sample(student_logits), per_sample(teacher_logits)
        with no_autocast(s):
            y_s = F.softmax(_tempered(s.float(), tau), dim=-1)
            y_t = F.softmax(_tempered(_frozen(te).float(), tau), dim=-1)
            inter = 1 - _pearson_rows(y_s, y_t).mean()
            intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
            return dict(zip(self.TERMS, (_scaled(inter, self.beta * tau * tau), _scaled(intra, self.gamma * tau * tau))))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(student_logits, teacher_logits).values())

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


class LogitStandardization(nn.Module):
    r"""Logit standardisation (Sun et al., CVPR 2024, Algorithm 1) around a logit loss.

    ``Z(z; T_base) = (z - mean(z)) / (std(z) T_base)`` for the teacher's and the student's logits
    each, before the tempered softmax: the temperature becomes ``std(z) * T_base``, its own for
    each model and sample, and the student has to match the teacher's logit *relations*, not
    their range. Implemented as the authors' code does it, ``loss(standardize_logits(z_s),
    standardize_logits(z_t))`` with the inner loss's temperature as the base temperature
    (their CIFAR-100 recipe: T_base 2, KD weight 9, for both KD and DKD).

    A wrapper rather than a flag on each loss: one implementation of the Z-score composes with
    every logit loss (KL, DKD, and DIST where one wants it) and leaves each inner loss exactly
    its paper's formula; ``loss.standardize: true`` in a spec is this wrapper around the chosen
    loss. Extra arguments (DKD's targets) pass through. The loss is invariant to shifting a row
    of either logits by a constant and to scaling it by a positive factor.
    """

    def __init__(self, loss: nn.Module, eps: float = 1e-7):
        super().__init__()
        self.loss = loss
        self.eps = float(eps)

    def _standardized(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        s, te = per_sample(student_logits), per_sample(teacher_logits)
        with no_autocast(s):
            return standardize_logits(s.float(), self.eps), standardize_logits(_frozen(te).float(), self.eps)

    def terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *args) -> dict[str, torch.Tensor]:
        """The inner loss's terms on the standardised logits (a loss without ``terms`` gives one
        named ``"kl"``)."""
        s, te = self._standardized(student_logits, teacher_logits)
        if hasattr(self.loss, "terms"):
            return self.loss.terms(s, te, *args)
        return {"kl": self.loss(s, te, *args)}

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *args) -> torch.Tensor:
        s, te = self._standardized(student_logits, teacher_logits)
        return self.loss(s, te, *args)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"



# --- the head entries of DKD and DIST (``loss.logit``): cross-entropy plus the logit loss ------

@LOSSES.register("dkd")
class DecoupledKDHead(nn.Module):
    """Head loss with DKD (Zhao et al. 2022): ``ce = w_ce CE(y, z_s)``, and ``tckd``, ``nckd`` =
    ``w(e) T^2 alpha mean TCKD``, ``w(e) T^2 beta mean NCKD`` (``DKD``'s formulas), where
    ``w(e) = min(e / E_w, 1)`` is the warm-up after e epochs of training (``progress``) over
    E_w = ``warmup_epochs`` epochs (0: ``w = 1``), as ``dkd_warmup``. With ``standardize`` both
    logits are Z-scored per sample first (``LogitStandardization``, T the base temperature).
    Labels must be class indices (DKD splits on the target class)."""

    summary = LOGIT_LOSSES.get("dkd").summary
    role = "head"
    terms = (*CrossEntropy.terms, *DKD.TERMS)
    params = {"ce_weight": "ce_weight", "label_smoothing": "label_smoothing", "alpha": "dkd_alpha",
              "beta": "dkd_beta", "temperature": "temperature", "warmup_epochs": "dkd_warmup_epochs",
              "standardize": "standardize"}
    progress = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0, warmup_epochs: float = 0.0, standardize: bool = False):
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.ce_weight, self.label_smoothing, self.warmup_epochs = float(ce_weight), float(label_smoothing), \
            float(warmup_epochs)
        dkd = DKD(alpha, beta, temperature)
        self.dkd = LogitStandardization(dkd) if standardize else dkd

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                progress: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        if targets.is_floating_point():
            raise ValueError("DKD splits on the target class: it needs class indices, not mixed soft targets")
        out = {"ce": _scaled(cross_entropy(student_logits, targets, self.label_smoothing), self.ce_weight)}
        terms = self.dkd.terms(student_logits, teacher_logits, targets)
        if self.warmup_epochs == 0:  # no warm-up: the factor is 1, not multiplied in
            return out | terms
        warm = self._warmup(progress, student_logits.device)
        return out | {k: warm * v for k, v in terms.items()}

    def _warmup(self, progress, device) -> torch.Tensor | float:
        """``min(progress / warmup_epochs, 1)`` on the device (no host sync, one graph under compile)."""
        if self.warmup_epochs == 0:
            return 1.0
        if progress is None:
            raise ValueError(f"DKD's warm-up over {self.warmup_epochs} epochs needs the training progress: "
                             "call the distiller with progress=")
        return (torch.as_tensor(progress, dtype=torch.float32, device=device) / self.warmup_epochs).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, label_smoothing={self.label_smoothing}, warmup_epochs={self.warmup_epochs}"


@LOSSES.register("dist")
class DISTHead(nn.Module):
    """Head loss with DIST (Huang et al. 2022): ``ce = w_ce CE(y, z_s)``, ``inter = beta L_inter``,
    ``intra = gamma L_intra`` (``DIST``'s Pearson-correlation relations at temperature tau). With
    ``standardize`` both logits are Z-scored per sample first. The intra-class term relates the
    samples of the batch: the batch is what one forward sees."""

    summary = LOGIT_LOSSES.get("dist").summary
    role = "head"
    terms = (*CrossEntropy.terms, *DIST.TERMS)
    params = {"ce_weight": "ce_weight", "label_smoothing": "label_smoothing", "beta": "dist_beta",
              "gamma": "dist_gamma", "temperature": "temperature", "standardize": "standardize"}

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__()
        self.ce_weight, self.label_smoothing = float(ce_weight), float(label_smoothing)
        dist = DIST(beta, gamma, temperature)
        self.dist = LogitStandardization(dist) if standardize else dist

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"ce": _scaled(cross_entropy(student_logits, targets, self.label_smoothing), self.ce_weight)}
        return out | self.dist.terms(student_logits, teacher_logits)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, label_smoothing={self.label_smoothing}"


# --- denoising (BK-SDM, Kim et al. 2023) --------------------------------------------------------

@LOSSES.register("ddpm")
class DDPMLoss(nn.Module):
    """DDPM's task loss (Ho et al.'s L_simple): ``task = w_task * mean (ε̂ - ε)^2`` between the
    predicted noise ε̂ and the true noise ε (mean over every element): the head loss of a
    denoiser trained without a teacher. With ``denoise.prediction: v`` the prediction is the
    velocity and the target ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` (``kdgraph.tasks.denoise.diffusion``
    draws it): ``task = w_task * mean (v̂ - v)^2``."""

    summary = "MSE of the predicted noise (or velocity, v-prediction) to the true one (DDPM's L_simple)"
    role = "head"
    terms = ("task",)
    params = {"task_weight": "task_weight"}

    def __init__(self, task_weight: float = 1.0):
        super().__init__()
        self.task_weight = float(task_weight)

    def forward(self, student: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with no_autocast(student):
            return self.task_weight * F.mse_loss(student.float(), noise.float())

    def extra_repr(self) -> str:
        return f"task_weight={self.task_weight}"


@LOSSES.register("denoise")
class DenoiseHead(nn.Module):
    """BK-SDM's loss at the head of a noise predictor with a teacher: ``task = w_task * mean
    (ε̂_s - ε)^2``, the DDPM task loss against the true noise ε, and ``out = w_out * mean (ε̂_s -
    ε̂_t)^2``, the output-level distillation against the teacher's predicted noise ε̂_t (means
    over every element). Its feature-level term is the ``mse`` entry at every block end,
    weighted by ``loss.feature_weight``. With ``denoise.prediction: v`` both predict the
    velocity: ``task`` is against the true v, ``out`` against the teacher's v̂_t, unchanged."""

    summary = "MSE of the predicted noise (or velocity) to the true one and to the teacher's prediction (BK-SDM)"
    role = "head"
    terms = ("task", "out")
    params = {"task_weight": "task_weight", "output_weight": "output_weight"}

    def __init__(self, task_weight: float = 1.0, output_weight: float = 1.0):
        super().__init__()
        self.task = DDPMLoss(task_weight)
        self.output_weight = float(output_weight)

    def forward(self, student: torch.Tensor, noise: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        with no_autocast(student):
            return {"task": self.task(student, noise),
                    "out": self.output_weight * F.mse_loss(student.float(), teacher.detach().float())}

    def extra_repr(self) -> str:
        return f"task_weight={self.task.task_weight}, output_weight={self.output_weight}"


# -- a causal LM's head: token-level divergences (kdgraph.lm.token_losses), role "token" --


class _TokenHead(nn.Module):
    """``{"ce": w_ce CE(y, z_s), TERM: λ D}`` over the tokens whose target y is not the ignore
    index, D the entry's per-token divergence (``kdgraph.lm.token_losses``) of the student's
    (B, T, V) logits z_s and the teacher's (B, T, V′ ≥ V; trimmed to the student's ids), T²
    times, averaged over those tokens; computed ``chunk`` tokens at a time."""

    role = "token"  # reads (B, T, V) student logits, (B, T) next-token targets, the teacher's logits
    divergence = ""
    coefficient_field: str | None = None
    params = {"ce_weight": "ce_weight", "kl_weight": "kl_weight", "temperature": "temperature",
              "ignore_index": "ignore_index", "chunk": "token_chunk"}

    def __init__(self, ce_weight: float = 0.0, kl_weight: float = 1.0, temperature: float = 1.0,
                 ignore_index: int = -100, chunk: int = 128, coefficient: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.ce_weight, self.kl_weight, self.temperature = float(ce_weight), float(kl_weight), float(temperature)
        self.ignore_index, self.chunk, self.coefficient = int(ignore_index), max(int(chunk), 1), float(coefficient)

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        with no_autocast(student_logits):
            kd, ce = chunked_token_loss(self.divergence, student_logits, teacher_logits, targets,
                                        coefficient=self.coefficient, temperature=self.temperature,
                                        ce_weight=self.ce_weight, ignore_index=self.ignore_index, chunk=self.chunk)
        return {"ce": ce, self.terms[1]: _scaled(kd, self.kl_weight)}

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, chunk={self.chunk}, coefficient={self.coefficient}")


@LOSSES.register("forward_kl")
class ForwardKLTokens(_TokenHead):
    """Forward KL per token: ``fkl = λ T² mean_tokens Σ_v p_v (log p_v − log q_v)``, p = softmax(z_t/T),
    q = softmax(z_s/T) (Hinton et al.; torchtune's KD recipes), plus ``ce = w_ce CE(y, z_s)``."""

    summary = "per-token forward KL(teacher || student) plus weighted cross-entropy, in chunks"
    terms = ("ce", "fkl")
    divergence = "forward_kl"


@LOSSES.register("reverse_kl")
class ReverseKLTokens(_TokenHead):
    """Reverse KL per token: ``rkl = λ T² mean_tokens Σ_v q_v (log q_v − log p_v)`` (MiniLLM, Gu et al.
    2024), plus ``ce = w_ce CE(y, z_s)``."""

    summary = "per-token reverse KL(student || teacher) plus weighted cross-entropy, in chunks"
    terms = ("ce", "rkl")
    divergence = "reverse_kl"


@LOSSES.register("skew_kl")
class SkewKLTokens(_TokenHead):
    """α-skew KL per token (DistiLLM, Ko et al. 2024): ``skl = λ T² mean_tokens KL(p || α p + (1−α) q)``,
    plus ``ce = w_ce CE(y, z_s)``; α = ``loss.skew_alpha`` in (0, 1)."""

    summary = "per-token skew KL(teacher || α teacher + (1−α) student) (DistiLLM) plus cross-entropy, in chunks"
    terms = ("ce", "skl")
    divergence = "skew_kl"
    params = {**_TokenHead.params, "coefficient": "skew_alpha"}


@LOSSES.register("jsd")
class GeneralisedJSDTokens(_TokenHead):
    """Generalised JSD per token (GKD, Agarwal et al. 2024): ``jsd = λ T² mean_tokens [β KL(p || m) +
    (1−β) KL(q || m)]``, m = β p + (1−β) q, plus ``ce = w_ce CE(y, z_s)``; β = ``loss.jsd_beta`` in (0, 1)."""

    summary = "per-token generalised JSD(β) of teacher and student (GKD) plus cross-entropy, in chunks"
    terms = ("ce", "jsd")
    divergence = "jsd"
    params = {**_TokenHead.params, "coefficient": "jsd_beta"}


@LOSSES.register("token_ce")
class TokenCrossEntropy(nn.Module):
    """Next-token cross-entropy: ``ce = mean_tokens −log softmax(z_s)_y`` over the tokens whose
    target y is not the ignore index, of (B, T, V) student logits z_s and (B, T) targets y; a
    causal LM's head loss without a teacher."""

    summary = "next-token cross-entropy of a causal LM (no teacher)"
    role = "token"
    terms = ("ce",)
    params = {"ignore_index": "ignore_index"}

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with no_autocast(student_logits):
            return F.cross_entropy(student_logits.float().flatten(0, -2), targets.reshape(-1),
                                   ignore_index=self.ignore_index)


# The dense task's losses (pixel_ce, pixel_kl, cwd, pkd) register themselves where they are
# defined; imported here so that this module's LOSSES lists every built-in loss on its own.
from kdgraph.segmentation import losses as _dense_losses  # noqa: E402,F401
