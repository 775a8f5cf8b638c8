"""kdgraph.runtime.distiller: the Distiller's training step, checked against hand computations.

Independent truth: the teacher and student segments (``compiled.*.segments``) and the
adapters composed by hand, and the losses written out with F.mse_loss, F.cross_entropy and
KL(p_t || p_s) = T^2 * mean_b sum_c p_t (log p_t - log p_s) with explicit log_softmax.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec

KL_W, TEMP, FW = 0.5, 2.0, 1.5


def _build(tmp_path, method="stablekd", **kw):
    torch.manual_seed(0)
    spec = load_spec(tiny_spec(tmp_path / method, method,
                               loss={"kl_weight": KL_W, "temperature": TEMP, "feature_weight": FW},
                               decompose={"adapters": "in_path"}, **kw))
    compiled = compile_spec(spec)
    distiller = Distiller(compiled)
    # non-trivial BN affine parameters and running stats in the adapters
    g = torch.Generator().manual_seed(1)
    for pair in distiller.adapters.values():
        for cm in (pair.lift, pair.lower):
            cm.bn.weight.data.uniform_(0.5, 1.5, generator=g)
            cm.bn.bias.data.uniform_(-0.5, 0.5, generator=g)
            cm.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            cm.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return compiled, distiller


@pytest.fixture(scope="module")
def stablekd(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("stablekd"))


def _batch(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _kl(s_logits, t_logits):
    log_ps = s_logits / TEMP - torch.logsumexp(s_logits / TEMP, dim=1, keepdim=True)
    log_pt = t_logits / TEMP - torch.logsumexp(t_logits / TEMP, dim=1, keepdim=True)
    return TEMP ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


def _teacher_chain(compiled, x):
    feats, h = {}, x
    with torch.no_grad():
        for i, seg in enumerate(compiled.teacher.segments, start=1):
            h = seg(h)
            feats[i] = h
    return feats


def _close(terms, expected):
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(terms[name], value, rtol=1e-5, atol=1e-6), (name, terms[name], value)


def test_stage0_terms_equal_hand_computation(stablekd):
    compiled, d = stablekd
    plan = compiled.plan
    assert plan.stages[0].groups == ((1,), (2,), (3,), (4,))
    d.train()
    d.set_stage(plan.stages[0])
    x, y = _batch()
    terms = d(x, y)
    S = list(compiled.student.segments)
    A = d.adapters
    t = _teacher_chain(compiled, x)
    expected = {
        "mse1": FW * F.mse_loss(A["1"].lift(S[0](x)), t[1]),
        "mse2": FW * F.mse_loss(A["2"].lift(S[1](A["1"].lower(t[1]))), t[2]),
        "mse3": FW * F.mse_loss(A["3"].lift(S[2](A["2"].lower(t[2]))), t[3]),
    }
    head = S[3](A["3"].lower(t[3]))
    expected["ce"] = F.cross_entropy(head, y)
    expected["kl"] = KL_W * _kl(head, t[4])
    _close(terms, expected)
    # the teacher's last segment is its full forward: t[4] is the teacher's logits
    assert torch.allclose(t[4], compiled.teacher.model(x), atol=1e-5)


def test_merged_stage_terms_and_chain(stablekd):
    compiled, d = stablekd
    stage = compiled.plan.stages[1]
    assert stage.groups == ((1, 2), (3, 4))
    d.train()
    d.set_stage(stage)
    x, y = _batch()
    feats = d.teacher_features(x)
    assert set(feats) == {2, 4}  # what the groups need: group (3,4)'s input and target, group (1,2)'s target
    assert all(f.grad_fn is None and not f.requires_grad for f in feats.values())
    terms = d(x, y)
    S = list(compiled.student.segments)
    A = d.adapters
    t = _teacher_chain(compiled, x)
    h12 = S[1](A["1"].lower(A["1"].lift(S[0](x))))  # group [1,2] is fed the image, chained through lower(lift(.))
    h34 = S[3](A["3"].lower(A["3"].lift(S[2](A["2"].lower(t[2])))))
    _close(terms, {"mse2": FW * F.mse_loss(A["2"].lift(h12), t[2]),
                   "ce": F.cross_entropy(h34, y), "kl": KL_W * _kl(h34, t[4])})
    for i, expected in ((2, t[2]), (4, t[4])):
        assert torch.allclose(feats[i], expected, atol=1e-6)


@pytest.mark.parametrize("stage, needed", [(0, {1, 2, 3, 4}), (1, {2, 4}), (2, {4})])
def test_teacher_features_only_needed(stablekd, stage, needed):
    compiled, d = stablekd
    d.set_stage(compiled.plan.stages[stage])
    with torch.enable_grad():
        feats = d.teacher_features(_batch()[0])
    assert set(feats) == needed
    assert all(f.grad_fn is None and not f.requires_grad for f in feats.values())


def _owners(compiled, d):
    """Stage-0 owner (loss terms) of every trainable parameter, by identity."""
    owner = {}
    segs = list(compiled.student.segments)
    for i, seg in enumerate(segs, start=1):
        terms = ("ce", "kl") if i == 4 else (f"mse{i}",)
        for p in seg.parameters():
            owner[id(p)] = terms
        if i < 4:
            for p in d.adapters[str(i)].lift.parameters():
                owner[id(p)] = terms
        if i > 1:
            for p in d.adapters[str(i - 1)].lower.parameters():
                owner[id(p)] = terms
    return owner


def test_no_gradient_crosses_groups(stablekd):
    compiled, d = stablekd
    d.train()
    d.set_stage(compiled.plan.stages[0])
    params = [p for p in d.parameters() if p.requires_grad]
    owner = _owners(compiled, d)
    assert set(owner) == {id(p) for p in params}  # every trainable parameter belongs to one group
    x, y = _batch()
    terms = d(x, y)
    total = torch.autograd.grad(sum(terms.values()), params, retain_graph=True)
    per_term = {name: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
                for name, v in terms.items()}
    for k, p in enumerate(params):
        mine = owner[id(p)]
        for name, grads in per_term.items():
            g = grads[k]
            if name not in mine:
                assert g is None or torch.count_nonzero(g) == 0, f"{name} reaches a parameter of group {mine}"
        own = sum(per_term[name][k] for name in mine if per_term[name][k] is not None)
        assert torch.allclose(total[k], own, atol=1e-6, rtol=1e-5), (total[k] - own).abs().max()  # fp32 sum order
    assert any(torch.count_nonzero(g) > 0 for g in total)


def test_perturbing_a_group_input_leaves_other_groups_gradients(stablekd, monkeypatch):
    compiled, d = stablekd
    d.train()
    d.set_stage(compiled.plan.stages[0])
    x, y = _batch()
    segs = list(compiled.student.segments)
    g1 = list(segs[0].parameters()) + list(d.adapters["1"].lift.parameters())
    g3 = list(segs[2].parameters()) + list(d.adapters["3"].lift.parameters())
    g4 = list(segs[3].parameters())

    def grads(shift: float):
        original = Distiller.teacher_features

        def shifted(self, inp, *side):  # side: a denoiser's side tensors (none here)
            feats = original(self, inp, *side)
            feats[2] = feats[2] + shift * torch.randn(feats[2].shape, generator=torch.Generator().manual_seed(5))
            return feats

        monkeypatch.setattr(Distiller, "teacher_features", shifted)
        try:
            loss = sum(d(x, y).values())
            return [torch.autograd.grad(loss, ps, retain_graph=True) for ps in (g1, g3, g4)]
        finally:
            monkeypatch.setattr(Distiller, "teacher_features", original)

    base, moved = grads(0.0), grads(1.0)
    for a, b in zip(base[0], moved[0]):  # group 1: fed x, target t1
        assert torch.equal(a, b)
    for a, b in zip(base[2], moved[2]):  # group 4: fed t3, target t4
        assert torch.equal(a, b)
    # group 3 is fed lower2(t2): its gradient does move (the perturbation is effective)
    assert any(not torch.allclose(a, b) for a, b in zip(base[1], moved[1]))


@pytest.mark.parametrize("method, names", [
    ("kd", {"ce", "kl"}),
    ("kd+mse", {"ce", "kl", "mse1", "mse2", "mse3"}),
    ("supervised", {"ce"}),
])
def test_term_names_per_method(tmp_path, method, names):
    compiled, d = _build(tmp_path, method)
    d.set_stage(compiled.plan.stages[0])
    d.train()
    x, y = _batch()
    terms = d(x, y)
    assert set(terms) == names
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    student = compiled.student.model
    if method == "supervised":
        assert d.teacher is None
        assert torch.allclose(terms["ce"], F.cross_entropy(student(x), y), atol=1e-6)
    elif method == "kd":
        logits = student(x)
        t = compiled.teacher.model(x)
        _close(terms, {"ce": F.cross_entropy(logits, y), "kl": KL_W * _kl(logits, t)})
    else:  # kd+mse: the student's own chain; lift only for the losses
        S = list(compiled.student.segments)
        t = _teacher_chain(compiled, x)
        h, expected = x, {}
        for i in range(1, 4):
            h = S[i - 1](h)
            expected[f"mse{i}"] = FW * F.mse_loss(d.adapters[str(i)].lift(h), t[i])
        logits = S[3](h)
        expected.update(ce=F.cross_entropy(logits, y), kl=KL_W * _kl(logits, t[4]))
        _close(terms, expected)


def test_inference_paths(tmp_path, stablekd):
    x, _ = _batch()
    compiled, d = _build(tmp_path, "kd+mse")
    d.eval()
    assert len(d.adapters) == 3 and not d.adapters_in_inference
    with torch.no_grad():
        assert torch.equal(d.inference(x), compiled.student.model(x))

    compiled, d = stablekd
    d.eval()
    assert d.adapters_in_inference
    S, A = list(compiled.student.segments), d.adapters
    with torch.no_grad():
        h = x
        for i in range(1, 4):
            h = A[str(i)].lower(A[str(i)].lift(S[i - 1](h)))
        manual = S[3](h)
        got = d.inference(x)
        assert torch.allclose(got, manual, atol=1e-6)
        assert not torch.allclose(got, compiled.student.model(x), atol=1e-3)
    d.train()


# --- what the Distiller holds, and how it is moved ------------------------------------------

def test_the_module_tree_is_the_student_and_its_adapters_alone(stablekd):
    """state_dict, parameters and DDP see each student parameter once under the student's own
    names, the adapters beside them; the frozen teacher and the losses are no part of it."""
    compiled, d = stablekd
    student_keys = {f"student.{k}" for k in compiled.student.model.state_dict()}
    adapter_keys = {f"adapters.{k}" for k in d.adapters.state_dict()}
    projection_keys = {f"projections.{k}" for k in d.projections.state_dict()}
    assert set(d.state_dict()) == student_keys | adapter_keys | projection_keys
    teacher_params = {id(p) for p in compiled.teacher.model.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in d.parameters()}
    # parameters() drops repeats by itself: a student reachable twice (its segments registered
    # beside it) shows only without that, as DDP's per-module walk sees the tree
    every = [p for _, p in d.named_parameters(remove_duplicate=False)]
    assert len(every) == len({id(p) for p in every}) == len(list(d.parameters()))
    assert {id(p) for p in every} == {id(p) for p in (*compiled.student.model.parameters(),
                                                      *d.adapters.parameters(), *d.projections.parameters())}


def test_set_stage_loads_the_stages_programs_and_freezes_the_teacher_again(stablekd):
    compiled, d = stablekd
    last, first = compiled.plan.stages[-1], compiled.plan.stages[0]
    try:
        compiled.teacher.model.train()  # a user's .train() on the teacher
        d.set_stage(last)
        assert (d.groups, d.program, d.inference_program) == (last.groups, last.program, last.inference)
        assert not compiled.teacher.model.training
        assert all(not p.requires_grad for p in compiled.teacher.model.parameters())
        assert d._teacher_blocks == set(last.program.teacher_reads)
    finally:
        d.set_stage(first)


def test_a_cast_reaches_the_unregistered_teacher(tmp_path):
    compiled, d = _build(tmp_path, "kd")
    d.double()
    assert all(p.dtype == torch.float64 for p in compiled.student.model.parameters())
    assert all(p.dtype == torch.float64 for p in compiled.teacher.model.parameters())
    x, y = _batch()
    terms = d(x.double(), y)
    logits = compiled.student.model(x.double())
    assert logits.dtype == torch.float64  # the losses themselves are taken in float32
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, y).float())
    torch.testing.assert_close(terms["kl"], KL_W * _kl(logits, compiled.teacher.model(x.double())).float())


def test_an_op_of_an_unknown_kind_is_refused_by_name(stablekd):
    from kdgraph.ir import Op
    from kdgraph.runtime.distiller import StepState

    _, d = stablekd
    with pytest.raises(LookupError, match="unknown program op kind 'teleport'; registered: teacher, cache, student"):
        d.run_op(Op("X", "teleport", ("input",), 1), [torch.zeros(1)], StepState())
    assert not d.needs_progress  # no loss of this plan declares progress (DKD's warm-up does)
