"""Pass 6: the block boundaries, the cuts that end blocks 1..k-1 of each model.

Named in the spec (``decompose.cuts``), or chosen from the stage ends: one boundary per
reduction (the deepest stage of each), dropping the shallowest reductions when there are
more than needed and splitting the longest stage by depth (isotropic networks) when there
are fewer. The head (pooling + classifier) is always the last block.

A non-sequential model (one with multi-tensor cuts, a U-Net) is cut on its way down first:
one boundary per resolution from the input to the deepest one (the encoder levels and the
bottleneck, each carrying the skip tensors still live there), dropping the shallowest when
there are more than needed; where more blocks are asked for, the decoder's levels follow
(``choose_down_up``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from kdgraph.compiler.artifacts import ModelArtifacts, Models, TracedModel
from kdgraph.compiler.cuts import find_cut_by_module
from kdgraph.compiler.exported import takes_tokens
from kdgraph.compiler.stages import feature_taps, preferred, tapped
from kdgraph.errors import PlanError
from kdgraph.ir import Boundary, Cut, Stage

if TYPE_CHECKING:
    from kdgraph.spec import Spec


def _units(stage: Stage, model: nn.Module) -> list[Cut]:
    """Cuts inside the stage that close a direct child of the stage end's module (blocks.3),
    or, where that module holds its repeated units in a ModuleList or Sequential that the
    forward iterates without calling it (a decoder's ``model.layers``), an item of it
    (model.layers.3)."""
    parent = stage.end.module
    if not parent:
        return []
    depth = parent.count(".") + 2
    units, stacked = [], []
    for cut in stage.cuts:
        child = next((p for p in cut.closes if p.startswith(parent + ".") and p.count(".") + 1 == depth), None)
        if child is not None:
            units.append(cut)
        item = next((p for p in cut.closes if p.startswith(parent + ".") and p.count(".") + 1 == depth + 1
                     and isinstance(model.get_submodule(p.rpartition(".")[0]), (nn.ModuleList, nn.Sequential))),
                    None)
        if item is not None:
            stacked.append(cut)
    return stacked if len(stacked) > 1 else units


def _split(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` near-equal chunks of n, the larger chunks first (10/4 -> 3,3,2,2)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def depth_ends(n: int, parts: int) -> list[int]:
    """Minitron's depth pairing as chunk ends: part j of ``parts`` ends at unit
    round((j + 1)·n / parts) − 1 (rounding halves up), so student layer i of L_s pairs with
    teacher layer round((i + 1)·L_t / L_s) − 1 when the student's L_s layers are each a part."""
    return [math.floor((j + 1) * n / parts + 0.5) - 1 for j in range(parts)]


def _depth_sizes(n: int, parts: int, tokens: bool) -> list[int]:
    """Unit counts of the ``parts`` chunks of a stage of ``n`` units: Minitron's rule for a
    decoder stack (a model fed tokens), else ``_split``."""
    if not tokens:
        return _split(n, parts)
    ends = depth_ends(n, parts)
    return [e - s for s, e in zip([-1, *ends[:-1]], ends)]


def choose_boundaries(stages: list[Stage], blocks: int, traced: TracedModel) -> list[Boundary]:
    """The ``blocks - 1`` cuts that end blocks 1..k-1 (the head is block k).

    After: boundaries are in graph order, strictly increasing, and the last is the end of
    the feature extractor (the deepest non-vector stage).
    """
    role = traced.role
    need = blocks - 1
    if need == 0:
        return []
    maps = [s for s in stages if s.end.layout != "vector"]
    if not maps:
        leaves = [leaf.split(": ", 1)[0] for leaf in traced.leaves]
        why = (f" (torch.fx traced {', '.join(leaves)} whole, as a leaf: it cannot trace through)"
               if leaves else "")
        raise PlanError(f"the {role} has no feature-map or token cut to split at{why}; "
                        "name the cuts in decompose.cuts or use decompose.blocks: 1")
    if any(s.end.multi for s in maps):
        return choose_down_up(maps, need, traced)
    # One stage per resolution: the one whose end sits at the lowest level, so that a
    # stage of expanded width inside the next block (efficientnet's blocks.3.0.bn1) loses
    # to the block it follows (blocks.2).
    per_reduction: dict[int | None, list[Stage]] = {}
    for stage in maps:
        per_reduction.setdefault(stage.reduction, []).append(stage)
    chosen = []
    taps = feature_taps(traced)
    for group in per_reduction.values():
        # A stage ending at one of the model's declared feature taps wins.
        declared = [s for s in group if tapped(s.end, taps) or s.tap]
        end = preferred([s.end for s in declared or group], traced)
        chosen.append(next(s for s in group if s.end is end))
    chosen.sort(key=lambda s: s.end.index)
    if len(chosen) >= need:
        return [Boundary(s.end, s.rule) for s in chosen[len(chosen) - need:]]
    return _split_by_depth(chosen, blocks, traced)


def _split_by_depth(chosen: list[Stage], blocks: int, traced: TracedModel) -> list[Boundary]:
    """Too few resolutions for ``blocks``: the stages with the most repeated units split by depth."""
    role, need = traced.role, blocks - 1
    parts = {s.index: 1 for s in chosen}
    units = {s.index: _units(s, traced.model) for s in chosen}
    while sum(parts.values()) < need:
        splittable = [s for s in chosen if len(units[s.index]) > parts[s.index]]
        if not splittable:
            total = sum(len(u) for u in units.values()) or len(chosen)
            raise PlanError(
                f"the {role} cannot be cut into {blocks} blocks: it has {len(chosen)} resolution "
                f"stages and {total} repeated units in all; lower decompose.blocks")
        best = max(splittable, key=lambda s: len(units[s.index]) / parts[s.index])
        parts[best.index] += 1
    out: list[Boundary] = []
    for stage in chosen:
        p, u = parts[stage.index], units[stage.index]
        if p == 1:
            out.append(Boundary(stage.end, stage.rule))
            continue
        sizes = _depth_sizes(len(u), p, takes_tokens(traced.model))
        at = 0
        for j, size in enumerate(sizes[:-1]):
            at += size
            out.append(Boundary(u[at - 1], f"depth split {j + 1}/{p} ({'/'.join(map(str, sizes))})"))
        out.append(Boundary(stage.end, f"depth split {p}/{p} ({'/'.join(map(str, sizes))})"))
    return out


def _per_reduction(stages: list[Stage], traced: TracedModel) -> list[Stage]:
    """One stage per reduction among ``stages`` (the preferred end of each), in graph order."""
    groups: dict[int | None, list[Stage]] = {}
    for stage in stages:
        groups.setdefault(stage.reduction, []).append(stage)
    chosen = []
    for group in groups.values():
        end = preferred([s.end for s in group], traced)
        chosen.append(next(s for s in group if s.end is end))
    return sorted(chosen, key=lambda s: s.end.index)


def choose_down_up(maps: list[Stage], need: int, traced: TracedModel) -> list[Boundary]:
    """Block ends of a non-sequential (encoder-decoder) model: one per resolution on the way
    down to the deepest (the first run of stages at the deepest reduction ends it), the
    deepest ``need`` of them; then, where more are needed, one per resolution on the way up,
    in graph order."""
    deepest = max(s.reduction or 0 for s in maps)
    first = next(i for i, s in enumerate(maps) if (s.reduction or 0) == deepest)
    pivot = first
    while pivot + 1 < len(maps) and (maps[pivot + 1].reduction or 0) == deepest:
        pivot += 1
    down = _per_reduction(maps[:pivot + 1], traced)
    up = [s for s in _per_reduction(maps[pivot + 1:], traced)]
    if len(down) >= need:
        return [Boundary(s.end, s.rule) for s in down[len(down) - need:]]
    if len(down) + len(up) < need:
        raise PlanError(f"the {traced.role} cannot be cut into {need + 1} blocks: it has {len(down)} resolutions "
                        f"on the way down and {len(up)} on the way up; lower decompose.blocks")
    return [Boundary(s.end, s.rule) for s in down] + [Boundary(s.end, "decoder " + s.rule)
                                                    for s in up[:need - len(down)]]


def _explicit(cuts: list[Cut], paths: list[str], role: str) -> list[Boundary]:
    out = []
    for i, path in enumerate(paths):
        cut = find_cut_by_module(cuts, path)
        if cut is None:
            near = [c.label for c in cuts if c.label and (path in c.label or c.label in path)][:6]
            hint = f"; cuts near it: {', '.join(near)}" if near else ""
            raise PlanError(
                f"decompose.cuts.{i}.{role}: '{path}' is not a cut of the {role} (no single tensor "
                f"crosses there, or no such module){hint}. `kdgraph plan` lists every cut.")
        out.append(Boundary(cut, "explicit"))
    if any(a.cut.index >= b.cut.index for a, b in zip(out, out[1:])):
        raise PlanError(f"decompose.cuts: the {role} cuts must be in forward order")
    return out


def boundaries_for(traced: TracedModel, cuts: list[Cut], stages: list[Stage], blocks: int,
                   explicit: list[str] | None) -> list[Boundary]:
    """Block ends of one model: the explicit cuts when given, else the automatic choice."""
    if explicit is not None:
        return _explicit(cuts, explicit, traced.role)
    return choose_boundaries(stages, blocks, traced)


def _has_multi(art: ModelArtifacts | None) -> bool:
    return art is not None and any(s.end.multi for s in art.stages)


def pairable_stages(art: ModelArtifacts, partner: ModelArtifacts | None) -> list[Stage]:
    """The stages of ``art`` whose ends may end a block when cuts are chosen automatically: all,
    unless ``art`` has multi-tensor stage ends and its partner has none. Then only its
    single-tensor ends: a cut carrying a skip tensor (a U-Net's encoder feature, LRASPP's or
    DeepLabv3-MobileNetV3's stride-8 feature kept for the head) could pair with no tensor of a
    partner whose every cut carries one, nor be fed from it. Where ``art`` has no
    single-tensor stage end, all its stages (the pairing then names the mismatch)."""
    stages = list(art.stages)
    if partner is None or not _has_multi(art) or _has_multi(partner):
        return stages
    single = [s for s in stages if not s.end.multi]
    return single if any(s.end.layout != "vector" for s in single) else stages


def boundaries_pass(spec: Spec, models: Models) -> Models:
    """Pass 6: the cuts that end each block (explicit in the spec, else chosen from the stages
    ``pairable_stages`` leaves)."""
    d = spec.decompose

    def one(art: ModelArtifacts) -> ModelArtifacts:
        explicit = None if d.cuts == "auto" else [getattr(p, art.role) for p in d.cuts]
        partner = models.student if art.role == "teacher" else models.teacher
        return replace(art, boundaries=tuple(boundaries_for(art.traced, list(art.cuts), pairable_stages(art, partner),
                                                             d.blocks, explicit)))

    return models.map(one)
