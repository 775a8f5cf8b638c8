"""Pass 6: the training schedule, a list of training stages over the block graph.

StableKD-k/n (Kao, Chen, Chan): stage 0 decomposes the student into k groups of one
block; each recomposition R merges groups i and i+1 for every odd i, so after n of them
the groups are coarser, and a group is fed as its first block was and trained against the
teacher at its last cut. Vanilla KD is StableKD-1/0: one group of all blocks. KD + MSE is
one group with a feature MSE at every block end. Supervised is one group without a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError

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
    losses: tuple[tuple[str, ...], ...]  # per group: the loss terms it is trained with

    def to_dict(self) -> dict:
        return {"index": self.index, "epochs": self.epochs, "groups": [list(g) for g in self.groups],
                "losses": [list(terms) for terms in self.losses]}


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
        return self.method == "kd+mse"

    @property
    def uses_adapters(self) -> bool:
        """Adapters are trained (and kept at inference) only where features are compared."""
        return self.method == "kd+mse" or self.tpp_block is not None or any(len(s.groups) > 1 for s in self.stages)

    def to_dict(self) -> dict:
        return {"method": self.method, "k": self.k, "n": self.n, "epochs": self.epochs,
                "tpp_block": self.tpp_block, "stages": [s.to_dict() for s in self.stages]}


def _losses(group: tuple[int, ...], k: int, method: str, feature: str, tpp_block: int | None) -> tuple[str, ...]:
    if method == "supervised":
        return ("ce",)
    terms: tuple[str, ...] = ("ce", "kl") if group[-1] == k else (feature,)
    if method == "kd+mse":
        terms += tuple(f"{feature}{i}" for i in group[:-1])
    if tpp_block is not None and tpp_block in group:
        terms += ("tpp",)
    return terms


def build_plan(method: str, k: int, recompositions: int, epochs: int,
               stage_epochs: list[int] | None = None, feature: str = "mse",
               tpp_block: int | None = None) -> Plan:
    """The schedule for ``method`` over k blocks. Spec validation has bounded n already."""
    if method == "stablekd":
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
    stages = tuple(
        TrainingStage(i, e, g, tuple(_losses(grp, k, method, feature, tpp_block) for grp in g))
        for i, (e, g) in enumerate(zip(split, groups)))
    return Plan(method, k, n, stages, tpp_block)
