"""Token-level distillation divergences of causal LMs, computed in chunks of tokens.

Per token, with student distribution q = softmax(z_s / T) and teacher p = softmax(z_t / T)
over the shared vocabulary:

    forward KL   KL(p || q)          = Σ_v p_v (log p_v − log q_v)               (Hinton; torchtune)
    reverse KL   KL(q || p)          = Σ_v q_v (log q_v − log p_v)               (MiniLLM)
    skew KL      KL(p || α p + (1−α) q)                                          (DistiLLM, α)
    JSD(β)       β KL(p || m) + (1−β) KL(q || m),  m = β p + (1−β) q              (GKD, β)

Each is T² times the mean over the tokens whose target is not ``ignore_index`` (padding),
plus ``w_ce`` times the cross-entropy of the student logits (at T = 1) with the targets.

``chunked_token_loss`` never holds batch × sequence × vocabulary float32 intermediates whole:
it walks the flattened tokens ``chunk`` at a time and keeps only the sums; backward walks them
again, recomputing each chunk with autograd and writing its gradient into the one buffer the
size of the student logits that autograd returns anyway. The gradient is autograd's of the
same per-token formula.

A teacher whose vocabulary is padded past the student's (Qwen2.5-7B's 152064 rows against
0.5B's 151936) is trimmed to the student's ids (the tokenizers must agree on them:
``kdgraph.lm.vocab.shared_vocabulary``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "chunked_token_loss", "token_divergence", "trim_vocabulary"]


def _forward_kl(log_q: torch.Tensor, log_p: torch.Tensor, _: float) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor, _: float) -> torch.Tensor:
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _skew_kl(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    # log m = log(α p + (1 − α) q), stably
    log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    return (log_p.exp() * (log_p - log_m)).sum(-1)


def _jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "skew_kl": _skew_kl, "jsd": _jsd}
"""Name -> per-token divergence(log q, log p, coefficient) of (N, V) log-probabilities -> (N,)."""


def trim_vocabulary(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's logits over the student's ids: its padding rows past them dropped. A
    teacher with fewer ids than the student is an error (no target for the rest)."""
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vt < vs:
        raise ValueError(f"the teacher's logits have {vt} ids, the student's {vs}: the teacher gives no "
                         "target for the rest")
    return teacher_logits if vt == vs else teacher_logits[..., :vs]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 where given (half and bfloat16 logits are cast up)."""
    return x if x.dtype == torch.float64 else x.float()


def token_divergence(*, name: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, coefficient: float,
                     temperature: float, ce_weight: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid tokens of T²·divergence, sum over valid tokens of w_ce·CE) of flattened
    (N, V) student and teacher logits and (N,) targets; in float32 (float64 inputs: float64)."""
    valid = y != ignore_index
    s, t = _wide(s), _wide(t)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    div = DIVERGENCES[name](log_q, log_p, coefficient) * (temperature ** 2)
    kd = torch.where(valid, div, 0.0).sum()
    if ce_weight == 0.0:
        return kd, kd.new_zeros(())
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum")
    return kd, ce * ce_weight


class _Chunked(torch.autograd.Function):
    """Forward: the chunks' summed (divergence, CE) terms, nothing kept but the inputs. Backward:
    each chunk recomputed with autograd and its gradient written into one buffer (as activation
    checkpointing does, a chunk at a time)."""

    @staticmethod
    def forward(ctx, s, t, y, settings, chunk, scale):
        kd_total = _wide(s.new_zeros(()))
        ce_total = _wide(s.new_zeros(()))
        for start in range(0, s.shape[0], chunk):
            part = slice(start, start + chunk)
            kd, ce = token_divergence(s=s[part], t=t[part], y=y[part], **settings)
            kd_total += kd
            ce_total += ce
        ctx.save_for_backward(s, t, y)
        ctx.settings, ctx.chunk, ctx.scale = settings, chunk, scale
        return kd_total * scale, ce_total * scale

    @staticmethod
    def backward(ctx, d_kd, d_ce):
        s, t, y = ctx.saved_tensors
        grad = torch.empty_like(s)
        for start in range(0, s.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            with torch.enable_grad():
                sc = s[part].detach().requires_grad_(True)
                kd, ce = token_divergence(s=sc, t=t[part], y=y[part], **ctx.settings)
                g, = torch.autograd.grad(kd * (d_kd * ctx.scale) + ce * (d_ce * ctx.scale), sc)
            grad[part] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def chunked_token_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       targets: torch.Tensor, *, coefficient: float = 0.5, temperature: float = 1.0,
                       ce_weight: float = 0.0, ignore_index: int = -100,
                       chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence term, CE term) of (B, T, V) student logits, (B, T, V′ ≥ V) teacher logits and
    (B, T) targets: each the mean over the tokens whose target is not ``ignore_index`` (0 where
    none is), ``chunk`` tokens at a time (``chunk`` ≥ B·T: the whole at once)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown token divergence {name!r}; known: {', '.join(DIVERGENCES)}")
    if name in ("skew_kl", "jsd") and not 0.0 < coefficient < 1.0:
        raise ValueError(f"{name}: the coefficient must lie in (0, 1), got {coefficient}")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = trim_vocabulary(student_logits, teacher_logits.detach()).reshape(-1, vocab)
    y = targets.reshape(-1)
    if not s.shape[0] == t.shape[0] == y.shape[0]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and targets {tuple(targets.shape)} differ in tokens")
    scale = 1.0 / max(int((y != ignore_index).sum()), 1)
    settings = {"name": name, "coefficient": float(coefficient), "temperature": float(temperature),
                "ce_weight": float(ce_weight), "ignore_index": int(ignore_index)}
    return _Chunked.apply(s, t, y, settings, max(int(chunk), 1), scale)
