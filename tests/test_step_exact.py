"""The lean training step (issue 30) computes today's values bit for bit, on shipped specs.

Independent truth: a hand-written step of the general formulation, with every op the step
skips where it does nothing: the teacher and the student run block by block through their
segments (a ``whole`` op of the plan as the blocks it stands for), the losses are written out
with the division by T, the T^2 factor and the weights applied
(``w * T^2 * KL(log_softmax(z_s / T), log_softmax(z_t / T))``, ``w * MSE``; the recipes' DKD
and DIST terms with their ``alpha T^2``, ``beta tau^2``... factors, logit standardisation
before them), the terms summed into a zeros accumulator, then backward, the optimizer and the
schedule. It and ``Trainer.train_step`` start from the same seed and see the same batches;
loss terms and every parameter and buffer must be *equal* (``torch.equal``), not close, in
every training stage of ``specs/quickstart.yaml`` (StableKD, projected as shipped and with
adapters in_path) and of its plain-KD variant, at
the shipped T = 1, weight 1 and at T = 3, kl_weight 0.3, feature_weight 2, and for the
recipes (loss.logit dkd and dist at their defaults, kl standardised with ce_weight 0.5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdgraph.losses import _binary_kl, _drop_target, _kl_rows, _pearson_rows
from kdgraph.runtime.loop import Trainer
from kdgraph.spec import load_spec

from _runtime_helpers import ROOT

QUICKSTART = ROOT / "specs" / "quickstart.yaml"
STEPS = 2  # per training stage


def _trainer(tmp_path, name, overrides):
    return Trainer.from_spec(load_spec(QUICKSTART, [f"output={tmp_path / name}", "teacher.checkpoint=null",
                                          "runtime.device=cpu", "runtime.num_threads=1", *overrides]))


def _reference_step(run, stage, xb, yb):
    """One step of ``stage``'s program, written out in the general form."""
    d = run.distiller
    values = {"input": xb, "labels": yb}
    with torch.no_grad():
        feats, h = {}, d.teacher.input(xb)
        for i, seg in enumerate(d.teacher.segments, start=1):
            h = seg(h)
            feats[i] = h
    terms: dict[str, torch.Tensor] = {}
    for op in stage.program.ops:
        inputs = [values[n] for n in op.inputs]
        if op.kind == "teacher":
            values[op.node] = feats[op.block]
        elif op.kind == "student":
            values[op.node] = d.chain.segments[op.block - 1](inputs[0])
        elif op.kind == "whole":  # blocks 1..op.block in order, through their segments
            h = inputs[0]
            for seg in d.chain.segments[:op.block]:
                h = seg(h)
            values[op.node] = h
        elif op.kind in ("lift", "lower"):
            values[op.node] = getattr(d.adapters[str(op.block)], op.kind)(inputs[0])
        elif op.kind == "project":  # the frozen projection of the teacher's feature (no gradient)
            values[op.node] = d.projections[str(op.block)](inputs[0])
        elif op.entry in ("kd", "dkd", "dist"):
            s, y, t = inputs
            p = dict(op.params)
            temp = p["temperature"]
            terms["ce"] = p["ce_weight"] * F.cross_entropy(s, y, label_smoothing=p["label_smoothing"])
            t = t.detach()
            if p["standardize"]:
                s, t = _standardized(s), _standardized(t)
            s, t = s / temp, t / temp
            if op.entry == "kd":
                kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1),
                              reduction="batchmean", log_target=True)
                terms["kl"] = p["kl_weight"] * (kl * (temp * temp))
            elif op.entry == "dkd":
                assert p["warmup_epochs"] == 0
                gt = torch.arange(s.shape[1]) == y[:, None]
                terms["tckd"] = p["alpha"] * temp * temp * _binary_kl(s, t, gt).mean()
                terms["nckd"] = p["beta"] * temp * temp * _kl_rows(_drop_target(s, gt), _drop_target(t, gt)).mean()
            else:
                y_s, y_t = F.softmax(s, dim=-1), F.softmax(t, dim=-1)
                terms["inter"] = p["beta"] * temp * temp * (1 - _pearson_rows(y_s, y_t).mean())
                terms["intra"] = p["gamma"] * temp * temp * (1 - _pearson_rows(y_s.t(), y_t.t()).mean())
        elif op.entry == "mse":
            s, t = inputs
            terms[op.terms[0]] = dict(op.params)["weight"] * F.mse_loss(s, t.detach())
        else:
            raise AssertionError(f"the reference does not know {op.kind} {op.entry}")
    loss = torch.zeros(())
    for value in terms.values():
        loss = loss + value
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return terms, loss


def _standardized(z):
    """Sun et al.'s Z-score of each row, as the general form writes it."""
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + 1e-7)


def _state(run):
    return run.distiller.state_dict()


RECIPES = {"dkd": {"logit": "dkd"}, "dist": {"logit": "dist"},
           "kl-standardized": {"standardize": True, "temperature": 2.0, "kl_weight": 9.0, "ce_weight": 0.5}}


@pytest.mark.parametrize("method", ["stablekd", "stablekd-in_path", "kd"])
@pytest.mark.parametrize("loss", [{}, {"temperature": 3.0, "kl_weight": 0.3, "feature_weight": 2.0}],
                         ids=["defaults", "weighted"])
def test_train_step_equals_the_general_step_bit_for_bit(tmp_path, method, loss):
    _check_bit_for_bit(tmp_path, method, loss)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_train_step_equals_the_general_step_bit_for_bit(tmp_path, recipe):
    """The recipes' head losses (issue 22) with plain KD's whole-student step."""
    _check_bit_for_bit(tmp_path, "kd", RECIPES[recipe])


def _check_bit_for_bit(tmp_path, method, loss):
    method, _, adapters = method.partition("-")  # stablekd: the default (projected); stablekd-in_path
    overrides = [f"schedule.method={method}", "schedule.epochs=3"] + ([f"decompose.adapters={adapters}"] * bool(adapters))
    if method == "kd":
        overrides.append("schedule.recompositions=0")
    overrides += [f"loss.{k}={v}" for k, v in loss.items()]
    lean, reference = _trainer(tmp_path, "lean", overrides), _trainer(tmp_path, "reference", overrides)
    if lean.plan.projection_fit is not None:  # the plan's fit stage (projected StableKD), as train() runs it first
        for run in (lean, reference):
            run.distiller.fit_projections(run.data.train.epoch(0), run.plan.projection_fit.batches)
    start = {k: v.clone() for k, v in _state(reference).items()}
    assert all(torch.equal(v, start[k]) for k, v in _state(lean).items())
    batches = iter(lean.data.train.epoch(0))
    kinds = set()
    for stage in lean.plan.stages:
        for run in (lean, reference):
            run.distiller.set_stage(stage)
            run.distiller.train()
        kinds |= {op.kind for op in lean.distiller.program.ops}
        for _ in range(STEPS):
            xb, yb = next(batches)
            terms, total = lean.train_step(xb, yb)
            want_terms, want_total = _reference_step(reference, stage, xb, yb)
            assert terms.keys() == want_terms.keys()
            for name in terms:
                assert torch.equal(terms[name], want_terms[name]), (stage.index, name)
            assert torch.equal(total, want_total), stage.index
    if method == "kd":
        assert "whole" in kinds  # the whole-student path was the one checked
    elif adapters:
        assert {"lift", "lower"} <= kinds
    else:
        assert "project" in kinds and not {"lift", "lower"} & kinds
    got, want = _state(lean), _state(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(v, start[k]) for k, v in want.items())  # the steps trained something
