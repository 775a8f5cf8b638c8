"""The recipes' logit losses (DKD, DIST, logit standardisation) against their papers' formulas
written out here with plain torch ops on small hand-chosen tensors, and the identities the
papers state. The implementation is never the reference for itself."""

import pytest
import torch

from kdgraph.losses import DIST, DKD, KLDivergence, LogitStandardization, dkd_warmup

S = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5], [2.5, 0.0, 0.0, 1.0]], dtype=torch.float64)
T = torch.tensor([[2.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, -2.0], [3.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
Y = torch.tensor([1, 2, 0])


def softmax(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def kl(p, q):
    """Per row sum_i p_i log(p_i / q_i)."""
    return (p * torch.log(p / q)).sum(dim=1)


def hand_dkd(s, t, y, alpha, beta, temp):
    """mdistiller's dkd_loss written out: binary [p_t, 1 - p_t] KL, and the KL of the
    non-target distributions formed by subtracting 1000 from the target logit."""
    gt = torch.nn.functional.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = softmax(s / temp), softmax(t / temp)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], dim=1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], dim=1)
    tckd = kl(bt, bs).sum() * temp ** 2 / len(y)
    qs, qt = softmax(s / temp - 1000.0 * gt), softmax(t / temp - 1000.0 * gt)
    keep = gt == 0  # 0 log 0 of the masked column is 0; leave it out of the sum
    nckd = (qt * torch.log(qt / qs))[keep].sum() * temp ** 2 / len(y)
    return alpha * tckd + beta * nckd


def pearson(a, b):
    """Pearson correlation of each row pair: cov / (std std)."""
    da, db = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (da * db).sum(1) / torch.sqrt((da * da).sum(1) * (db * db).sum(1))


def hand_dist(s, t, beta, gamma, tau):
    ys, yt = softmax(s / tau), softmax(t / tau)
    inter = 1 - pearson(ys, yt).mean()
    intra = 1 - pearson(ys.t(), yt.t()).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


def zscore(z):
    """Each row minus its mean over classes, over its Bessel-corrected std (the authors' code)."""
    c = z.shape[1]
    mean = z.sum(1, keepdim=True) / c
    std = torch.sqrt(((z - mean) ** 2).sum(1, keepdim=True) / (c - 1))
    return (z - mean) / std


def f32(*ts):
    return [t.float() for t in ts]


# --- DKD -------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (1.0, 1.0, 1.0), (0.5, 2.0, 2.0), (0.0, 3.0, 1.5)])
def test_dkd_matches_mdistiller_formula(alpha, beta, temp):
    s, t = f32(S, T)
    got = DKD(alpha, beta, temp)(s, t, Y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hand_dkd(S, T, Y, alpha, beta, temp).item(), rel=1e-5, abs=1e-6)


def test_dkd_terms_are_the_weighted_tckd_and_nckd():
    terms = DKD(2.0, 3.0, 2.0).terms(*f32(S, T), Y)
    assert terms["tckd"].item() == pytest.approx(hand_dkd(S, T, Y, 2.0, 0.0, 2.0).item(), rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(hand_dkd(S, T, Y, 0.0, 3.0, 2.0).item(), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_decomposes_kd(temp):
    """Zhao et al.: KL(p^T || p^S) = TCKD + (1 - p_t^T) NCKD for each sample, so DKD with
    alpha = 1 and beta = 1 - p_t^T is Hinton's KD term (T^2 on both sides)."""
    for i in range(len(Y)):
        s, t, y = S[i:i + 1].float(), T[i:i + 1].float(), Y[i:i + 1]
        p_t = softmax(T[i:i + 1] / temp)[0, Y[i]].item()
        dkd = DKD(alpha=1.0, beta=1.0 - p_t, temperature=temp)(s, t, y)
        assert dkd.item() == pytest.approx(KLDivergence(temp)(s, t).item(), rel=1e-5)


def test_dkd_of_identical_logits_is_zero():
    assert DKD(1.0, 8.0, 4.0)(T.float(), T.float(), Y).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_nckd_survives_a_confident_teacher():
    """A teacher sure of the target (p_t ~ 1) still has a non-target distribution: NCKD is
    what DKD adds over KD, where it is scaled by 1 - p_t ~ 0."""
    t = torch.tensor([[60.0, 1.0, 0.0, -1.0]])
    s = torch.tensor([[5.0, 0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    nckd = DKD(0.0, 1.0, 1.0)(s, t, y)
    qs = softmax(s[:, 1:].double())
    qt = softmax(t[:, 1:].double())
    assert nckd.item() == pytest.approx(kl(qt, qs).item(), rel=1e-5)
    assert torch.isfinite(nckd)


def test_dkd_nckd_is_finite_beyond_mdistillers_mask_and_ignores_the_target_logit():
    """Logits a thousand apart (where subtracting a fixed 1000 would not hide the target): NCKD
    is still the KL of the non-target columns, and it sends no gradient to the target logit."""
    t = torch.tensor([[3000.0, 2.0, 0.0, -1.0], [1.0, -400.0, 0.5, 2.0]])
    s = torch.tensor([[-1500.0, 0.0, 1.0, 0.0], [0.0, 1.0, 2500.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    nckd = DKD(0.0, 1.0, 1.0)(s, t, y)
    keep = torch.tensor([[False, True, True, True], [True, True, False, True]])
    want = kl(softmax(t.double()[keep].view(2, 3)), softmax(s.detach().double()[keep].view(2, 3))).mean()
    assert nckd.item() == pytest.approx(want.item(), rel=1e-5)
    nckd.backward()
    assert s.grad[0, 0] == 0 and s.grad[1, 2] == 0
    assert s.grad[keep].abs().sum() > 0


@pytest.mark.parametrize("epoch,warmup,want", [(1, 20, 0.05), (10, 20, 0.5), (20, 20, 1.0), (35, 20, 1.0),
                                               (0.5, 1, 0.5), (3, 0, 1.0)])
def test_dkd_warmup_is_mdistillers_linear_ramp(epoch, warmup, want):
    assert dkd_warmup(epoch, warmup) == pytest.approx(want)


def test_dkd_warmup_refuses_a_negative_length():
    with pytest.raises(ValueError, match="warmup_epochs"):
        dkd_warmup(1, -1)


def test_dkd_refuses_targets_that_do_not_match_rows():
    with pytest.raises(ValueError, match="one target per row"):
        DKD()(S.float(), T.float(), Y[:2])


# --- DIST ------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (1.0, 0.0, 2.0), (0.0, 1.0, 1.0)])
def test_dist_matches_formula(beta, gamma, tau):
    got = DIST(beta, gamma, tau)(*f32(S, T))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hand_dist(S, T, beta, gamma, tau).item(), rel=1e-4, abs=1e-6)


def test_dist_terms_are_inter_and_intra():
    terms = DIST(2.0, 3.0, 2.0).terms(*f32(S, T))
    assert terms["inter"].item() == pytest.approx(hand_dist(S, T, 2.0, 0.0, 2.0).item(), rel=1e-4)
    assert terms["intra"].item() == pytest.approx(hand_dist(S, T, 0.0, 3.0, 2.0).item(), rel=1e-4)


def test_dist_of_identical_logits_is_zero_and_dist_is_symmetric():
    assert DIST(1.0, 1.0, 1.0)(T.float(), T.float()).item() == pytest.approx(0.0, abs=1e-5)
    loss = DIST(1.0, 2.0, 3.0)
    assert loss(*f32(S, T)).item() == pytest.approx(loss(*f32(T, S)).item(), rel=1e-5)


def test_dist_inter_class_relation_ignores_a_positive_affine_map_of_the_probabilities():
    """Pearson's rho is invariant to y -> a y + b (a > 0) per row. Probabilities that stay a
    distribution: y' = a y + (1 - a) / C, the student's prediction mixed with the uniform one;
    its logits are log y'. The inter-class term does not move; the intra-class term may."""
    c = S.shape[1]
    mixed = torch.log(0.3 * softmax(S) + 0.7 / c)
    inter = DIST(1.0, 0.0, 1.0)
    assert inter(mixed.float(), T.float()).item() == pytest.approx(inter(*f32(S, T)).item(), rel=1e-4)


def test_dist_terms_stay_in_0_2_tau_squared():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s, t = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
        terms = DIST(1.0, 1.0, 2.0).terms(s, t)
        for v in terms.values():
            assert -1e-6 <= v.item() <= 2 * 4 + 1e-6


# --- logit standardisation -------------------------------------------------------------------

@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_standardized_kl_matches_formula(temp):
    got = LogitStandardization(KLDivergence(temp))(*f32(S, T))
    want = kl(softmax(zscore(T) / temp), softmax(zscore(S) / temp)).mean() * temp ** 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_standardized_dkd_matches_formula():
    got = LogitStandardization(DKD(1.0, 8.0, 2.0))(*f32(S, T), Y)
    assert got.item() == pytest.approx(hand_dkd(zscore(S), zscore(T), Y, 1.0, 8.0, 2.0).item(), rel=1e-5)
    terms = LogitStandardization(DKD(1.0, 8.0, 2.0)).terms(*f32(S, T), Y)
    assert set(terms) == {"tckd", "nckd"}
    assert (terms["tckd"] + terms["nckd"]).item() == pytest.approx(got.item(), rel=1e-6)


@pytest.mark.parametrize("inner", [KLDivergence(2.0), DKD(1.0, 8.0, 2.0)], ids=["kl", "dkd"])
def test_standardization_ignores_each_rows_shift_and_positive_scale(inner):
    """Z-scored logits do not depend on a per-sample shift or positive scale of either model's
    logits: the student need not match the teacher's logit range (Sun et al.)."""
    loss = LogitStandardization(inner)
    a_s, b_s = torch.tensor([[0.5], [3.0], [1.7]]), torch.tensor([[4.0], [-2.0], [10.0]])
    a_t, b_t = torch.tensor([[2.0], [0.25], [6.0]]), torch.tensor([[-1.0], [0.0], [7.0]])
    s, t = f32(S, T)
    args = (Y,) if isinstance(inner, DKD) else ()
    assert loss(a_s * s + b_s, a_t * t + b_t, *args).item() == pytest.approx(loss(s, t, *args).item(), rel=1e-4)


def test_plain_kl_does_depend_on_the_scale():
    """The contrast: without standardisation a rescaled teacher is a different target."""
    s, t = f32(S, T)
    assert abs(KLDivergence(2.0)(s, 3 * t).item() - KLDivergence(2.0)(s, t).item()) > 1e-2


# --- shared behaviour ------------------------------------------------------------------------

LOSSES = {
    "dkd": (lambda: DKD(1.0, 8.0, 4.0), True),
    "dist": (lambda: DIST(1.0, 2.0, 2.0), False),
    "ls-kl": (lambda: LogitStandardization(KLDivergence(2.0)), False),
    "ls-dkd": (lambda: LogitStandardization(DKD(1.0, 8.0, 2.0)), True),
}


def _call(name, s, t, y):
    make, needs_targets = LOSSES[name]
    return make()(s, t, y) if needs_targets else make()(s, t)


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_logits_are_per_pixel_samples(name):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g) * 2
    y = torch.randint(0, 5, (2, 3, 4), generator=g)
    rows = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    dense = _call(name, s, t, y)
    flat = _call(name, rows(s), rows(t), y.reshape(-1))
    assert dense.item() == pytest.approx(flat.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_reaches_the_student_not_the_teacher(name):
    s = S.float().clone().requires_grad_(True)
    t = T.float().clone().requires_grad_(True)
    _call(name, s, t, Y).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_under_autocast_gives_float32(name):
    s, t = S.to(torch.bfloat16), T.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(name, s, t, Y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_call(name, s.float(), t.float(), Y).item(), rel=1e-6)


@pytest.mark.parametrize("make", [lambda: DKD(temperature=0), lambda: DKD(beta=-1), lambda: DIST(temperature=0),
                                  lambda: DIST(gamma=-1)])
def test_parameters_out_of_range_are_refused(make):
    with pytest.raises(ValueError):
        make()


# -- the head entries of loss.logit: cross-entropy plus the logit loss, against the formulas --

def hand_ce(s, y, smoothing=0.0):
    """-sum_c q_c log softmax(s)_c, averaged over rows; q = (1 - eps) one-hot + eps / C, or the
    given per-class probabilities y (mixed labels) smoothed the same way."""
    q = y if y.is_floating_point() else torch.nn.functional.one_hot(y, s.shape[1]).to(s.dtype)
    q = (1 - smoothing) * q + smoothing / s.shape[1]
    return -(q * torch.log(softmax(s))).sum(1).mean()


def test_kd_head_with_standardisation_and_ce_weight_matches_formula():
    """Sun et al.'s KD+LS: ce = w_ce CE, kl = λ T^2 KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T))."""
    from kdgraph.losses import HeadLoss

    got = HeadLoss(kl_weight=9.0, temperature=2.0, label_smoothing=0.1, ce_weight=0.5, standardize=True)(
        *f32(S), Y, *f32(T))
    assert list(got) == ["ce", "kl"]
    assert got["ce"].item() == pytest.approx(0.5 * hand_ce(S, Y, 0.1).item(), rel=1e-5)
    want = 9.0 * 4.0 * kl(softmax(zscore(T) / 2.0), softmax(zscore(S) / 2.0)).mean()
    assert got["kl"].item() == pytest.approx(want.item(), rel=1e-4)


def test_kd_head_with_ce_weight_zero_is_function_matching_and_takes_mixed_labels():
    from kdgraph.losses import HeadLoss

    mixed = 0.7 * torch.nn.functional.one_hot(Y, 4).double() + 0.3 * torch.nn.functional.one_hot(Y.flip(0), 4)
    got = HeadLoss(ce_weight=0.0, temperature=1.0)(*f32(S, mixed), *f32(T))
    assert got["ce"].item() == 0.0
    assert got["kl"].item() == pytest.approx(kl(softmax(T), softmax(S)).mean().item(), rel=1e-5)
    ce = HeadLoss(label_smoothing=0.1)(*f32(S, mixed))["ce"]
    assert ce.item() == pytest.approx(hand_ce(S, mixed, 0.1).item(), rel=1e-5)


@pytest.mark.parametrize("progress, warm", [(0.5, 0.25), (1.0, 0.5), (3.0, 1.0)])
def test_dkd_head_matches_formula_with_its_warmup(progress, warm):
    """tckd and nckd are mdistiller's weighted terms (alpha 1, beta 0 gives TCKD alone, and the
    other way round), times min(progress / warmup_epochs, 1); ce is w_ce CE."""
    from kdgraph.losses import DecoupledKDHead

    head = DecoupledKDHead(alpha=2.0, beta=8.0, temperature=4.0, ce_weight=0.5, warmup_epochs=2.0)
    got = head(*f32(S), Y, *f32(T), progress=torch.tensor(progress))
    assert list(got) == ["ce", "tckd", "nckd"]
    assert got["ce"].item() == pytest.approx(0.5 * hand_ce(S, Y).item(), rel=1e-5)
    assert got["tckd"].item() == pytest.approx(warm * hand_dkd(S, T, Y, 2.0, 0.0, 4.0).item(), rel=1e-4)
    assert got["nckd"].item() == pytest.approx(warm * hand_dkd(S, T, Y, 0.0, 8.0, 4.0).item(), rel=1e-4)


def test_dkd_head_standardized_matches_formula_and_needs_progress_only_with_a_warmup():
    from kdgraph.losses import DecoupledKDHead

    got = DecoupledKDHead(alpha=1.0, beta=8.0, temperature=2.0, standardize=True)(*f32(S), Y, *f32(T))
    total = (got["tckd"] + got["nckd"]).item()
    assert total == pytest.approx(hand_dkd(zscore(S), zscore(T), Y, 1.0, 8.0, 2.0).item(), rel=1e-4)
    with pytest.raises(ValueError, match=r"^DKD's warm-up over 5.0 epochs needs the training progress"):
        DecoupledKDHead(warmup_epochs=5.0)(*f32(S), Y, *f32(T))


def test_dkd_head_refuses_mixed_labels():
    from kdgraph.losses import DecoupledKDHead

    with pytest.raises(ValueError, match="DKD splits on the target class: it needs class indices"):
        DecoupledKDHead()(*f32(S), torch.full((3, 4), 0.25), *f32(T))


def test_dist_head_matches_formula():
    from kdgraph.losses import DISTHead

    got = DISTHead(beta=2.0, gamma=0.5, temperature=3.0, ce_weight=0.25)(*f32(S), Y, *f32(T))
    assert list(got) == ["ce", "inter", "intra"]
    assert got["ce"].item() == pytest.approx(0.25 * hand_ce(S, Y).item(), rel=1e-5)
    assert (got["inter"] + got["intra"]).item() == pytest.approx(hand_dist(S, T, 2.0, 0.5, 3.0).item(), rel=1e-4)
    assert got["inter"].item() == pytest.approx(hand_dist(S, T, 2.0, 0.0, 3.0).item(), rel=1e-4)
