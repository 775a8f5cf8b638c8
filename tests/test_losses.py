"""Losses against hand computation with explicit sums, exps and logs (plain Python math)."""

import math

import pytest
import torch

from kdgraph.losses import FeatureMSE, HeadLoss, KLDivergence

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
Y = [1, 2]


def softmax(row, temp=1.0):
    e = [math.exp(v / temp) for v in row]
    z = sum(e)
    return [v / z for v in e]


def hand_kl(s, t, temp):
    total = 0.0
    for srow, trow in zip(s, t):
        ps, pt = softmax(srow, temp), softmax(trow, temp)
        total += sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(len(srow)))
    return total / len(s) * temp * temp


def hand_ce(s, y, smoothing=0.0):
    total = 0.0
    for row, label in zip(s, y):
        logp = [math.log(p) for p in softmax(row)]
        k = len(row)
        # label smoothing: target = (1 - eps) one-hot + eps / k uniform
        total += -sum(((1 - smoothing) * (c == label) + smoothing / k) * logp[c] for c in range(k))
    return total / len(s)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_matches_hand(temp):
    got = KLDivergence(temp)(torch.tensor(S), torch.tensor(T))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hand_kl(S, T, temp), rel=1e-5)


def test_kl_zero_when_equal_and_no_teacher_grad():
    """Equal logits: the loss and the student's gradient are 0 (a gradient, not None: the student
    is in the graph), the teacher gets none. Unequal: the student's gradient is the hand one,
    d/ds T^2 KL(p_t || p_s) = T (p_s - p_t) / B, and the teacher still gets none."""
    temp = 3.0
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(S, requires_grad=True)
    loss = KLDivergence(temp)(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().max().item() < 1e-6
    assert t.grad is None
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    KLDivergence(temp)(s, t).backward()
    want = [[temp * (ps - pt) / len(S) for ps, pt in zip(softmax(srow, temp), softmax(trow, temp))]
            for srow, trow in zip(S, T)]
    torch.testing.assert_close(s.grad, torch.tensor(want), rtol=1e-5, atol=1e-7)
    assert t.grad is None


def test_feature_mse_matches_hand():
    """The value, and the gradients: the student's is the hand one, 2 (a - b) / N, the
    teacher's none (both inputs require a gradient, so a detach on either side shows)."""
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)  # student
    b = torch.tensor([[[[0.0, 2.0], [5.0, 3.0]]]], requires_grad=True)  # teacher
    want = ((1 - 0) ** 2 + 0 + (3 - 5) ** 2 + (4 - 3) ** 2) / 4
    got = FeatureMSE()(a, b)
    assert got.item() == pytest.approx(want)
    assert got.requires_grad  # through the student
    got.backward()
    assert a.grad is not None
    torch.testing.assert_close(a.grad, torch.tensor([[[[2 * (1 - 0) / 4, 0.0], [2 * (3 - 5) / 4, 2 * (4 - 3) / 4]]]]))
    assert b.grad is None  # the teacher side is detached


def test_dense_logits_are_one_sample_per_pixel():
    """(B, C, H, W) logits of a per-pixel task against the hand computation on the (B*H*W, C)
    rows taken with C moved last: row (b, h, w) is [x[b, c, h, w] for c]. (A reshape without
    moving C would mix classes of different pixels into one row.)"""
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 2, 3, 2, 4
    s, t = torch.randn(B, C, H, W, generator=g) * 2, torch.randn(B, C, H, W, generator=g) * 2
    y = torch.randint(0, C, (B, H, W), generator=g)

    def rows(x):
        return [[x[b, c, h, w].item() for c in range(C)] for b in range(B) for h in range(H) for w in range(W)]

    labels = [y[b, h, w].item() for b in range(B) for h in range(H) for w in range(W)]
    for temp in (1.0, 2.0):
        assert KLDivergence(temp)(s, t).item() == pytest.approx(hand_kl(rows(s), rows(t), temp), rel=1e-5)
    out = HeadLoss(kl_weight=0.5, temperature=2.0, label_smoothing=0.1)(s, y, t)
    assert out["ce"].item() == pytest.approx(hand_ce(rows(s), labels, 0.1), rel=1e-5)
    assert out["kl"].item() == pytest.approx(0.5 * hand_kl(rows(s), rows(t), 2.0), rel=1e-5)


def test_feature_mse_shape_mismatch():
    with pytest.raises(ValueError, match="adapter"):
        FeatureMSE()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_head_loss(smoothing):
    loss = HeadLoss(kl_weight=0.5, temperature=2.0, label_smoothing=smoothing)
    out = loss(torch.tensor(S), torch.tensor(Y), torch.tensor(T))
    assert set(out) == {"ce", "kl"}
    assert out["ce"].item() == pytest.approx(hand_ce(S, Y, smoothing), rel=1e-5)
    assert out["kl"].item() == pytest.approx(0.5 * hand_kl(S, T, 2.0), rel=1e-5)
    assert set(loss(torch.tensor(S), torch.tensor(Y))) == {"ce"}


def test_float32_under_autocast_with_bf16_inputs():
    s, t = torch.tensor(S).bfloat16(), torch.tensor(T).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = KLDivergence(2.0)(s, t)
        out = HeadLoss(1.0, 2.0)(s, torch.tensor(Y), t)
        mse = FeatureMSE()(s, t)
    for v in (kl, out["ce"], out["kl"], mse):
        assert v.dtype == torch.float32
    # bf16 rounding of these small integers is exact, so the values match the float32 ones
    assert kl.item() == pytest.approx(hand_kl(S, T, 2.0), rel=1e-5)


# -- the registry: every entry describes itself, and is checked against its formula by hand --

def test_every_loss_entry_describes_itself():
    import inspect

    import kdgraph.models  # noqa: F401  (imports the task libraries that register their own losses)
    from kdgraph.losses import LOSSES
    from kdgraph.spec import LossSpec

    own = {"pixel_kl", "pixel_ce", "cwd", "pkd"}  # the dense task's (kdgraph.segmentation.losses)
    assert [n for n in LOSSES.names() if n not in own] == [
        "mse", "cosine", "ce", "kd", "fkd", "tpp", "dfm", "dkd", "dist", "ddpm", "denoise",
        "forward_kl", "reverse_kl", "skew_kl", "jsd", "token_ce"]
    assert own <= set(LOSSES.names())
    fields = set(LossSpec.model_fields) | {"fmt"}
    for name in LOSSES:
        cls = LOSSES.get(name)
        assert cls.__doc__ and "=" in cls.__doc__, f"{name}: the docstring gives the formula"
        assert cls.summary and "\n" not in cls.summary
        assert cls.role in ("head", "feature", "tpp", "token") and cls.terms
        assert all(("{block}" in t) == (cls.role == "feature") for t in cls.terms), name
        assert set(cls.params.values()) <= fields, f"{name}: params read loss.* fields"
        assert set(cls.params) <= set(inspect.signature(cls).parameters), name
        assert not list(cls(**{a: {"layout": "NCHW", "channels": 2, "hw": (2, 2)} if f == "fmt" else 0.5
                               for a, f in cls.params.items()}).state_dict()), f"{name} holds no state"


def test_term_names_and_params_come_from_the_entries():
    from kdgraph.losses import resolve_params, term_names

    assert term_names("mse", 3) == ("mse3",) and term_names("dfm", 2) == ("dfm2_direct", "dfm2_alt")
    assert term_names("kd") == ("ce", "kl") and term_names("ce") == ("ce",) and term_names("tpp") == ("tpp",)
    spec = {"kl_weight": 0.5, "temperature": 4.0, "label_smoothing": 0.1, "feature_weight": 2.0, "tpp_weight": 3.0}
    spec |= {"ce_weight": 1.0, "standardize": False}
    assert resolve_params("kd", spec) == {"ce_weight": 1.0, "kl_weight": 0.5, "temperature": 4.0,
                                          "label_smoothing": 0.1, "standardize": False}
    assert resolve_params("mse", spec) == {"weight": 2.0}
    assert resolve_params("tpp", spec) == {"weight": 3.0, "temperature": 4.0}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_entry_matches_hand(smoothing):
    from kdgraph.losses import CrossEntropy

    got = CrossEntropy(label_smoothing=smoothing)(torch.tensor(S), torch.tensor(Y))
    assert got.item() == pytest.approx(hand_ce(S, Y, smoothing), rel=1e-5)


def test_tpp_entry_matches_hand():
    from kdgraph.losses import TeacherParameterPerception

    got = TeacherParameterPerception(weight=0.25, temperature=2.0)(torch.tensor(S), torch.tensor(T))
    assert got.item() == pytest.approx(0.25 * hand_kl(S, T, 2.0), rel=1e-5)


def test_feature_mse_weight_multiplies_the_mean():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert FeatureMSE(weight=3.0)(a, b).item() == pytest.approx(3.0 * (1 + 4) / 2)


def test_the_spec_offers_every_feature_loss_and_no_other():
    """``loss.feature``'s choices are the LOSSES entries of role feature. The spec cannot read
    the registry (it imports no torch), so this test keeps the two lists equal."""
    import typing

    from kdgraph.losses import LOSSES
    from kdgraph.spec import LossSpec

    from kdgraph.spec.schema import LayerPair

    offered = typing.get_args(LossSpec.model_fields["feature"].annotation)
    assert sorted(offered) == sorted(n for n in LOSSES if LOSSES.get(n).role == "feature")
    assert LayerPair.model_fields["loss"].annotation == LossSpec.model_fields["feature"].annotation


def test_the_spec_offers_every_logit_loss_and_its_own_fields():
    """``loss.logit``'s choices are LOGIT_LOSSES (torch-free, read by the spec); each names a
    head entry of LOSSES with the same summary, whose params read exactly its own fields and
    the shared ones, and no other logit loss's. The spec describes every choice."""
    from kdgraph.losses import LOSSES
    from kdgraph.registry import LOGIT_LOSSES
    from kdgraph.spec import LossSpec

    shared = {"ce_weight", "label_smoothing", "temperature", "standardize"}
    # ce: the head without a teacher; fkd: the head of a top-k teacher cache (the compiler's choice);
    # ddpm, denoise: the heads of the denoising task (spec denoise); pixel_kl, cwd: the heads of the
    # dense task (issue 41), chosen by that task, not by loss.logit
    heads_with_teacher = {n for n in LOSSES if LOSSES.get(n).role == "head"} - {"ce", "fkd", "ddpm", "denoise",
                                                                                  "pixel_kl", "pixel_ce", "cwd"}
    assert {LOGIT_LOSSES.get(n).entry for n in LOGIT_LOSSES} == heads_with_teacher
    description = LossSpec.model_fields["logit"].description
    for name in LOGIT_LOSSES:
        record = LOGIT_LOSSES.get(name)
        cls = LOSSES.get(record.entry)
        assert cls.role == "head" and cls.summary == record.summary
        assert set(cls.params.values()) == shared | set(record.own), name
        assert f"{name} ({record.summary})" in description
        others = {f for n in LOGIT_LOSSES if n != name for f in LOGIT_LOSSES.get(n).own}
        assert not others & set(record.own)


# -- the causal-LM token entries: the divergences are checked against their papers' formulas in
# tests/test_token_losses.py; here, what each entry adds (weights, terms, spec fields) --

@pytest.mark.parametrize("name,term,field", [("forward_kl", "fkl", None), ("reverse_kl", "rkl", None),
                                             ("skew_kl", "skl", "skew_alpha"), ("jsd", "jsd", "jsd_beta")])
def test_token_entries_weight_their_divergence_and_cross_entropy(name, term, field):
    from kdgraph.lm.token_losses import chunked_token_loss
    from kdgraph.losses import LOSSES, create_loss, resolve_params, term_names
    from kdgraph.spec import LossSpec

    assert term_names(name) == ("ce", term) and LOSSES.get(name).role == "token"
    spec = LossSpec(ce_weight=0.25, kl_weight=3.0, temperature=2.0, ignore_index=-1, token_chunk=5,
                    skew_alpha=0.2, jsd_beta=0.3).model_dump()
    params = resolve_params(name, spec)
    assert params["chunk"] == 5 and params["ignore_index"] == -1
    assert params.get("coefficient") == (spec[field] if field else None)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 12, generator=g)
    y = torch.randint(0, 9, (2, 6), generator=g)
    y[1, :3] = -1
    got = create_loss(name, params)(s, y, t)
    kd, ce = chunked_token_loss(name, s, t, y, coefficient=params.get("coefficient", 0.5), temperature=2.0,
                                ce_weight=1.0, ignore_index=-1, chunk=10**6)
    assert list(got) == ["ce", term]
    assert got[term].item() == pytest.approx(3.0 * kd.item(), rel=1e-6)
    assert got["ce"].item() == pytest.approx(0.25 * ce.item(), rel=1e-6)


# -- cosine hidden-state loss: 1 - cos(s, t) along the channel axis, written out with sums --

def _hand_cosine(s, t, axis: int, w: float) -> float:
    dot = (s * t).sum(axis)
    norms = (s * s).sum(axis).sqrt() * (t * t).sum(axis).sqrt()
    return w * (1 - dot / norms).mean().item()


def test_feature_cosine_matches_the_formula_on_tokens_and_maps():
    from kdgraph.losses import LOSSES

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, 5, generator=g, dtype=torch.float64), torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    tokens = LOSSES.get("cosine")(fmt={"layout": "tokens", "channels": 5, "hw": (1, 7)}, weight=0.7)
    assert tokens(s.float(), t.float()).item() == pytest.approx(_hand_cosine(s, t, -1, 0.7), rel=1e-5)
    m_s, m_t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    maps = LOSSES.get("cosine")(fmt={"layout": "NCHW", "channels": 3, "hw": (4, 4)})
    assert maps(m_s, m_t).item() == pytest.approx(_hand_cosine(m_s.double(), m_t.double(), 1, 1.0), rel=1e-5)
    nhwc = LOSSES.get("cosine")(fmt={"layout": "NHWC", "channels": 4, "hw": (4, 3)})
    assert nhwc(m_s, m_t).item() == pytest.approx(_hand_cosine(m_s.double(), m_t.double(), -1, 1.0), rel=1e-5)
    # scale-free along channels, 0 on the teacher itself, 2 on its negative; no gradient into the teacher
    assert tokens(3 * t.float(), t.float()).item() == pytest.approx(0.0, abs=1e-6)
    assert tokens(-t.float(), t.float()).item() == pytest.approx(2 * 0.7, rel=1e-6)
    student, teacher = s.float().requires_grad_(), t.float().requires_grad_()
    tokens(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="differ in shape; an adapter is missing"):
        tokens(torch.zeros(2, 7, 4), torch.zeros(2, 7, 5))


def test_loss_feature_cosine_reaches_the_plan_of_a_causal_lm_pair():
    pytest.importorskip("transformers")
    from kdgraph.compiler import compile_spec
    from kdgraph.spec import load_spec

    kw = {"vocab_size": 260, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    spec = load_spec({"name": "c", "data": {"dataset": "text", "seq_len": 8},
                      "teacher": {"model": "transformers:llama", "kwargs": {**kw, "hidden_size": 32, "num_hidden_layers": 4}},
                      "student": {"model": "transformers:llama", "kwargs": {**kw, "hidden_size": 16, "num_hidden_layers": 2}},
                      "schedule": {"method": "kd+mse"}, "decompose": {"blocks": 3}, "loss": {"feature": "cosine"}})
    compiled = compile_spec(spec, materialize=False)
    entries = [d for _, d in compiled.graph.nodes(data=True) if d.get("kind") == "loss" and d.get("loss") == "feature"]
    assert len(entries) == 2 and all(d["entry"] == "cosine" for d in entries)
    assert all(d["params"]["fmt"]["layout"] == "tokens" and d["params"]["fmt"]["channels"] == 32 for d in entries)
