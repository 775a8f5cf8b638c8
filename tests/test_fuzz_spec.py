"""Fuzzing the spec: every shipped spec, mutated at random (fixed seed) in the ways users and
tools break files: keys dropped or added, values of the wrong type, swapped, huge, negative,
misspelt or nested deep. Each case is loaded and, where it validates, compiled to a plan
(no training). Every outcome must be a plan or a kdgraph error with a short message: no
other exception, no hang (each case runs under a time limit).

Compiling is what costs: specs of small models (the zoo's, 32-pixel ResNets) are compiled
after every mutation that validates; the 224-pixel ones are loaded and validated only
(their compile is covered, unmutated, by test_compiler_specs).
"""

from __future__ import annotations

import copy
import math
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from kdgraph.compiler import compile_spec
from kdgraph.errors import KDGraphError
from kdgraph.spec import load_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.yaml"))
COMPILED = {"quickstart", "quickstart-teacher", "custom-module", "resnet34-to-resnet18", "resnet50-to-resnet18"}
SEED = 15
CASES_PER_SPEC = 20
CASE_LIMIT_S = 20.0  # a hang, not a slow machine: the slowest compiled case takes about 1 s
TOTAL_BUDGET_S = 25.0  # on 2 CPU cores; cases beyond it are skipped, never failed

TYPES = [True, False, None, "text", 3, 2.5, [], {}, [1, 2, 3], {"a": 1}]
HUGE = [10**30, 2**64, -(10**30), 1e300, -1e300, float("inf"), float("nan")]
NEGATIVE = [-1, -0.5, 0, -(2**31)]
SMALL = [0, 1, 2, 3, 5, 7, 8, 63, 64, 65, 0.5, 1.0]  # right type, odd value: these reach the compiler
STRINGS = ["", " ", "x", "auto", "none", "cuda:99", "timm:", "timm:not_a_model_at_all", "torchvision:nope",
           "../../../etc/passwd", "é" * 40, "1e3", "true", "a" * 5000]


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _paths(node, prefix=()):
    """Every (path, value) below ``node``, containers included."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _set(root, path, value):
    node = root
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _get(root, path):
    for part in path:
        root = root[part]
    return root


def _deep(depth: int):
    value = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def mutate(raw: dict, rng: random.Random) -> tuple[dict, str]:
    """One random mutation of a copy of ``raw``; returns it and a description (for failures)."""
    spec = copy.deepcopy(raw)
    paths = [p for p, _ in _paths(spec) if p]
    path = rng.choice(paths)
    # A factory's own arguments are its business: a 10^30-class head is allocated as asked.
    in_kwargs = "kwargs" in path
    op = rng.choice(["drop", "type", "swap", "huge", "negative", "small", "small", "string", "deep", "add"])
    if in_kwargs and op in ("huge", "negative"):
        op = "type"
    if op == "drop":
        parent = _get(spec, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
        value = None
    elif op == "swap":
        other = rng.choice(paths)
        if other[: len(path)] == path or path[: len(other)] == other:  # one inside the other
            return spec, f"swap {path} with its own part: no change"
        a, b = copy.deepcopy(_get(spec, path)), copy.deepcopy(_get(spec, other))
        _set(spec, path, b)
        _set(spec, other, a)
        return spec, f"swap {path} <-> {other}"
    elif op == "add":
        parent = _get(spec, path[:-1])
        if isinstance(parent, dict):
            parent[rng.choice(["epochs", "lr", "extra", "teacher", "Name", "blocks "])] = rng.choice(TYPES)
        value = None
    else:
        value = {"type": lambda: rng.choice(TYPES), "huge": lambda: rng.choice(HUGE),
                 "small": lambda: rng.choice(SMALL),
                 "negative": lambda: rng.choice(NEGATIVE), "string": lambda: rng.choice(STRINGS),
                 "deep": lambda: _deep(rng.choice([8, 40, 200]))}[op]()
        if isinstance(value, str) and value.startswith("module:"):
            value = "x"  # code is never fuzzed into a spec
        _set(spec, path, value)
    return spec, f"{op} {path} = {value!r:.80}"


def _fuzz_cases(cases_per_spec: int = CASES_PER_SPEC):
    rng = random.Random(SEED)
    for path in SPECS:
        raw = yaml.safe_load(path.read_text())
        for role in ("teacher", "student"):  # weights files are made by earlier runs, not shipped
            if isinstance(raw.get(role), dict):
                raw[role].pop("checkpoint", None)
        for i in range(cases_per_spec):
            spec, what = mutate(raw, rng)
            if rng.random() < 0.3:  # a second mutation on top
                spec, second = mutate(spec, rng)
                what += f"; {second}"
            yield path, i, spec, what


def _check_outcome(path, spec_dict, what, compile_it: bool) -> str:
    try:
        with time_limit(CASE_LIMIT_S):
            spec = load_spec(spec_dict, source_dir=path.parent)  # module: references next to the spec file
            if compile_it:
                compile_spec(spec)
                return "plan"
            return "valid"
    except KDGraphError as exc:
        message = str(exc)
        assert message.strip(), f"{path.name}: {what}: empty message"
        assert len(message) < 3000 and message.count("\n") <= 12, f"{path.name}: {what}: long message:\n{message}"
        return type(exc).__name__
    except CaseTimeout:
        pytest.fail(f"{path.name}: {what}: no outcome within {CASE_LIMIT_S} s")
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{path.name}: {what}: {type(exc).__name__}: {str(exc)[:500]}")


def test_mutated_specs_give_a_plan_or_a_short_kdgraph_error():
    start = time.perf_counter()
    outcomes: dict[str, int] = {}
    done = 0
    for path, _, spec, what in _fuzz_cases():
        if time.perf_counter() - start > TOTAL_BUDGET_S:
            break
        kind = _check_outcome(path, spec, what, compile_it=path.stem in COMPILED)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        done += 1
    # The fuzzer must reach the compiler, not stop at the schema every time.
    assert done >= min(len(SPECS) * CASES_PER_SPEC, 100), (done, outcomes)
    assert outcomes.get("SpecError", 0) > 0 and outcomes.get("plan", 0) + outcomes.get("valid", 0) > 0, outcomes


def test_non_finite_and_huge_numbers_never_reach_math():
    """Spot checks the fuzzer relies on: inf/nan and >64-bit values are spec errors."""
    raw = yaml.safe_load(SPECS[0].read_text())
    for value in (float("inf"), float("nan"), 10**30, 1e300):
        spec = copy.deepcopy(raw)
        spec["optim"]["lr"] = value
        with pytest.raises(KDGraphError, match="optim.lr"):
            load_spec(spec)
    assert math.isfinite(load_spec(raw).optim.lr)
