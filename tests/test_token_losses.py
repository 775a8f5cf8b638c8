"""Token-level divergences of causal LMs, in chunks (kdgraph/lm/token_losses.py).

Independent truth: each paper's formula written out here in float64 NumPy (forward KL; reverse
KL, MiniLLM; α-skew KL, DistiLLM eq. 3: KL(p || αp + (1−α)q); generalised JSD, GKD eq. 2:
β KL(p || m) + (1−β) KL(q || m), m = βp + (1−β)q), the padding left out by hand, and the
gradient of the same written-out formula taken by torch autograd in float64 on the whole
batch (never chunked). Peak memory is read from torch's CPU memory profiler.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdgraph.lm.token_losses import chunked_token_loss, token_divergence, topk_kl, trim_vocabulary
from kdgraph.registry import TOKEN_DIVERGENCES

IGNORE = -100


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * (np.log(a) - np.log(b))).sum(-1)


def _hand(name, s, t, y, coefficient, temperature, ce_weight, p=None):
    """(mean divergence · T², mean w_ce · CE) over the tokens whose target is not IGNORE; ``p``:
    the teacher's distribution given whole (N, V) in place of softmax(t / T)."""
    s, y = s.reshape(-1, s.shape[-1]), y.reshape(-1)
    q = _softmax(s / temperature)
    if p is None:
        p = _softmax(t[..., :s.shape[-1]].reshape(-1, s.shape[-1]) / temperature)
    if name == "forward_kl":
        d = _kl(p, q)
    elif name == "reverse_kl":
        d = _kl(q, p)
    elif name == "skew_kl":
        d = _kl(p, coefficient * p + (1 - coefficient) * q)
    else:
        m = coefficient * p + (1 - coefficient) * q
        d = coefficient * _kl(p, m) + (1 - coefficient) * _kl(q, m)
    keep = y != IGNORE
    ce = -np.log(_softmax(s)[np.arange(len(y)), np.where(keep, y, 0)])
    n = max(keep.sum(), 1)
    return (d * temperature ** 2)[keep].sum() / n, ce_weight * ce[keep].sum() / n


def _torch_formula(name, s, t, y, coefficient, temperature, ce_weight):
    """The same formula in torch float64, whole (for autograd's gradient)."""
    t = t[..., :s.shape[-1]]
    q, p = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    d = {"forward_kl": lambda: kl(p, q), "reverse_kl": lambda: kl(q, p),
         "skew_kl": lambda: kl(p, coefficient * p + (1 - coefficient) * q),
         "jsd": lambda: coefficient * kl(p, coefficient * p + (1 - coefficient) * q)
         + (1 - coefficient) * kl(q, coefficient * p + (1 - coefficient) * q)}[name]()
    keep = y != IGNORE
    n = keep.sum().clamp(min=1)
    ce = -torch.log_softmax(s, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (d * temperature ** 2 * keep).sum() / n, ce_weight * (ce * keep).sum() / n


def _batch(seed=0, b=3, t=9, v=17, vt=None):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    te = torch.randn(b, t, vt or v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, :4] = IGNORE  # padding
    y[2, -2:] = IGNORE
    return s, te, y


@pytest.mark.parametrize("name,coefficient", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("skew_kl", 0.1),
                                              ("skew_kl", 0.7), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_each_divergence_is_its_papers_formula(name, coefficient, temperature, ce_weight):
    s, t, y = _batch()
    kd, ce = chunked_token_loss(name, s, t, y, coefficient=coefficient, temperature=temperature,
                                ce_weight=ce_weight, ignore_index=IGNORE, chunk=4)
    want_kd, want_ce = _hand(name, s.numpy(), t.numpy(), y.numpy(), coefficient, temperature, ce_weight)
    assert kd.item() == pytest.approx(want_kd, rel=1e-6, abs=1e-9)
    assert ce.item() == pytest.approx(want_ce, rel=1e-6, abs=1e-12)
    assert set(TOKEN_DIVERGENCES) == {"forward_kl", "reverse_kl", "skew_kl", "jsd"}


@pytest.mark.parametrize("name", sorted(TOKEN_DIVERGENCES))
@pytest.mark.parametrize("chunk", [1, 5, 27, 10_000])
@pytest.mark.parametrize("temperature,ce_weight", [(1.5, 0.7), (1.0, 0.0), (1.0, 1.0)])
def test_chunks_give_the_whole_formulas_value_and_gradient(name, chunk, temperature, ce_weight):
    s, t, y = _batch(seed=1)
    s = s.requires_grad_(True)
    kd, ce = chunked_token_loss(name, s, t, y, coefficient=0.3, temperature=temperature, ce_weight=ce_weight,
                                ignore_index=IGNORE, chunk=chunk)
    g_chunked, = torch.autograd.grad(2.0 * kd + 3.0 * ce, s)
    want_kd, want_ce = _torch_formula(name, s, t, y, 0.3, temperature, ce_weight)
    g_whole, = torch.autograd.grad(2.0 * want_kd + 3.0 * want_ce, s)
    assert torch.allclose(kd, want_kd, rtol=1e-10) and torch.allclose(ce, want_ce, rtol=1e-10)
    assert torch.allclose(g_chunked, g_whole, rtol=1e-8, atol=1e-12)
    assert torch.all(g_chunked[0, :4] == 0)  # padding tokens get no gradient


@pytest.mark.parametrize("chunk", [4, 10_000])
def test_half_precision_logits_get_the_whole_formulas_gradient_to_their_precision(chunk):
    """bfloat16 student logits (a bf16 autocast step's): the gradient, in bfloat16, is the float64
    formula's on the same (rounded) values to bfloat16's precision."""
    s, t, y = _batch(seed=7, b=4, t=8, v=64)
    s16, t16 = s.bfloat16().requires_grad_(True), t.bfloat16()
    kd, ce = chunked_token_loss("forward_kl", s16, t16, y, temperature=1.0, ce_weight=0.5, ignore_index=IGNORE,
                                chunk=chunk)
    g, = torch.autograd.grad(0.7 * kd + ce, s16)
    s64 = s16.double().requires_grad_(True)
    want_kd, want_ce = _torch_formula("forward_kl", s64, t16.double(), y, 0.5, 1.0, 0.5)
    g_whole, = torch.autograd.grad(0.7 * want_kd + want_ce, s64)
    assert g.dtype == torch.bfloat16 and torch.all(g[0, :4] == 0)
    assert (g.double() - g_whole).norm() / g_whole.norm() < 2 ** -7  # bfloat16 keeps 8 significant bits
    assert torch.allclose(kd.double(), want_kd, rtol=1e-5) and torch.allclose(ce.double(), want_ce, rtol=1e-5)


def test_the_loss_and_its_gradient_read_nothing_on_the_host():
    """No ``.item()``/``int(tensor)`` (a device sync on a GPU): the token count stays a tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    s, t, y = _batch(seed=8)
    s = s.requires_grad_(True)
    with Reads() as reads:
        kd, ce = chunked_token_loss("jsd", s, t, y, ce_weight=0.5, ignore_index=IGNORE, chunk=5)
        (kd + ce).backward()
    assert "nll_loss_forward" in reads.names and "_local_scalar_dense" not in reads.names
    assert "nonzero" not in reads.names


def test_a_padded_teacher_vocabulary_is_trimmed_to_the_students_ids():
    s, t, y = _batch(seed=2, v=11, vt=16)
    kd, _ = chunked_token_loss("forward_kl", s, t, y, chunk=7)
    trimmed, _ = chunked_token_loss("forward_kl", s, t[..., :11].clone(), y, chunk=7)
    assert torch.equal(kd, trimmed) and trim_vocabulary(s, t).shape[-1] == 11
    with pytest.raises(ValueError, match="teacher gives no target"):
        chunked_token_loss("forward_kl", t, s, y)


def test_bad_settings_are_refused():
    s, t, y = _batch()
    with pytest.raises(ValueError, match="unknown token divergence"):
        chunked_token_loss("tvd", s, t, y)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        chunked_token_loss("jsd", s, t, y, coefficient=1.0)
    with pytest.raises(ValueError, match="differ in tokens"):
        chunked_token_loss("forward_kl", s, t[:, :-1], y)


def test_all_tokens_padded_is_zero_not_nan():
    s, t, y = _batch()
    kd, ce = chunked_token_loss("reverse_kl", s, t, torch.full_like(y, IGNORE), ce_weight=1.0)
    assert kd.item() == 0.0 and ce.item() == 0.0


def _peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once while ``fn`` ran, beyond what it held
    before (torch.profiler's memory events: 'Total Allocated')."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_chunks_hold_a_fraction_of_the_whole_losses_peak():
    torch.manual_seed(0)
    s = torch.randn(4, 128, 2048, requires_grad=True)
    t, y = torch.randn(4, 128, 2048), torch.randint(0, 2048, (4, 128))

    def whole():
        kd, ce = token_divergence(name="forward_kl", s=s.reshape(-1, 2048), t=t.reshape(-1, 2048), y=y.reshape(-1),
                                  coefficient=0.5, temperature=1.0, ce_weight=0.5, ignore_index=IGNORE)
        torch.autograd.grad(kd + ce, s)

    def chunked():
        kd, ce = chunked_token_loss("forward_kl", s, t, y, ce_weight=0.5, chunk=16)
        torch.autograd.grad(kd + ce, s)

    full = s.numel() * 4
    assert _peak_bytes(chunked) <= _peak_bytes(whole) / 4
    assert _peak_bytes(chunked) < 1.5 * full  # the gradient itself, one chunk's work beside it


# -- a top-k token cache's rows as the teacher -----------------------------------------------------

TINY = float(np.finfo(np.float32).tiny)


def _spread_by_hand(probs: np.ndarray, ids: np.ndarray, vocab: int) -> np.ndarray:
    """FKD's marginal smoothing written out per row: the cached probabilities at their ids, the
    rest 1 − Σ (at least 0) shared evenly by the other V − k ids; floored at float32's tiny."""
    out = np.empty((len(probs), vocab))
    for n, (pr, ix) in enumerate(zip(probs.astype(np.float64), ids)):
        rest = max(1.0 - pr.sum(), 0.0) / (vocab - len(ix)) if vocab > len(ix) else 0.0
        out[n] = rest
        out[n, ix] = pr
    return np.maximum(out, TINY)


def _topk_rows(t: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, k) fp16 probabilities at T and int64 ids, as the cache's builder stores them."""
    p, i = torch.softmax(t.float() / temperature, -1).topk(k, -1)
    return p.half(), i


@pytest.mark.parametrize("name,coefficient", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("skew_kl", 0.3),
                                              ("jsd", 0.6)])
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (4, 2.0), (17, 1.0)])
def test_a_topk_teacher_is_the_formula_on_the_spread_distribution(name, coefficient, k, temperature):
    s, t, y = _batch(seed=3)
    probs, ids = _topk_rows(t, k, temperature)
    kd, ce = chunked_token_loss(name, s, (probs, ids), y, coefficient=coefficient, temperature=temperature,
                                ce_weight=0.5, ignore_index=IGNORE, chunk=5)
    p = _spread_by_hand(probs.reshape(-1, k).numpy(), ids.reshape(-1, k).numpy(), s.shape[-1])
    want_kd, want_ce = _hand(name, s.numpy(), None, y.numpy(), coefficient, temperature, 0.5, p=p)
    assert kd.item() == pytest.approx(want_kd, rel=1e-6, abs=1e-9)
    assert ce.item() == pytest.approx(want_ce, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_a_topk_teachers_chunked_gradient_is_the_whole_formulas(chunk):
    s, t, y = _batch(seed=4)
    probs, ids = _topk_rows(t, 5, 1.5)
    s = s.requires_grad_(True)
    kd, ce = chunked_token_loss("reverse_kl", s, (probs, ids), y, temperature=1.5, ce_weight=0.7,
                                ignore_index=IGNORE, chunk=chunk)
    g, = torch.autograd.grad(2.0 * kd + 3.0 * ce, s)
    log_p = torch.from_numpy(np.log(_spread_by_hand(probs.reshape(-1, 5).numpy(), ids.reshape(-1, 5).numpy(), 17)))
    log_q = torch.log_softmax(s.reshape(-1, 17) / 1.5, -1)
    keep = (y.reshape(-1) != IGNORE).double()
    want_kd = ((log_q.exp() * (log_q - log_p)).sum(-1) * 1.5 ** 2 * keep).sum() / keep.sum()
    want_ce = 0.7 * (torch.nn.functional.cross_entropy(s.reshape(-1, 17), y.reshape(-1), ignore_index=IGNORE,
                                                       reduction="sum")) / keep.sum()
    g_whole, = torch.autograd.grad(2.0 * want_kd + 3.0 * want_ce, s)
    # p~ is built in float32 (fp16 probabilities, cast up): float32's precision, not float64's
    assert torch.allclose(kd, want_kd, rtol=1e-6) and torch.allclose(g, g_whole, rtol=1e-5, atol=1e-9)


def test_a_topk_teacher_holding_all_the_mass_gives_finite_reverse_kl():
    """fp16 probabilities summing to 1 or more leave no rest: the other ids get float32's tiny, not 0."""
    s, _, y = _batch(seed=5)
    probs = torch.zeros(3, 9, 2, dtype=torch.float16)
    probs[..., 0], probs[..., 1] = 0.75, 0.2505  # sums past 1 in fp16
    ids = torch.tensor([3, 8]).expand(3, 9, 2)
    kd, _ = chunked_token_loss("reverse_kl", s, (probs, ids), y, ignore_index=IGNORE)
    p = _spread_by_hand(probs.reshape(-1, 2).numpy(), ids.reshape(-1, 2).numpy(), 17)
    assert np.isfinite(kd.item()) and kd.item() == pytest.approx(_hand("reverse_kl", s.numpy(), None, y.numpy(),
                                                                       0.5, 1.0, 0.0, p=p)[0], rel=1e-6)


def test_topk_kl_is_kl_to_the_spread_reconstruction_and_falls_with_k():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(40, 50, generator=g) * 3
    p = _softmax(z.double().numpy() / 2.0)
    kls = []
    for k in (1, 5, 20, 50):
        kl, probs, ids = topk_kl(z, k, temperature=2.0)
        assert probs.dtype == torch.float16 and ids.shape == (40, k)
        want = (p * (np.log(p) - np.log(_spread_by_hand(probs.numpy(), ids.numpy(), 50)))).sum(-1)
        assert np.allclose(kl.numpy(), want, rtol=1e-4, atol=1e-6)
        kls.append(float(kl.mean()))
    assert kls == sorted(kls, reverse=True) and kls[-1] < 1e-3  # k = V: fp16 rounding alone


def test_loss_token_names_are_the_registered_divergences_and_their_loss_entries():
    """One list of names: kdgraph.registry declares them (the spec reads it, torch-free), this
    module registers a divergence for each, kdgraph.losses has a token head entry of each name
    computing that divergence; a name outside it is refused by the spec naming the list."""
    from kdgraph.errors import SpecError
    from kdgraph.losses import LOSSES
    from kdgraph.spec import load_spec

    names = TOKEN_DIVERGENCES.names()
    assert TOKEN_DIVERGENCES.unregistered() == [] and len(names) == 4
    for name in names:
        entry = LOSSES.get(name)
        assert entry.role == "token" and entry.divergence == name
    base = {"name": "x", "student": {"model": "timm:resnet18"}}
    assert [load_spec({**base, "loss": {"token": n}}).loss.token for n in names] == names
    with pytest.raises(SpecError) as info:
        load_spec({**base, "loss": {"token": "kl"}})
    assert info.value.path == "loss.token" and "allowed: " + ", ".join(names) in str(info.value)
