"""kdgraph.segmentation.losses against their papers' formulas, written out here in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdgraph.losses import LOSSES, create_loss, resolve_params
from kdgraph.segmentation.losses import resize_to


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _pixel_kl_numpy(s, t, y, temp, ignore):
    """Σ over labelled pixels of Σ_c p_t (log p_t − log p_s), divided by their count, times T²; and CE."""
    ps, pt = _softmax(s / temp, 1), _softmax(t / temp, 1)
    p1 = _softmax(s, 1)
    kl_sum, ce_sum, count = 0.0, 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[2]):
            for j in range(s.shape[3]):
                if y[b, i, j] == ignore:
                    continue
                count += 1
                kl_sum += sum(pt[b, c, i, j] * (np.log(pt[b, c, i, j]) - np.log(ps[b, c, i, j]))
                              for c in range(s.shape[1]))
                ce_sum += -np.log(p1[b, y[b, i, j], i, j])
    return ce_sum / count, temp * temp * kl_sum / count


def _cwd_numpy(s, t, temp, valid=None):
    """Shu et al. 2021 eq. 4: T²/(N C) Σ_n Σ_c Σ_i φ(t)_i log(φ(t)_i / φ(s)_i), φ a spatial softmax."""
    n, c = s.shape[:2]
    total = 0.0
    for b in range(n):
        keep = np.ones(s.shape[2:], bool) if valid is None else valid[b]
        for k in range(c):
            ps = _softmax(s[b, k][keep] / temp, 0)
            pt = _softmax(t[b, k][keep] / temp, 0)
            total += float(np.sum(pt * np.log(pt / ps)))
    return temp * temp * total / (n * c)


def _pearson_numpy(x, eps=1e-6):
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        v = x[:, c]
        out[:, c] = (v - v.mean()) / (v.std() + eps)  # numpy's std: population (ddof 0)
    return out


def _case(seed=0, b=2, c=3, h=5, w=4):
    g = np.random.default_rng(seed)
    s, t = g.normal(size=(b, c, h, w)) * 2, g.normal(size=(b, c, h, w)) * 2
    y = g.integers(0, c, size=(b, h, w))
    y[0, 0, :] = 255
    y[1, 2, 1] = 255
    return s, t, y


def _torch(*arrays):
    return [torch.tensor(a, dtype=torch.float32 if a.dtype.kind == "f" else torch.long) for a in arrays]


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_pixel_kl_equals_its_formula_over_labelled_pixels(temp):
    s, t, y = _case()
    ce, kl = _pixel_kl_numpy(s, t, y, temp, 255)
    out = LOSSES.get("pixel_kl")(ce_weight=0.5, kl_weight=2.0, temperature=temp)(*_torch(s, y, t))
    assert out["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert out["kl"].item() == pytest.approx(2.0 * kl, rel=1e-5)


def test_pixel_ce_is_the_cross_entropy_over_labelled_pixels():
    """The supervised dense head: the mean over non-ignored pixels of -log softmax at the label
    (written out in numpy), one term only, whatever the ignored pixels' logits."""
    s, t, y = _case(2)
    out = LOSSES.get("pixel_ce")()(*_torch(s, y))
    assert list(out) == ["ce"] == list(LOSSES.get("pixel_ce").terms)
    assert out["ce"].item() == pytest.approx(_pixel_kl_numpy(s, t, y, 1.0, 255)[0], rel=1e-5)
    s2 = s.copy()
    s2[0, :, 0, :] = 50.0  # row 0 of image 0 is ignore_index throughout
    assert LOSSES.get("pixel_ce")()(*_torch(s2, y))["ce"].item() == pytest.approx(out["ce"].item(), rel=1e-6)


def test_pixel_kl_without_teacher_is_the_cross_entropy_alone():
    s, t, y = _case(1)
    out = LOSSES.get("pixel_kl")()(*_torch(s, y))
    assert list(out) == ["ce"] and out["ce"].item() == pytest.approx(_pixel_kl_numpy(s, t, y, 1.0, 255)[0], rel=1e-5)


@pytest.mark.parametrize("name", ["pixel_kl", "cwd"])
def test_ignored_pixels_change_nothing(name):
    """Logits at pixels labelled ignore_index may be anything: every term and gradient is the same."""
    s, t, y = _case(2)
    loss = LOSSES.get(name)()
    s1, y1, t1 = _torch(s, y, t)
    s2, t2 = s1.clone(), t1.clone()
    ignored = (y1 == 255).unsqueeze(1).expand_as(s2)
    s2[ignored] = 100.0 * torch.randn(int(ignored.sum()))
    t2[ignored] = -50.0
    s1.requires_grad_(True)
    s2.requires_grad_(True)
    a, b = loss(s1, y1, t1), loss(s2, y1, t2)
    for term in a:
        assert a[term].item() == pytest.approx(b[term].item(), rel=1e-6, abs=1e-7), term
    sum(a.values()).backward()
    sum(b.values()).backward()
    torch.testing.assert_close(s1.grad[~ignored], s2.grad[~ignored])
    assert s1.grad[ignored].abs().max() == 0 and s2.grad[ignored].abs().max() == 0


def test_all_pixels_ignored_gives_zero_not_nan():
    s, t, y = _case(3)
    y[:] = 255
    for name in ("pixel_kl", "cwd"):
        out = LOSSES.get(name)()(*_torch(s, y, t))
        assert all(v.item() == 0.0 for v in out.values()), name


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_cwd_equals_shu_et_al_eq4(temp):
    s, t, y = _case(4)
    y[:] = 0  # no pixel ignored: the paper's formula exactly
    out = LOSSES.get("cwd")(ce_weight=1.0, weight=5.0, temperature=temp)(*_torch(s, y, t))
    assert out["cwd"].item() == pytest.approx(5.0 * _cwd_numpy(s, t, temp), rel=1e-5)


def test_cwd_with_ignored_pixels_is_the_formula_over_the_labelled_locations():
    s, t, y = _case(5)
    out = LOSSES.get("cwd")(weight=1.0, temperature=2.0)(*_torch(s, y, t))
    assert out["cwd"].item() == pytest.approx(_cwd_numpy(s, t, 2.0, valid=y != 255), rel=1e-5)


def test_logits_of_another_stride_are_resized_bilinearly():
    """A student at 1/2 and a teacher at 1/4 of the label grid: for the per-pixel terms both are
    resized to the labels (bilinear, align_corners=False, as torch's and mmseg's resize); CWD
    compares them on the teacher's grid."""
    g = np.random.default_rng(6)
    y = g.integers(0, 3, size=(2, 8, 8))
    y[0, :2] = 255
    s_small, t_small = g.normal(size=(2, 3, 4, 4)), g.normal(size=(2, 3, 2, 2))
    s_up = F.interpolate(torch.tensor(s_small), size=(8, 8), mode="bilinear", align_corners=False).numpy()
    t_up = F.interpolate(torch.tensor(t_small), size=(8, 8), mode="bilinear", align_corners=False).numpy()
    ce, kl = _pixel_kl_numpy(s_up, t_up, y, 2.0, 255)
    out = LOSSES.get("pixel_kl")(temperature=2.0)(*_torch(s_small, y, t_small))
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5) and out["kl"].item() == pytest.approx(kl, rel=1e-5)
    # CWD on the teacher's logit grid: the student resized to it, the labels taken to it by
    # nearest neighbour at pixel centres (8 -> 2: rows and columns 2 and 6)
    s_grid = F.interpolate(torch.tensor(s_small), size=(2, 2), mode="bilinear", align_corners=False).numpy()
    valid = (y != 255)[:, 2::4, 2::4]
    cwd = LOSSES.get("cwd")(weight=1.0)(*_torch(s_small, y, t_small))["cwd"].item()
    assert cwd == pytest.approx(_cwd_numpy(s_grid, t_small, 1.0, valid=valid), rel=1e-5)
    y[0, :4] = 255  # the first teacher row of sample 0 is then ignored
    cwd = LOSSES.get("cwd")(weight=1.0)(*_torch(s_small, y, t_small))["cwd"].item()
    assert cwd == pytest.approx(_cwd_numpy(s_grid, t_small, 1.0, valid=(y != 255)[:, 2::4, 2::4]), rel=1e-5)
    # align_corners=False by hand at one point: output x=0 of 4 -> 8 samples input x = -0.25, clamped to 0
    assert resize_to(torch.arange(4.0).view(1, 1, 1, 4), (1, 8))[0, 0, 0].tolist() == \
        pytest.approx([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def test_pkd_equals_cao_et_al_on_several_weighted_levels():
    g = np.random.default_rng(7)
    levels_s = [g.normal(size=(2, 4, 6, 6)) * 3 + 1, g.normal(size=(2, 4, 3, 3)) - 2]
    levels_t = [g.normal(size=(2, 4, 6, 6)), g.normal(size=(2, 4, 3, 3)) * 0.1]
    expected = sum(a * 0.5 * np.mean((_pearson_numpy(s) - _pearson_numpy(t)) ** 2)
                   for a, s, t in zip((1.0, 0.25), levels_s, levels_t))
    loss = LOSSES.get("pkd")(weight=2.0, level_weights=(1.0, 0.25))
    got = loss(tuple(_torch(*levels_s)), tuple(_torch(*levels_t)))
    assert got.item() == pytest.approx(2.0 * expected, rel=1e-5)


def test_pkd_ignores_each_channels_scale_and_shift_and_resizes_the_student():
    """Pearson normalisation: a teacher channel scaled and shifted is the same target; a student at
    another resolution is resized to the teacher's before normalising."""
    g = np.random.default_rng(8)
    s, t = g.normal(size=(2, 3, 4, 4)), g.normal(size=(2, 3, 8, 8))
    s_up = F.interpolate(torch.tensor(s), size=(8, 8), mode="bilinear", align_corners=False).numpy()
    expected = 0.5 * np.mean((_pearson_numpy(s_up) - _pearson_numpy(t)) ** 2)
    loss = LOSSES.get("pkd")()
    st, tt = _torch(s, t)
    assert loss(st, tt).item() == pytest.approx(expected, rel=1e-5)
    scaled = tt * torch.tensor([3.0, 0.5, 7.0]).view(1, 3, 1, 1) + 11.0
    assert loss(st, scaled).item() == pytest.approx(expected, rel=1e-4)
    assert loss(tt, tt).item() == pytest.approx(0.0, abs=1e-10)


def test_pkd_refuses_mismatched_levels_and_weights():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="levels"):
        LOSSES.get("pkd")()((x, x), (x,))
    with pytest.raises(ValueError, match="level weights"):
        LOSSES.get("pkd")(level_weights=(1.0,))((x, x), (x, x))
    with pytest.raises(ValueError, match="adapter"):
        LOSSES.get("pkd")()(torch.zeros(2, 5, 4, 4), x)


def test_teacher_gets_no_gradient_and_params_resolve_from_the_spec():
    from kdgraph.spec import LossSpec

    spec = LossSpec(ce_weight=0.5, kl_weight=3.0, temperature=2.0, feature_weight=4.0, ignore_index=255).model_dump()
    assert resolve_params("cwd", spec) == {"ce_weight": 0.5, "weight": 3.0, "temperature": 2.0, "ignore_index": 255,
                                           "aux_weight": 0.5}
    assert resolve_params("pixel_kl", spec) == {"ce_weight": 0.5, "kl_weight": 3.0, "temperature": 2.0,
                                                "ignore_index": 255, "aux_weight": 0.5}
    assert resolve_params("pkd", spec) == {"weight": 4.0}
    s, t, y = _torch(*_case(9))
    t.requires_grad_(True)
    s.requires_grad_(True)
    for name in ("pixel_kl", "cwd"):
        sum(create_loss(name, resolve_params(name, spec))(s, y, t).values()).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("name", ["pixel_kl", "cwd"])
def test_an_aux_head_adds_its_weighted_cross_entropy_and_is_not_distilled(name):
    """Heads (out, aux): ce = w_ce (CE(out) + a · CE(aux resized)) over the labelled pixels; the
    distillation term is out's alone (the teacher's aux changes nothing)."""
    s, t, y = _case(11)
    aux = np.random.default_rng(12).normal(size=(s.shape[0], s.shape[1], s.shape[2] // 2, s.shape[3] // 2))
    aux_up = F.interpolate(torch.tensor(aux), size=y.shape[-2:], mode="bilinear", align_corners=False).numpy()
    loss = LOSSES.get(name)(ce_weight=0.5, aux_weight=0.4)
    s_t, y_t, t_t = _torch(s, y, t)
    a_t = torch.tensor(aux, dtype=torch.float32)
    both = loss((s_t, a_t), y_t, (t_t, torch.randn_like(a_t)))
    alone = loss(s_t, y_t, t_t)
    want = 0.5 * (_pixel_kl_numpy(s, t, y, 1.0, 255)[0] + 0.4 * _pixel_kl_numpy(aux_up, t, y, 1.0, 255)[0])
    assert both["ce"].item() == pytest.approx(want, rel=1e-5)
    other = [k for k in both if k != "ce"]
    assert other and all(both[k].item() == pytest.approx(alone[k].item(), rel=1e-6) for k in other)
    with pytest.raises(ValueError, match="one tensor or"):
        loss((s_t, a_t, a_t), y_t)
