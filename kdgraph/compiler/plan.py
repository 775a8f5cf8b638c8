"""Pass 10: the training schedule, a list of training stages over the block graph.

StableKD-k/n (Kao, Chen, Chan): stage 0 decomposes the student into k groups of one
block; each recomposition R merges groups i and i+1 for every odd i, so after n of them
the groups are coarser, and a group is fed as its first block was and trained against the
teacher at its last cut. Vanilla KD is StableKD-1/0: one group of all blocks. KD + MSE is
one group with a feature MSE at every block end. Supervised is one group without a teacher.

``build_plan`` fixes the groups and epochs of each stage; the compiler's plan pass then
gives every stage its ``Program`` (``kdgraph.program``), read from the block graph, and the
loss terms each group is trained with are the program's loss nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import networkx as nx

from kdgraph.compiler.blockgraph import tpp_block_of
from kdgraph.compiler.program import stage_program
from kdgraph.errors import SpecError
from kdgraph.registry import METHODS

if TYPE_CHECKING:
    from kdgraph.compiler.pair import Pairing
    from kdgraph.compiler.program import Program
    from kdgraph.spec import Spec

Groups = tuple[tuple[int, ...], ...]


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


@dataclass(frozen=True)
class TrainingStage:
    index: int
    epochs: int
    groups: Groups
    program: Program | None = None  # what the runtime executes: set by the compiler's plan pass

    @property
    def losses(self) -> tuple[tuple[str, ...], ...]:
        """Per group: the loss terms it is trained with (from its program's loss nodes)."""
        if self.program is None:
            return tuple(() for _ in self.groups)
        return tuple(self.program.terms_of(group) for group in self.groups)

    def to_dict(self) -> dict:
        return {"index": self.index, "epochs": self.epochs, "groups": [list(g) for g in self.groups],
                "losses": [list(terms) for terms in self.losses],
                "program": self.program.to_dict() if self.program is not None else None}


@dataclass(frozen=True)
class Plan:
    method: str
    k: int  # blocks in the block graph
    n: int  # recompositions
    stages: tuple[TrainingStage, ...]
    tpp_block: int | None = None  # ScaleKD's proxy path leaves the student at this block end

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    @property
    def feature_losses(self) -> bool:
        """KD + MSE: an MSE at every inner block end of the one end-to-end group."""
        return METHODS.get(self.method).feature_losses

    @property
    def uses_adapters(self) -> bool:
        """Adapters are trained (and kept at inference) only where features are compared."""
        return self.feature_losses or self.tpp_block is not None or any(len(s.groups) > 1 for s in self.stages)

    @property
    def chains_adapters(self) -> bool:
        """A group's blocks are chained through lower(lift(.)) where adapters exist (StableKD,
        TPP); KD + MSE uses lift for its losses only and chains the blocks directly."""
        return self.uses_adapters and not self.feature_losses

    def with_programs(self, programs: list[Program]) -> Plan:
        return replace(self, stages=tuple(replace(st, program=p) for st, p in zip(self.stages, programs)))

    def to_dict(self) -> dict:
        return {"method": self.method, "k": self.k, "n": self.n, "epochs": self.epochs,
                "tpp_block": self.tpp_block, "stages": [s.to_dict() for s in self.stages]}


def build_plan(method: str, k: int, recompositions: int, epochs: int,
               stage_epochs: list[int] | None = None, tpp_block: int | None = None) -> Plan:
    """The schedule for ``method`` over k blocks (stages without programs yet). Spec
    validation has bounded n already."""
    if METHODS.get(method).decomposes:
        n = recompositions
        groups = [decompose(k)]
        for _ in range(n):
            nxt = recompose(groups[-1])
            if nxt == groups[-1]:
                raise SpecError("schedule.recompositions", f"{n} recompositions of {k} blocks: "
                                f"after {len(groups) - 1} the student is one block already")
            groups.append(nxt)
    else:
        n = 0
        groups = [(tuple(range(1, k + 1)),)]
    split = list(stage_epochs) if stage_epochs else split_epochs(epochs, len(groups))
    stages = tuple(TrainingStage(i, e, g) for i, (e, g) in enumerate(zip(split, groups)))
    return Plan(method, k, n, stages, tpp_block)


def plan_pass(spec: Spec, pairing: Pairing, graph: nx.DiGraph) -> Plan:
    """Pass 10: the training schedule, each stage with its program read from the graph."""
    s = spec.schedule
    plan = build_plan(s.method, pairing.k, s.recompositions, s.epochs, s.stage_epochs,
                      tpp_block_of(spec, pairing) if spec.teacher is not None else None)
    return plan.with_programs([
        stage_program(graph, st.groups, chain_adapters=plan.chains_adapters,
                      feature_losses=plan.feature_losses, tpp_block=plan.tpp_block)
        for st in plan.stages])
