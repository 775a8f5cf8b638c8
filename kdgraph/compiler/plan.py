"""Pass 10: the training schedule, a list of training stages over the block graph.

StableKD-k/n (Kao, Chen, Chan): stage 0 decomposes the student into k groups of one
block; each recomposition R merges groups i and i+1 for every odd i, so after n of them
the groups are coarser, and a group is fed as its first block was and trained against the
teacher at its last cut. Vanilla KD is StableKD-1/0: one group of all blocks. KD + MSE is
one group with a feature MSE at every block end. Supervised is one group without a teacher.

``build_plan`` fixes the groups and epochs of each stage; the compiler's plan pass then
gives every stage its training ``Program`` and its inference ``Program`` (``compiler.program``),
read from the block graph: the loss terms each group is trained with are the training
program's loss nodes, and evaluation, BatchNorm recalibration and export run the inference
program. Where a stage reads a frozen projection (``decompose.adapters: projected``) the plan
gets its fit (``Plan.projection_fit``), the stage before stage 0 that fits every projection once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import networkx as nx

from kdgraph.compiler.program import inference_program, stage_program
from kdgraph.errors import SpecError
from kdgraph.ir import Groups, Pairing, Plan, ProjectionFit, TrainingStage
from kdgraph.registry import METHODS

if TYPE_CHECKING:
    from kdgraph.spec import Spec


def recompose(groups: Groups) -> Groups:
    """R: merge groups i and i+1 for every odd i (1-based); a last odd group stays alone."""
    return tuple(groups[i] + groups[i + 1] if i + 1 < len(groups) else groups[i]
                 for i in range(0, len(groups), 2))


def decompose(k: int) -> Groups:
    return tuple((i,) for i in range(1, k + 1))


def split_epochs(epochs: int, stages: int) -> list[int]:
    """Equal split, the remainder to the last stage: 20 over 3 -> 6, 6, 8 (the paper's rule)."""
    base = epochs // stages
    if base == 0:
        raise SpecError("schedule.epochs", f"{epochs} epochs cannot be split over {stages} training "
                        f"stages; give at least {stages} or fewer schedule.recompositions")
    return [base] * (stages - 1) + [epochs - base * (stages - 1)]


def build_plan(method: str, k: int, recompositions: int, epochs: int,
               stage_epochs: list[int] | None = None, tpp_block: int | None = None) -> Plan:
    """The schedule for ``method`` over k blocks (stages without programs yet). Spec
    validation has bounded n already."""
    n = METHODS.get(method).stages(recompositions) - 1  # recompositions this method makes
    if METHODS.get(method).decomposes:
        groups = [decompose(k)]
        for _ in range(n):
            nxt = recompose(groups[-1])
            if nxt == groups[-1]:
                raise SpecError("schedule.recompositions", f"{n} recompositions of {k} blocks: "
                                f"after {len(groups) - 1} the student is one block already")
            groups.append(nxt)
    else:
        groups = [(tuple(range(1, k + 1)),)]
    split = list(stage_epochs) if stage_epochs else split_epochs(epochs, len(groups))
    stages = tuple(TrainingStage(i, e, g) for i, (e, g) in enumerate(zip(split, groups)))
    return Plan(method, k, n, stages, tpp_block, METHODS.get(method).feature_losses)


def plan_pass(spec: Spec, pairing: Pairing, graph: nx.DiGraph) -> Plan:
    """Pass 10: the training schedule, each stage with its program read from the graph."""
    s = spec.schedule
    plan = build_plan(s.method, pairing.k, s.recompositions, s.epochs, s.stage_epochs,
                      graph.graph["tpp_block"])  # chosen once, by the block graph pass
    inference = inference_program(graph, plan.chains_adapters)
    plan = plan.with_programs([
        stage_program(graph, st.groups, chain_adapters=plan.chains_adapters,
                      feature_losses=plan.feature_losses, tpp_block=plan.tpp_block)
        for st in plan.stages], [inference] * len(plan.stages))
    projected = sorted({op.block for st in plan.stages for op in st.program.ops if op.kind == "project"})
    if projected:  # the projections some stage reads are fitted once, before stage 0
        plan = replace(plan, projection_fit=ProjectionFit(tuple(projected), spec.decompose.projection_batches))
    if spec.teacher is not None:
        plan = replace(plan, teacher_dtype=spec.teacher.dtype, teacher_shard=spec.teacher.shard)
    return plan
