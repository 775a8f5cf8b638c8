"""Pass 7: pair teacher and student blocks and decide where adapters go.

Block i of the teacher and block i of the student end at boundary cuts of the same
reduction and layout. Where their widths differ an adapter pair is planned: ``lift``
(Cs -> Ct) on the student's feature and ``lower`` (Ct -> Cs) on the teacher's.
Where the reductions or layouts differ (a ViT teacher and a CNN student), blocks are
paired by relative depth (the i-th boundary of each) and the pair gets a format adapter
that converts layout and resamples the grid; the plan says which rule paired them.

With ``decompose.adapters: projected`` every adapter is replaced by a ``ProjectionSpec``: the
teacher's feature projected into the student's format by a frozen PCA (``kdgraph.projection``),
sign-split where the student's block ends in a ReLU; where some pair cannot be projected the
pairing keeps its adapters and says why (``Pairing.fallback``, a note of the plan).

Multi-tensor cuts (a U-Net's skips) pair when both carry as many tensors; tensors pair
position by position (graph order), each on one grid, and each gets its own lift/lower
where its widths differ (``TupleAdapterSpec``; a tensor of equal widths passes unchanged).
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.errors import PlanError
from kdgraph.registry import METHODS
from kdgraph.compiler.cuts import find_cut_by_module
from kdgraph.ir import (AdapterSpec, BlockPair, Boundary, Cut, ExplicitPair, FeatureFormat, Pairing, ProjectionSpec,
                        TupleAdapterSpec)
from kdgraph.layouts import FormatAdapter
from kdgraph.scalekd import CrossAttentionProjector

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import ModelArtifacts, Models
    from kdgraph.spec import Spec



def _same_grid(t: Cut, s: Cut) -> bool:
    return (t.reduction, t.layout, t.prefix_tokens) == (s.reduction, s.layout, s.prefix_tokens) \
        and _spatial(t) == _spatial(s)


def _spatial(c: Cut) -> tuple[int, ...]:
    return {"NCHW": c.shape[1:], "NHWC": c.shape[:2], "tokens": c.shape[:1]}.get(c.layout, c.shape)


def _adapter(index: int, t: Cut, s: Cut, input_hw: tuple[int, int], projector: str) -> AdapterSpec | None:
    same = _same_grid(t, s)
    if same and t.channels == s.channels and projector != "cap":
        return None
    if same and projector != "cap":
        return AdapterSpec(index, "conv1x1" if s.layout == "NCHW" else "linear", s.layout, s.channels, t.channels)
    kind = "cap" if projector == "cap" else "format"
    return _counted(AdapterSpec(index, kind, s.layout, s.channels, t.channels,
                                FeatureFormat.of(s, input_hw), FeatureFormat.of(t, input_hw)))


def _counted(spec: AdapterSpec) -> AdapterSpec:
    """``spec`` with the parameter counts of its lift and lower (``adapters.AdapterPair``: a
    format adapter each way, or CAP as lift), counted by the modules' own formulas, not built."""
    src, dst = spec.student_format, spec.teacher_format
    lift = CrossAttentionProjector.count_params(src, dst) if spec.kind == "cap" else FormatAdapter.count_params(src, dst)
    return replace(spec, module_params=(lift, FormatAdapter.count_params(dst, src)))


def _tuple_adapter(i: int, t: Cut, s: Cut, projector: str) -> tuple[TupleAdapterSpec | None, str | None]:
    """The per-tensor adapters of block i's multi-tensor cuts, or why they cannot pair."""
    where = f"block {i}: teacher cut {t.description} and student cut {s.description}"
    if len(t.members) != len(s.members):
        return None, f"{where} carry {len(t.members)} and {len(s.members)} tensors"
    if projector == "cap":
        return None, f"{where}: the cap projector maps one tensor; use decompose.projector: conv1x1"
    parts = []
    for j, (tm, sm) in enumerate(zip(t.members, s.members), start=1):
        if not _same_grid(tm, sm):
            return None, (f"{where}: tensor {j} is {tm.layout} {list(tm.shape)} in the teacher and "
                          f"{sm.layout} {list(sm.shape)} in the student (multi-tensor cuts pair tensors of one grid)")
        parts.append(_adapter(i, tm, sm, (0, 0), projector))
    return (TupleAdapterSpec(i, tuple(parts)) if any(parts) else None), None


def pair_blocks(student: list[Boundary], teacher: list[Boundary] | None,
                input_hw: tuple[int, int] = (0, 0), projector: str = "conv1x1") -> Pairing:
    """Pair the i-th teacher and student boundaries (relative depth); the head is the last block.

    Where layouts or grids differ (ViT teacher, CNN student; Swin's NHWC against NCHW) the
    pair gets a format adapter and its rule says so. A vector (pooled) feature cannot be
    converted: PlanError names both cuts.
    """
    pairs: list[BlockPair] = []
    problems = []
    for i, sb in enumerate(student, start=1):
        tb = teacher[i - 1] if teacher is not None else None
        adapter = None
        rule = sb.rule
        if tb is not None and (tb.cut.multi or sb.cut.multi):
            rule = sb.rule if tb.rule == sb.rule else f"{tb.rule} / {sb.rule}"
            adapter, problem = _tuple_adapter(i, tb.cut, sb.cut, projector)
            if problem:
                problems.append(problem)
                continue
        elif tb is not None:
            t, s = tb.cut, sb.cut
            rule = sb.rule if tb.rule == sb.rule else f"{tb.rule} / {sb.rule}"
            if not _same_grid(t, s):
                if "vector" in (t.layout, s.layout) or "other" in (t.layout, s.layout):
                    problems.append(f"block {i}: teacher cut '{t.label}' ({t.layout} {list(t.shape)}) and "
                                    f"student cut '{s.label}' ({s.layout} {list(s.shape)}) cannot be converted")
                    continue
                rule += "; relative depth"
            adapter = _adapter(i, t, s, input_hw, projector)
        pairs.append(BlockPair(i, tb.cut if tb else None, sb.cut, adapter, rule))
    if problems:
        raise PlanError("teacher and student blocks cannot be paired:\n  " + "\n  ".join(problems)
                        + "\nChoose other cuts with decompose.cuts or fewer decompose.blocks.")
    head = BlockPair(len(student) + 1, None, None, None, "head")
    return Pairing(tuple(pairs) + (head,))


def _why_not_projected(block: BlockPair) -> str:
    """Why the teacher's feature at ``block``'s end cannot be projected into the student's
    format ("" where it can)."""
    a = block.adapter
    if hasattr(a, "parts"):
        return "multi-tensor cuts are not projected (a PCA per tensor is not implemented)"
    return ""


def project_blocks(pairing: Pairing, input_hw: tuple[int, int], relu_ends: frozenset[int] = frozenset()) -> Pairing:
    """``pairing`` with a frozen projection in place of each adapter (``decompose.adapters:
    projected``), or unchanged with ``fallback`` saying why when some pair cannot be projected
    (adapters stay in the path for every block: one student, one mode). ``relu_ends``: the
    blocks whose student cut is a ReLU's output (their projection is sign-split)."""
    problems: dict[str, list[int]] = {}
    for b in pairing.blocks:
        if b.adapter is not None and (why := _why_not_projected(b)):
            problems.setdefault(why, []).append(b.index)
    if problems:
        said = "; ".join(f"block{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))}: {why}"
                         for why, ix in problems.items())
        return replace(pairing, fallback=f"{said}; every block keeps its adapters in the path (in_path)")
    blocks = []
    for b in pairing.blocks:
        if b.adapter is not None:
            s = FeatureFormat.of(b.student, input_hw)
            t = FeatureFormat.of(b.teacher, input_hw)
            b = replace(b, adapter=None, projection=ProjectionSpec(b.index, s, t, b.index in relu_ends))
        blocks.append(b)
    return replace(pairing, blocks=tuple(blocks), adapters_mode="projected")


def _relu_ends(models: Models, pairing: Pairing) -> frozenset[int]:
    """Blocks whose student cut is the output of a ReLU (its values are never negative)."""
    traced = models.student.traced
    if traced is None:
        return frozenset()
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    out = set()
    for b in pairing.blocks:
        node = nodes.get(b.student.node) if b.student is not None else None
        if node is None:
            continue
        if node.op == "call_module":
            is_relu = isinstance(traced.gm.get_submodule(node.target), nn.ReLU)
        else:
            is_relu = node.target in (torch.relu, F.relu, torch.relu_) or (node.op == "call_method"
                                                                          and node.target in ("relu", "relu_"))
        if is_relu:
            out.add(b.index)
    return frozenset(out)


def resolve_layer(art: ModelArtifacts, path: str, at: str) -> tuple[Cut, int]:
    """The single-tensor cut that closes module ``path`` of ``art``'s model and the block it lies
    in (a block's end belongs to that block). A path that is no module, or whose output is not a
    cut, is a PlanError naming ``at`` (the spec's path) with the nearest names."""
    cut = find_cut_by_module(list(art.cuts), path)
    if cut is None or cut.multi:
        modules = [name for name, _ in art.model.named_modules() if name]
        if path not in modules:
            near = difflib.get_close_matches(path, modules, n=3) or \
                difflib.get_close_matches(path, [c.label for c in art.cuts], n=3)
            hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise PlanError(f"{at}: the {art.role} has no module {path!r}{hint}")
        near = difflib.get_close_matches(path, [c.label for c in art.cuts if not c.multi], n=3)
        hint = f"; cuts near it: {', '.join(near)}" if near else ""
        raise PlanError(f"{at}: the output of the {art.role}'s {path!r} is not a single-tensor cut (other tensors "
                        f"cross there){hint}; `kdgraph plan --format json` lists every cut")
    ends = [b.cut.index for b in art.boundaries]
    return cut, 1 + sum(1 for end in ends if end < cut.index)


def explicit_pairs(spec: Spec, models: Models, input_hw: tuple[int, int]) -> tuple[ExplicitPair, ...]:
    """The spec's ``loss.pairs`` resolved to cuts and blocks, each with the adapter that lifts the
    student's feature to the teacher's (as a block end's; the conv1x1 kind, no CAP)."""
    out = []
    for j, pair in enumerate(spec.loss.pairs, start=1):
        s, s_block = resolve_layer(models.student, pair.student, f"loss.pairs.{j - 1}.student")
        t, t_block = resolve_layer(models.teacher, pair.teacher, f"loss.pairs.{j - 1}.teacher")
        if not _same_grid(t, s) and ("vector" in (t.layout, s.layout) or "other" in (t.layout, s.layout)):
            raise PlanError(f"loss.pairs.{j - 1}: the student's '{s.label}' ({s.layout} {list(s.shape)}) and the "
                            f"teacher's '{t.label}' ({t.layout} {list(t.shape)}) cannot be converted into each other")
        out.append(ExplicitPair(j, s, t, s_block, t_block, _adapter(j, t, s, input_hw, "conv1x1"), pair.loss,
                                pair.weight))
    return tuple(out)


def adapters_mode(spec: Spec) -> str:
    """``decompose.adapters`` resolved: ``auto`` projects the teacher's features where the
    adapters would otherwise stay in the student's inference path (a decomposing method chains
    its blocks through lower∘lift) and nothing needs a lift into the teacher's width (TPP, the
    cap projector); elsewhere adapters are training-only lifts and stay in_path."""
    mode = spec.decompose.adapters
    if mode != "auto":
        return mode
    decomposes = METHODS.get(spec.schedule.method).decomposes
    return "projected" if decomposes and not spec.lifts_into_teacher_width else "in_path"


def pair_pass(spec: Spec, models: Models, input_size: tuple[int, int, int]) -> Pairing:
    """Pass 7: teacher and student blocks paired, adapters planned where they differ (or, with
    ``decompose.adapters: projected``, frozen projections of the teacher's features); the spec's
    explicit layer pairs resolved (their lifts are training-only with either mode)."""
    teacher = list(models.teacher.boundaries) if models.teacher else None
    pairing = pair_blocks(list(models.student.boundaries), teacher, input_size[1:], spec.decompose.projector)
    if adapters_mode(spec) == "projected":
        pairing = project_blocks(pairing, input_size[1:], _relu_ends(models, pairing))
    return replace(pairing, pairs=explicit_pairs(spec, models, input_size[1:])) if spec.loss.pairs else pairing
