"""The one run builder: `train`, `eval`, `cache` and `export` (and tests, bench/) compile a
spec here, each saying what it needs of the plan (``Needs``); from then on they read the
compiled plan and its ``RunRecord`` (``Compiled.run``), never the spec.

    build_run(spec, TRAIN)    the seeds set, both models' weights, the cache the spec names
    build_run(spec, EVAL)     the teacher's weights where they can be had, no cache
    build_run(spec, CACHE)    the seeds set, the teacher's weights, no cache (it is being built)
    build_run(spec, EXPORT)   the teacher's shapes alone (no weights, no cache)

What differs per command is an option of the compiler (``compile_spec``'s ``read_cache``,
``teacher_weights``): the spec is never rewritten.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from kdgraph.errors import KDGraphError
from kdgraph.runtime.techniques import use_deterministic_algorithms

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled, RunRecord
    from kdgraph.spec import Spec

__all__ = ["CACHE", "EVAL", "EXPORT", "TRAIN", "Needs", "build_run", "plan_records"]


@dataclass(frozen=True)
class Needs:
    """What a command needs of the compiled plan."""

    fetch: tuple[str, ...]  # roles whose ``pretrained: true`` weights are fetched
    read_cache: bool  # the teacher cache the spec names is replayed
    teacher_weights: bool  # the teacher's checkpoint / pretrained weights are loaded
    allow_missing: bool  # a named weights file (or data) not there yet is listed, not an error
    seeded: bool  # threads and seeds set before the models are built (their initial weights)
    deterministic: bool = False  # torch's deterministic algorithms set as the spec says, before any kernel
    fetch_optional: bool = False  # pretrained teacher weights that cannot be had are listed, not an error


TRAIN = Needs(("teacher", "student"), read_cache=True, teacher_weights=True, allow_missing=False, seeded=True,
              deterministic=True)
EVAL = Needs(("teacher",), read_cache=False, teacher_weights=True, allow_missing=True, seeded=False,
             fetch_optional=True)
CACHE = Needs(("teacher",), read_cache=False, teacher_weights=True, allow_missing=False, seeded=True)
EXPORT = Needs((), read_cache=False, teacher_weights=False, allow_missing=True, seeded=False)


def plan_records(spec: Spec, needs: Needs) -> RunRecord:
    """The run's records as ``needs`` compiles them, before anything is built (a command's
    checks of its arguments and of the output folder come first)."""
    from kdgraph.compiler import resolve_run  # the compiler below its callers' floor: imported where used

    return resolve_run(spec, needs.read_cache, needs.teacher_weights)


def _seed(run: RunRecord, needs: Needs) -> None:
    if run.runtime.num_threads:
        torch.set_num_threads(run.runtime.num_threads)
    if needs.deterministic:
        use_deterministic_algorithms(run.runtime.deterministic)  # before any kernel runs
    torch.manual_seed(run.seed)  # model and adapter initialisation
    random.seed(run.seed)


def build_run(spec: Spec, needs: Needs) -> Compiled:
    """``spec`` compiled as the command ``needs`` it. A teacher that a cache may replay is
    deferred (built on the meta device, nothing loaded) and built for real only where some
    stage still runs it, re-seeded for that second build so the student starts from the same
    weights either way. With ``fetch_optional``, teacher weights that cannot be fetched
    (offline) leave a plan without them, listed in ``missing_weights``."""
    from kdgraph.compiler import compile_spec

    run = plan_records(spec, needs)
    options = {"allow_missing_weights": needs.allow_missing, "read_cache": needs.read_cache,
               "teacher_weights": needs.teacher_weights}
    if needs.seeded:
        _seed(run, needs)
    teacher, fetch = run.teacher, needs.fetch
    defer = ("teacher",) if teacher is not None and teacher.cache is not None else ()
    try:
        compiled = compile_spec(spec, fetch=fetch, defer=defer, **options)
    except KDGraphError as exc:
        if not (needs.fetch_optional and teacher is not None and teacher.pretrained):
            raise
        compiled = compile_spec(spec, **options)
        return replace(compiled, missing_weights=compiled.missing_weights
                       + (f"teacher pretrained weights ({str(exc).splitlines()[0]})",))
    if defer and compiled.plan.live_teacher:
        _seed(run, needs)
        compiled = compile_spec(spec, fetch=fetch, **options)
    return compiled
