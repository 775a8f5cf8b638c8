"""Training stages as programs read from the block graph, and the runtime running exactly them.

Independent truth: the loss terms each method trains with, written out by hand (StableKD:
a feature loss at each group's last block, CE + KL at the head; KD + MSE: one group with a
feature loss at every inner block end), and the Distiller's own forward: the terms it returns
and the operations it executes are the ones `kdgraph plan --format json` shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec


ROOT = Path(__file__).resolve().parents[1]


def _terms(plan):
    return [[list(t) for t in st.losses] for st in plan.stages]


def test_stablekd_losses_come_from_the_graph_loss_nodes():
    c = compile_spec(load_spec(tiny_spec(blocks=4, recompositions=2)))
    assert _terms(c.plan) == [[["mse1"], ["mse2"], ["mse3"], ["ce", "kl"]],
                              [["mse2"], ["ce", "kl"]],
                              [["ce", "kl"]]]
    names = {t for n, d in c.graph.nodes(data=True) if d["kind"] == "loss" for t in d["terms"]}
    assert {t for st in c.plan.stages for g in st.losses for t in g} <= names


@pytest.mark.parametrize("method, expected", [
    ("kd", [[["ce", "kl"]]]),
    ("kd+mse", [[["mse1", "mse2", "mse3", "ce", "kl"]]]),
])
def test_single_group_methods(method, expected):
    c = compile_spec(load_spec(tiny_spec(blocks=4, method=method, recompositions=0)))
    assert _terms(c.plan) == expected
    ops = [op.node for op in c.plan.stages[0].program.ops]
    # KD trains no adapter: the student chain is direct; KD + MSE lifts for its losses only
    assert not any(n.startswith("lower") for n in ops)
    assert any(n.startswith("lift") for n in ops) == (method == "kd+mse")


def test_supervised_program_has_no_teacher():
    c = compile_spec(load_spec(tiny_spec(teacher=False, blocks=4, method="supervised", recompositions=0)))
    assert _terms(c.plan) == [[["ce"]]]
    ops = c.plan.stages[0].program.ops
    # blocks 1..4 in order, read at the last only: the student's own forward (issue 30)
    assert [(op.node, op.kind, op.inputs) for op in ops] == [
        ("S4", "whole", ("input",)), ("head_loss", "loss", ("S4", "labels"))]


def test_stablekd_default_program_projects_the_teacher_and_chains_the_students_own_blocks():
    """decompose.adapters: auto (the default) is projected for StableKD: the merged stage's
    group (3, 4) is fed the projection of the teacher's block 2, group (1, 2) chains S1 -> S2
    with nothing between, and S2 is trained against that same projection."""
    c = compile_spec(load_spec(tiny_spec(blocks=4, recompositions=2)))
    assert c.pairing.adapters_mode == "projected" and not c.pairing.adapters
    merged = c.plan.stages[1].program
    ops = {op.node: op.inputs for op in merged.ops}
    assert [op.node for op in merged.ops] == [
        "T1", "T2", "project2", "T3", "T4", "S1", "S2", "mse2", "S3", "S4", "head_loss"]
    assert ops["S2"] == ("S1",) and ops["S3"] == ("project2",) and ops["project2"] == ("T2",)
    assert ops["mse2"] == ("S2", "project2") and merged.teacher_reads == (2, 4)


def test_program_order_and_inputs():
    c = compile_spec(load_spec(tiny_spec(blocks=4, recompositions=2, decompose={"adapters": "in_path"})))
    merged = c.plan.stages[1].program  # groups (1, 2), (3, 4)
    ops = {op.node: op for op in merged.ops}
    assert [op.node for op in merged.ops] == [
        "T1", "T2", "T3", "T4",
        "S1", "lift1", "lower1", "S2", "lift2", "mse2", "lower2", "S3", "lift3", "lower3", "S4", "head_loss"]
    assert ops["lower2"].inputs == ("T2",)  # group (3, 4) is fed the teacher's block 2
    assert ops["lower1"].inputs == ("lift1",)  # inside group (1, 2): lower(lift(.))
    assert ops["mse2"].inputs == ("lift2", "T2") and ops["head_loss"].inputs == ("S4", "labels", "T4")
    assert merged.teacher_reads == (2, 4)


SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_plan_shows_what_train_runs(path, monkeypatch):
    """For every spec in specs/: the program of each stage in `kdgraph plan --format json` is
    what the Distiller executes, op by op (on meta tensors: shapes only; a causal LM on the CPU), and its loss terms
    are the ones the stage's losses column shows."""
    spec = load_spec(path)
    # a causal LM runs on the CPU: transformers' causal-mask builder reads a value (.item()) meta tensors lack
    device = "cpu" if spec.data.dataset == "text" else "meta"
    c = compile_spec(spec, allow_missing_weights=True, materialize=device == "cpu")
    shown = json.loads(json.dumps(c.to_dict()))["schedule"]["stages"]
    ran: list[str] = []
    run_op = Distiller.run_op
    monkeypatch.setattr(Distiller, "run_op", lambda self, op, inputs, terms: (ran.append(op.node),
                                                                              run_op(self, op, inputs, terms))[1])
    d = Distiller(c).to(device)
    x = torch.empty(2, *c.input_size, device=device)
    # labels as the task has them: one per image, or one per pixel (a U-Net's masks)
    y = torch.zeros(2, *(c.student.logits_shape or [0])[1:], dtype=torch.long, device=device)
    # a denoiser: its side inputs (timestep, class) and, as its target, the true noise
    side = tuple(torch.zeros(2, dtype=torch.long, device=device) for _ in c.student.traced.side)
    if c.run.denoise is not None:
        y = torch.empty(2, *c.input_size, device=device)
    if c.task == "causal_lm":  # token ids in, next-token ids as targets: (B, T) each
        x = y = torch.zeros(2, c.input_size[-1], dtype=torch.long, device=device)
    for stage, row in zip(c.plan.stages, shown, strict=True):
        ran.clear()
        d.set_stage(stage)
        terms = d(x, y, side=side) if side else d(x, y)
        ops = row["program"]["ops"]
        assert ran == [op["node"] for op in ops]
        assert list(terms) == [t for op in ops if op["kind"] == "loss" for t in op["terms"]]
        assert sorted(t for group in row["losses"] for t in group) == sorted(terms)
        teacher = [op["node"] for op in ops if op["kind"] == "teacher"]
        assert teacher == [f"T{i}" for i in range(1, len(teacher) + 1)]  # the teacher runs as far as read
        # evaluation runs the stage's inference program: the student chain, with the adapters
        # the plan keeps in it (a program of student blocks alone is the student's own forward)
        ran.clear()
        out = d.inference(x, side)
        inference = row["inference"]
        assert inference["output"] == f"S{c.plan.k}"
        shown_ops = [op["node"] for op in inference["ops"]]
        assert ran == ([] if all(op["kind"] == "student" for op in inference["ops"]) else shown_ops)
        assert [n for n in shown_ops if n.startswith("S")] == [f"S{i}" for i in range(1, c.plan.k + 1)]
        assert all(op["kind"] in ("student", "lift", "lower") for op in inference["ops"])
        assert bool(d.adapters_in_inference) == (c.plan.chains_adapters and bool(c.pairing.adapters))
        lm = (c.input_size[-1], c.student.model.vocab_size) if c.task == "causal_lm" else ()  # logits per token
        assert out.shape == (2, *(lm or c.student.logits_shape or []))
