"""The lean training step (issue 30) computes today's values bit for bit, on shipped specs.

Independent truth: a hand-written step of the general formulation, with every op the step
skips where it does nothing: the teacher and the student run block by block through their
segments, the losses are written out with the division by T, the T^2 factor and the weights
applied (``w * T^2 * KL(log_softmax(z_s / T), log_softmax(z_t / T))``, ``w * MSE``), the terms
summed into a zeros accumulator, then backward, the optimizer and the schedule. It and
``Trainer.train_step`` start from the same seed and see the same batches; loss terms and
every parameter and buffer must be *equal* (``torch.equal``), not close, in every training
stage of ``specs/quickstart.yaml`` (StableKD) and of its plain-KD variant, at the shipped
T = 1, weight 1 and at T = 3, kl_weight 0.3, feature_weight 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdgraph.runtime.loop import Trainer
from kdgraph.spec import load_spec

from _runtime_helpers import ROOT

QUICKSTART = ROOT / "specs" / "quickstart.yaml"
STEPS = 2  # per training stage


def _trainer(tmp_path, name, overrides):
    return Trainer(load_spec(QUICKSTART, [f"output={tmp_path / name}", "teacher.checkpoint=null",
                                          "runtime.device=cpu", "runtime.num_threads=1", *overrides]))


def _reference_step(run, stage, xb, yb):
    """One step of ``stage``'s program (the compiler's, not the distiller's rewrite of it),
    written out in the general form."""
    d = run.distiller
    values = {"input": xb, "labels": yb}
    with torch.no_grad():
        feats, h = {}, xb
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
        elif op.kind in ("lift", "lower"):
            values[op.node] = getattr(d.adapters[str(op.block)], op.kind)(inputs[0])
        elif op.entry == "kd":
            s, y, t = inputs
            p = dict(op.params)
            temp, w = p["temperature"], p["kl_weight"]
            terms["ce"] = F.cross_entropy(s, y, label_smoothing=p["label_smoothing"])
            kl = F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t.detach() / temp, dim=-1),
                          reduction="batchmean", log_target=True)
            terms["kl"] = w * (kl * (temp * temp))
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


def _state(run):
    return run.distiller.state_dict()


@pytest.mark.parametrize("method", ["stablekd", "kd"])
@pytest.mark.parametrize("loss", [{}, {"temperature": 3.0, "kl_weight": 0.3, "feature_weight": 2.0}],
                         ids=["defaults", "weighted"])
def test_train_step_equals_the_general_step_bit_for_bit(tmp_path, method, loss):
    overrides = [f"schedule.method={method}", "schedule.epochs=3"]
    if method == "kd":
        overrides.append("schedule.recompositions=0")
    overrides += [f"loss.{k}={v}" for k, v in loss.items()]
    lean, reference = _trainer(tmp_path, "lean", overrides), _trainer(tmp_path, "reference", overrides)
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
    got, want = _state(lean), _state(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(v, start[k]) for k, v in want.items())  # the steps trained something
