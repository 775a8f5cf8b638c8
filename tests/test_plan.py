"""The StableKD schedule: recomposition, epoch split and the plans of every method."""

from __future__ import annotations

import json

import pytest

from kdgraph.errors import SpecError
from kdgraph.compiler.plan import build_plan, decompose, recompose, split_epochs

# Decomposition, then every recomposition until the student is one block, written out.
EXPECTED = {
    1: [[[1]]],
    2: [[[1], [2]], [[1, 2]]],
    3: [[[1], [2], [3]], [[1, 2], [3]], [[1, 2, 3]]],
    4: [[[1], [2], [3], [4]], [[1, 2], [3, 4]], [[1, 2, 3, 4]]],
    5: [[[1], [2], [3], [4], [5]], [[1, 2], [3, 4], [5]], [[1, 2, 3, 4], [5]], [[1, 2, 3, 4, 5]]],
    6: [[[1], [2], [3], [4], [5], [6]], [[1, 2], [3, 4], [5, 6]], [[1, 2, 3, 4], [5, 6]],
        [[1, 2, 3, 4, 5, 6]]],
    7: [[[1], [2], [3], [4], [5], [6], [7]], [[1, 2], [3, 4], [5, 6], [7]], [[1, 2, 3, 4], [5, 6, 7]],
        [[1, 2, 3, 4, 5, 6, 7]]],
    8: [[[1], [2], [3], [4], [5], [6], [7], [8]], [[1, 2], [3, 4], [5, 6], [7, 8]],
        [[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4, 5, 6, 7, 8]]],
    9: [[[1], [2], [3], [4], [5], [6], [7], [8], [9]], [[1, 2], [3, 4], [5, 6], [7, 8], [9]],
        [[1, 2, 3, 4], [5, 6, 7, 8], [9]], [[1, 2, 3, 4, 5, 6, 7, 8], [9]],
        [[1, 2, 3, 4, 5, 6, 7, 8, 9]]],
}


def _lists(groups):
    return [list(g) for g in groups]


@pytest.mark.parametrize("k", sorted(EXPECTED))
def test_recompose_sequence(k):
    # Bounded: each recomposition halves the count (rounding up), so ceil(log2 k) of them reach
    # one block; a wrong merge rule fails at its first step instead of looping until memory runs out.
    chain = [decompose(k)]
    for _ in range(k):
        if len(chain[-1]) == 1:
            break
        chain.append(recompose(chain[-1]))
        assert len(chain[-1]) == (len(chain[-2]) + 1) // 2, [_lists(g) for g in chain]
    assert [_lists(g) for g in chain] == EXPECTED[k]
    assert recompose(chain[-1]) == chain[-1]  # one block stays one block


@pytest.mark.parametrize("k", sorted(EXPECTED))
def test_build_plan_stablekd_every_n(k):
    for n in range(len(EXPECTED[k])):
        plan = build_plan("stablekd", k, n, epochs=60)
        assert [_lists(s.groups) for s in plan.stages] == EXPECTED[k][:n + 1]
        assert (plan.k, plan.n, plan.epochs) == (k, n, 60)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_too_many_recompositions(k):
    n = len(EXPECTED[k])  # one more than possible
    with pytest.raises(SpecError) as info:
        build_plan("stablekd", k, n, epochs=60)
    assert info.value.path == "schedule.recompositions"


@pytest.mark.parametrize("epochs,stages,expected", [
    (20, 3, [6, 6, 8]), (60, 3, [20, 20, 20]), (200, 3, [66, 66, 68]), (7, 1, [7]),
    (3, 3, [1, 1, 1]), (10, 4, [2, 2, 2, 4]), (5, 2, [2, 3]),
])
def test_split_epochs(epochs, stages, expected):
    assert split_epochs(epochs, stages) == expected
    assert sum(expected) == epochs


@pytest.mark.parametrize("epochs,stages", [(2, 3), (0, 1), (4, 5)])
def test_split_epochs_too_few(epochs, stages):
    with pytest.raises(SpecError) as info:
        split_epochs(epochs, stages)
    assert info.value.path == "schedule.epochs"


def test_stablekd_5_2():
    plan = build_plan("stablekd", 5, 2, 20)
    assert (plan.method, plan.k, plan.n, plan.epochs) == ("stablekd", 5, 2, 20)
    assert [s.epochs for s in plan.stages] == [6, 6, 8]
    assert [s.index for s in plan.stages] == [0, 1, 2]
    assert [_lists(s.groups) for s in plan.stages] == [
        [[1], [2], [3], [4], [5]], [[1, 2], [3, 4], [5]], [[1, 2, 3, 4], [5]]]
    assert plan.uses_adapters and not plan.feature_losses


def test_kd():
    plan = build_plan("kd", 5, 2, 20)  # recompositions ignored
    assert (plan.n, plan.epochs, len(plan.stages)) == (0, 20, 1)
    assert _lists(plan.stages[0].groups) == [[1, 2, 3, 4, 5]]
    assert not plan.uses_adapters and not plan.feature_losses


def test_kd_mse():
    plan = build_plan("kd+mse", 5, 2, 20)
    assert (plan.n, plan.epochs) == (0, 20)
    assert _lists(plan.stages[0].groups) == [[1, 2, 3, 4, 5]]
    assert plan.uses_adapters and plan.feature_losses


def test_supervised():
    plan = build_plan("supervised", 1, 0, 12)
    assert (plan.k, plan.n, plan.epochs) == (1, 0, 12)
    assert _lists(plan.stages[0].groups) == [[1]]
    assert not plan.uses_adapters
    plan = build_plan("supervised", 4, 2, 12)
    assert _lists(plan.stages[0].groups) == [[1, 2, 3, 4]]


def test_stablekd_k_0_and_1_0():
    plan = build_plan("stablekd", 5, 0, 10)
    assert len(plan.stages) == 1 and _lists(plan.stages[0].groups) == [[1], [2], [3], [4], [5]]
    assert plan.uses_adapters
    vanilla = build_plan("stablekd", 1, 0, 10)  # StableKD-1/0 is vanilla KD
    assert _lists(vanilla.stages[0].groups) == [[1]]
    assert not vanilla.uses_adapters


def test_explicit_stage_epochs():
    plan = build_plan("stablekd", 5, 2, 60, stage_epochs=[10, 20, 30])
    assert [s.epochs for s in plan.stages] == [10, 20, 30] and plan.epochs == 60
    plan = build_plan("kd", 5, 0, 9, stage_epochs=[9])
    assert [s.epochs for s in plan.stages] == [9]


def test_plan_to_dict_is_json():
    d = build_plan("stablekd", 4, 2, 12).to_dict()
    assert json.loads(json.dumps(d)) == d
    expected = {"method": "stablekd", "k": 4, "n": 2, "epochs": 12, "stages": [
        {"index": 0, "epochs": 4, "groups": [[1], [2], [3], [4]]},
        {"index": 1, "epochs": 4, "groups": [[1, 2], [3, 4]]},
        {"index": 2, "epochs": 4, "groups": [[1, 2, 3, 4]]},
    ]}
    # the contract's keys; more may be added (each stage's losses and program: tests/test_program.py)
    assert {key: d[key] for key in expected if key != "stages"} == {k: v for k, v in expected.items() if k != "stages"}
    assert [{key: st[key] for key in ("index", "epochs", "groups")} for st in d["stages"]] == expected["stages"]
