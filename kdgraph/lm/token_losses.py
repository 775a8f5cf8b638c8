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
it walks the flattened tokens ``chunk`` at a time and keeps only the sums and, where the
student's logits need a gradient, each chunk's divergence gradient (autograd's, of the same
per-token formula, taken there and then), in the one buffer the size of the student logits
that autograd returns anyway. Backward scales that buffer by the divergence's incoming gradient
and adds the cross-entropy's, w_ce (softmax(z_s) − onehot(y)) per valid token, a chunk at a
time in place: nothing is recomputed but that softmax, and the teacher's logits are not kept
for it. The token count that makes the sums means stays on the device (no host sync).

The teacher is its (B, T, V′) logits, or a top-k token cache's (probabilities at T, ids) of
its k likeliest ids per token (``kdgraph.teacher_cache``): p is then FKD's marginal smoothing,

    p~_v = p_v                 for the k cached ids
    p~_v = r / (V − k)         otherwise,  r = max(1 − Σ cached p, 0)

floored at the smallest normal float32 (so that log p~ is finite where r is 0), and each
divergence reads log p~ in place of log softmax(z_t / T) (``topk_log_probs``; built a chunk at a
time, like the rest). ``topk_kl`` is KL(p || p~): what top-k replay loses against the full
distribution, per token.

A teacher whose vocabulary is padded past the student's (Qwen2.5-7B's 152064 rows against
0.5B's 151936) is trimmed to the student's ids (the tokenizers must agree on them:
``kdgraph.lm.vocab.shared_vocabulary``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdgraph.registry import TOKEN_DIVERGENCES

__all__ = ["chunked_token_loss", "spread_topk", "token_divergence", "topk_kl", "topk_log_probs",
           "trim_vocabulary"]


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


# the names loss.token accepts are declared in kdgraph.registry (torch-free, read by the spec)
for _name, _divergence in (("forward_kl", _forward_kl), ("reverse_kl", _reverse_kl), ("skew_kl", _skew_kl),
                           ("jsd", _jsd)):
    TOKEN_DIVERGENCES.register(_name, _divergence)
del _name, _divergence


def spread_topk(probs: torch.Tensor, indices: torch.Tensor, classes: int) -> torch.Tensor:
    """FKD's soft label p~ (N, C) of top-k probabilities and ids (N, k): the cached
    probabilities at their ids, the rest of the mass (clamped at 0: fp16 sums may pass 1)
    spread evenly over the other C − k ids."""
    probs = probs.float()
    k = probs.shape[-1]
    rest = (1.0 - probs.sum(dim=-1, keepdim=True)).clamp_min(0.0) / max(classes - k, 1)
    full = rest.expand(probs.shape[0], classes) if classes > k else probs.new_zeros(probs.shape[0], classes)
    return full.scatter(1, indices.long(), probs)


def topk_log_probs(probs: torch.Tensor, indices: torch.Tensor, classes: int) -> torch.Tensor:
    """log p~ (N, C) of a top-k cache's rows (``spread_topk``), p~ floored at the smallest
    normal float32: finite where the rest is 0 (a reverse KL then pushes q off those ids)."""
    return spread_topk(probs, indices, classes).clamp_min(torch.finfo(torch.float32).tiny).log()


def topk_kl(logits: torch.Tensor, k: int,
            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(p || p~) per row, the rows' top-k probabilities as fp16 and their ids): p =
    softmax(z / T) of (N, V) logits, p~ its top-k reconstruction from what a top-k cache stores
    (the probabilities rounded to fp16). In nats."""
    z = _wide(logits) / temperature
    p = torch.softmax(z, dim=-1)
    top, ids = p.topk(k, dim=-1)
    top = top.half()
    return (p * (F.log_softmax(z, dim=-1) - topk_log_probs(top, ids, z.shape[-1]))).sum(-1), top, ids


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


def _tempered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z / T``, skipped at T = 1 (z / 1 is z exactly: the same values, one op fewer)."""
    return z if temperature == 1.0 else z / temperature


def token_divergence(*, name: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, coefficient: float,
                     temperature: float, ce_weight: float, ignore_index: int,
                     ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over valid tokens of T²·divergence, sum over valid tokens of w_ce·CE) of flattened
    (N, V) student and teacher logits and (N,) targets; in float32 (float64 inputs: float64).
    With ``ids`` (N, k), ``t`` is the (N, k) top-k probabilities at T of a token cache. At T = 1
    the CE reads log q itself (cross-entropy is the NLL of log_softmax: the same values, one
    log-softmax fewer), and the identities z / 1 and · 1² are skipped."""
    valid = y != ignore_index
    s = _wide(s)
    log_q = F.log_softmax(_tempered(s, temperature), dim=-1)
    if ids is None:
        log_p = F.log_softmax(_tempered(_wide(t), temperature), dim=-1)
    else:
        log_p = topk_log_probs(t, ids, s.shape[-1]).to(s.dtype)
    div = TOKEN_DIVERGENCES.get(name)(log_q, log_p, coefficient)
    if temperature != 1.0:
        div = div * (temperature ** 2)
    kd = torch.where(valid, div, 0.0).sum()
    if ce_weight == 0.0:
        return kd, kd.new_zeros(())
    log_s = log_q if temperature == 1.0 else F.log_softmax(s, dim=-1)
    ce = F.nll_loss(log_s, y, ignore_index=ignore_index, reduction="sum")
    return kd, ce if ce_weight == 1.0 else ce * ce_weight


def _chunk_terms(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None, y: torch.Tensor, settings: dict,
                 grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_divergence`` of one chunk's rows; with ``grad`` (those rows of the gradient
    buffer), the divergence sum's gradient with respect to ``s`` is written into it."""
    if grad is None:
        return token_divergence(s=s, t=t, y=y, ids=ids, **settings)
    with torch.enable_grad():
        sc = s.detach().requires_grad_(True)
        kd, ce = token_divergence(s=sc, t=t, y=y, ids=ids, **settings)
        g, = torch.autograd.grad(kd, sc)
    grad.copy_(g)
    return kd.detach(), ce.detach()


def _chunked(chunk: int, *tensors: torch.Tensor | None) -> list[tuple]:
    """The tensors' rows ``chunk`` at a time, as tuples of one chunk of each (None stays None);
    where one chunk holds every row, the tensors themselves, unsliced."""
    n = tensors[0].shape[0]
    if chunk >= n:
        return [tensors]
    count = -(-n // chunk)
    return list(zip(*[[None] * count if x is None else x.split(chunk) for x in tensors]))


def _add_ce_grad(grad: torch.Tensor, s: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, a: torch.Tensor,
                 chunk: int) -> None:
    """``grad`` ← a·grad + w·(softmax(s) − onehot(targets)) in place, ``chunk`` rows at a time:
    the gradient of a·(divergence sum) + c·(CE sum), ``grad`` holding the first's at a = 1 and
    ``w`` (N, 1) being c on the rows whose target counts, 0 on the others. float32 (float64)
    logits: three passes over each chunk (softmax, a·grad, + w·q); a half-precision ``grad`` is
    summed in float32 and rounded once."""
    if s.dtype in (torch.float32, torch.float64):
        grad.mul_(a)
        for g, sp, wp in _chunked(chunk, grad, s, w):
            g.addcmul_(torch.softmax(sp, dim=-1), wp)
        grad.scatter_add_(1, targets, -w)
        return
    for g, sp, wp, tp in _chunked(chunk, grad, s, w, targets):
        q = torch.softmax(sp, dim=-1, dtype=torch.float32).mul_(wp).scatter_add_(1, tp, -wp)
        g.copy_(q.addcmul_(g, a))


class _Chunked(torch.autograd.Function):
    """Forward: the chunks' summed (divergence, CE) terms and, where the student's logits need
    a gradient, the divergence's gradient chunk by chunk in one buffer. Backward: that buffer
    scaled, plus the CE's gradient, a chunk at a time in place (``_add_ce_grad``)."""

    @staticmethod
    def forward(ctx, s, t, ids, y, settings, chunk):
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        kd_total = ce_total = None
        for sp, tp, ip, yp, gp in _chunked(chunk, s, t, ids, y, grad):
            kd, ce = _chunk_terms(sp, tp, ip, yp, settings, gp)
            kd_total = kd if kd_total is None else kd_total + kd
            ce_total = ce if ce_total is None else ce_total + ce
        # the mean's 1 / (valid tokens), on the device: no host sync (a float count is exact below 2^24 tokens)
        valid = y != settings["ignore_index"]
        scale = valid.sum(dtype=kd_total.dtype).clamp_min(1).reciprocal()
        ce_rows = s if grad is not None and settings["ce_weight"] != 0.0 else None
        ctx.save_for_backward(ce_rows, valid, y, grad, scale)
        ctx.ce_weight, ctx.chunk = settings["ce_weight"], chunk
        return kd_total * scale, ce_total * scale

    @staticmethod
    def backward(ctx, d_kd, d_ce):
        s, valid, y, grad, scale = ctx.saved_tensors
        a = d_kd * scale
        if s is None:  # no CE term: the divergence's gradient alone
            return grad.mul_(a), None, None, None, None, None
        w = torch.where(valid, d_ce * scale * ctx.ce_weight, 0.0).unsqueeze(-1)
        targets = torch.where(valid, y, 0).unsqueeze(-1)  # an id on every row (w is 0 where it does not count)
        _add_ce_grad(grad, s, w, targets, a, ctx.chunk)
        return grad, None, None, None, None, None


def _teacher_rows(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher flattened to rows: (N, V) logits cut to the student's ids and None, or a
    top-k cache's (N, k) probabilities and ids."""
    vocab = student_logits.shape[-1]
    if isinstance(teacher, tuple):
        probs, ids = teacher
        return probs.detach().reshape(-1, probs.shape[-1]), ids.reshape(-1, ids.shape[-1])
    teacher = teacher.detach() if teacher.requires_grad else teacher  # a teacher's logits have no graph
    return trim_vocabulary(student_logits, teacher).reshape(-1, vocab), None


def chunked_token_loss(name: str, student_logits: torch.Tensor,
                       teacher_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                       targets: torch.Tensor, *, coefficient: float = 0.5, temperature: float = 1.0,
                       ce_weight: float = 0.0, ignore_index: int = -100,
                       chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence term, CE term) of (B, T, V) student logits, (B, T, V′ ≥ V) teacher logits (or
    a top-k token cache's (B, T, k) probabilities at T and ids < V) and (B, T) targets: each the
    mean over the tokens whose target is not ``ignore_index`` (0 where none is), ``chunk``
    tokens at a time (``chunk`` ≥ B·T: the whole at once)."""
    if name not in TOKEN_DIVERGENCES:
        raise ValueError(f"unknown token divergence {name!r}; known: {', '.join(TOKEN_DIVERGENCES)}")
    if name in ("skew_kl", "jsd") and not 0.0 < coefficient < 1.0:
        raise ValueError(f"{name}: the coefficient must lie in (0, 1), got {coefficient}")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t, ids = _teacher_rows(student_logits, teacher_logits)
    y = targets.reshape(-1)
    if not s.shape[0] == t.shape[0] == y.shape[0]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher "
                         f"{tuple(t.shape)} and targets {tuple(targets.shape)} differ in tokens")
    settings = {"name": name, "coefficient": float(coefficient), "temperature": float(temperature),
                "ce_weight": float(ce_weight), "ignore_index": int(ignore_index)}
    return _Chunked.apply(s, t, ids, y, settings, max(int(chunk), 1))
