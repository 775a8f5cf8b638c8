"""Cross-architecture pairs and ScaleKD's components (CAP, DFM, TPP)."""

from __future__ import annotations

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

from kdgraph.compiler import compile_spec
from kdgraph.layouts import FeatureFormat
from kdgraph.runtime.distiller import Distiller
from kdgraph.losses import DualViewFeatureMimicking, dct2, idct2, remove_direct
from kdgraph.spec import load_spec


def test_dct_matches_scipy():
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 5))
    ours = dct2(torch.from_numpy(x)).numpy()
    assert np.allclose(ours, scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1)), atol=1e-12)
    assert np.allclose(idct2(dct2(torch.from_numpy(x))).numpy(), x, atol=1e-12)


def test_removing_the_direct_component_zeroes_dc_and_keeps_the_rest():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    hp = remove_direct(x)
    X, H = dct2(x), dct2(hp)
    assert H[..., 0, 0].abs().max() < 1e-12  # by construction
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[0, 0] = False
    assert torch.allclose(H[..., mask], X[..., mask], atol=1e-12)
    # the orthonormal DCT's direct component is the spatial mean: what is left has none
    assert torch.allclose(hp, x - x.mean(dim=(-2, -1), keepdim=True), atol=1e-12)


def test_dfm_against_hand_computation():
    fmt = FeatureFormat("tokens", 4, (3, 3), prefix=1)
    s, t = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
    terms = DualViewFeatureMimicking(fmt, alpha=0.08, beta=0.06)(s, t)
    # by hand: drop the class token, grid, unit vectors along channels, then the two views
    sm = s[:, 1:].transpose(1, 2).reshape(2, 4, 3, 3)
    tm = t[:, 1:].transpose(1, 2).reshape(2, 4, 3, 3)
    sm = sm / sm.norm(dim=1, keepdim=True)
    tm = tm / tm.norm(dim=1, keepdim=True)
    direct = ((sm - tm) ** 2).mean()
    centre = lambda z: z - z.mean(dim=(-2, -1), keepdim=True)  # noqa: E731
    alternative = ((centre(sm) - centre(tm)) ** 2).mean()
    assert torch.allclose(terms["dfm_direct"], 0.08 * direct, atol=1e-6)
    assert torch.allclose(terms["dfm_alt"], 0.06 * alternative, atol=1e-6)


def _vit_to_resnet(**extra) -> dict:
    raw = {
        "name": "x",
        "teacher": {"model": "timm:vit_tiny_patch16_224", "kwargs": {"num_classes": 10, "img_size": 64,
                                                                      "patch_size": 8, "depth": 4}},
        "student": {"model": "timm:resnet18", "kwargs": {"num_classes": 10}},
        "data": {"dataset": "synthetic", "input_size": [3, 64, 64], "num_classes": 10},
        "decompose": {"blocks": 5, "adapters": "in_path"},  # the format adapters are the subject
        "schedule": {"method": "stablekd", "recompositions": 2, "epochs": 3},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def test_vit_teacher_cnn_student_pairs_by_relative_depth():
    c = compile_spec(load_spec(_vit_to_resnet()))
    blocks = c.pairing.blocks
    assert [b.teacher.label for b in blocks[:-1]] == ["blocks.0", "blocks.1", "blocks.2", "blocks"]
    assert [b.student.label for b in blocks[:-1]] == ["layer1", "layer2", "layer3", "layer4"]
    assert all("relative depth" in b.rule for b in blocks[:-1])
    for b in blocks[:-1]:
        a = b.adapter
        assert a.kind == "format" and a.teacher_format.layout == "tokens" and a.teacher_format.prefix == 1
        assert a.teacher_format.hw == (8, 8) and a.student_format.hw == (b.student.shape[1], b.student.shape[2])
        assert a.to_dict()["teacher_format"] == ["tokens", [65, 192]]
    g = c.graph
    assert g.edges["T1", "lower1"]["shape"] == [65, 192] and g.nodes["lower1"]["out_shape"] == [64, 16, 16]


def test_cross_architecture_decomposed_step_feeds_converted_teacher_features():
    torch.manual_seed(0)
    c = compile_spec(load_spec(_vit_to_resnet()))
    d = Distiller(c)
    d.set_stage(c.plan.stages[0])
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    terms = d(x, y)
    assert set(terms) == {"mse1", "mse2", "mse3", "mse4", "ce", "kl"}
    # block 3 by hand: the teacher's tokens after block 2, lowered to the student's map
    with torch.no_grad():
        t = x
        for seg in d.teacher.segments[:3]:
            t = seg(t)
        t2 = d.teacher.segments[0](x)
        t2 = d.teacher.segments[1](t2)
    s3 = d.chain.segments[2](d.adapters["2"].lower(t2))
    expected = F.mse_loss(d.adapters["3"].lift(s3), t)
    assert torch.allclose(terms["mse3"], expected, atol=1e-6)


def test_scalekd_plan_has_cap_dfm_and_the_proxy_path():
    raw = _vit_to_resnet(decompose={"blocks": 2, "projector": "cap"},
                         schedule={"method": "kd+mse", "recompositions": 0, "epochs": 1},
                         loss={"feature": "dfm", "tpp": True})
    c = compile_spec(load_spec(raw))
    assert c.pairing.blocks[0].adapter.kind == "cap"
    assert c.plan.tpp_block == 1
    assert c.plan.stages[0].losses == (("tpp", "dfm1_direct", "dfm1_alt", "ce", "kl"),)
    g = c.graph
    assert [n for n, d in g.nodes(data=True) if d["kind"] == "proxy"] == ["P2"]
    assert g.has_edge("lift1", "P2") and g.has_edge("P2", "tpp_loss") and g.has_edge("T2", "tpp_loss")
    assert c.to_dict()["schedule"]["tpp_block"] == 1


def test_tpp_gradients_reach_the_student_and_not_the_teacher():
    torch.manual_seed(0)
    raw = _vit_to_resnet(decompose={"blocks": 2, "projector": "cap"},
                         schedule={"method": "kd+mse", "recompositions": 0, "epochs": 1},
                         loss={"feature": "dfm", "tpp": True})
    c = compile_spec(load_spec(raw))
    d = Distiller(c)
    d.set_stage(c.plan.stages[0])
    # batch 4 and 2x2 student maps: BatchNorm over two values has a zero gradient
    terms = d(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    assert {"tpp", "dfm1_direct", "dfm1_alt", "ce", "kl"} == set(terms)
    grads = torch.autograd.grad(terms["tpp"], [p for p in d.parameters() if p.requires_grad], allow_unused=True,
                                retain_graph=True)
    named = dict(zip([n for n, p in d.named_parameters() if p.requires_grad], grads))
    # (timm zero-initialises each residual branch's last BN: the stem is where gradient shows first)
    assert named["student.conv1.weight"] is not None and named["student.conv1.weight"].abs().sum() > 0
    assert named["adapters.1.lift.queries"].abs().sum() > 0
    # the frozen teacher gets nothing: no parameter of it requires grad, none has a .grad
    assert all(not p.requires_grad for p in c.teacher.model.parameters())
    terms["tpp"].backward()
    assert all(p.grad is None for p in c.teacher.model.parameters())
    # the head (fc) is after the cut: TPP does not train it
    assert named["student.fc.weight"] is None
