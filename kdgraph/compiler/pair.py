"""Pass 7: pair teacher and student blocks and decide where adapters go.

Block i of the teacher and block i of the student end at boundary cuts of the same
reduction and layout. Where their widths differ an adapter pair is planned: ``lift``
(Cs -> Ct) on the student's feature and ``lower`` (Ct -> Cs) on the teacher's.
Where the reductions or layouts differ (a ViT teacher and a CNN student), blocks are
paired by relative depth (the i-th boundary of each) and the pair gets a format adapter
that converts layout and resamples the grid; the plan says which rule paired them.

Multi-tensor cuts (a U-Net's skips) pair when both carry as many tensors; tensors pair
position by position (graph order), each on one grid, and each gets its own lift/lower
where its widths differ (``TupleAdapterSpec``; a tensor of equal widths passes unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kdgraph.adapters import AdapterPair
from kdgraph.errors import PlanError
from kdgraph.layouts import FeatureFormat

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Models
    from kdgraph.compiler.boundaries import Boundary
    from kdgraph.compiler.cuts import Cut
    from kdgraph.spec import Spec



@dataclass(frozen=True)
class AdapterSpec:
    """A lift/lower pair at the end of block ``index``.

    kinds: ``conv1x1`` (NCHW maps of one grid: 1x1 conv + BN each way), ``linear`` (tokens or
    NHWC of one grid: Linear each way), ``format`` (layouts or grids differ: to map, resample,
    1x1 conv + BN, to the other layout; see layouts.FormatAdapter) and ``cap`` (lift is
    ScaleKD's cross-attention projector, lower a format adapter).
    """

    index: int
    kind: str
    layout: str  # the student's layout at the cut
    student_channels: int
    teacher_channels: int
    student_format: FeatureFormat | None = None
    teacher_format: FeatureFormat | None = None
    # (lift, lower) parameters of the built modules of a format or cap pair (``_counted``)
    built_params: tuple[int, int] = (0, 0)

    @property
    def lift(self) -> tuple[int, int]:
        return (self.student_channels, self.teacher_channels)

    @property
    def lower(self) -> tuple[int, int]:
        return (self.teacher_channels, self.student_channels)

    @property
    def foldable(self) -> bool:
        """lower(lift(x)) is one linear map per position: export folds it into a 1x1 conv."""
        return self.kind in ("conv1x1", "linear")

    def _map_params(self, cin: int, cout: int) -> int:
        # conv1x1: bias-free conv, then BN's weight and bias; linear: weight and bias
        return cin * cout + (2 * cout if self.kind == "conv1x1" else cout)

    @property
    def lift_params(self) -> int:
        if self.foldable:
            return self._map_params(self.student_channels, self.teacher_channels)
        return self.built_params[0]

    @property
    def lower_params(self) -> int:
        if self.foldable:
            return self._map_params(self.teacher_channels, self.student_channels)
        return self.built_params[1]

    @property
    def params(self) -> int:
        return self.lift_params + self.lower_params

    def describe(self) -> str:
        """``conv1x1 16→32→16`` (the plan's adapter column)."""
        return f"{self.kind} {self.lift[0]}→{self.lift[1]}→{self.lower[1]}"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "layout": self.layout, "lift": list(self.lift),
             "lower": list(self.lower), "params": self.params}
        if self.student_format is not None:
            d["student_format"] = [self.student_format.layout, list(self.student_format.shape)]
            d["teacher_format"] = [self.teacher_format.layout, list(self.teacher_format.shape)]
        return d


@dataclass(frozen=True)
class TupleAdapterSpec:
    """The adapters at a multi-tensor cut ending block ``index``: per tensor (graph order)
    an AdapterSpec, or None where teacher and student widths agree (the tensor passes as it
    is). lift and lower map the tuple of the cut's tensors, each tensor by its own pair."""

    index: int
    parts: tuple[AdapterSpec | None, ...]
    kind: str = "per-tensor"
    student_format = None  # no single format: see each part
    teacher_format = None

    @property
    def layout(self) -> str:
        return next(p.layout for p in self.parts if p is not None)

    @property
    def lift(self) -> list:
        """(Cs, Ct) of each tensor's lift; (C, C) where it passes unchanged."""
        return [list(p.lift) if p else None for p in self.parts]

    @property
    def lower(self) -> list:
        return [list(p.lower) if p else None for p in self.parts]

    @property
    def foldable(self) -> bool:
        return all(p is None or p.foldable for p in self.parts)

    @property
    def lift_params(self) -> int:
        return sum(p.lift_params for p in self.parts if p)

    @property
    def lower_params(self) -> int:
        return sum(p.lower_params for p in self.parts if p)

    @property
    def params(self) -> int:
        return self.lift_params + self.lower_params

    def describe(self) -> str:
        """``per-tensor [conv1x1 8→16→8, -, conv1x1 32→64→32]`` (the plan's adapter column)."""
        return f"{self.kind} [" + ", ".join(p.describe() if p else "-" for p in self.parts) + "]"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tensors": [p.to_dict() if p else None for p in self.parts],
                "params": self.params}


@dataclass(frozen=True)
class BlockPair:
    """Block ``index`` (1-based): where it ends in each model. The head ends at the output."""

    index: int
    teacher: Cut | None  # None: the head (ends at the logits) or no teacher
    student: Cut | None
    adapter: AdapterSpec | TupleAdapterSpec | None
    rule: str  # how the boundary was chosen ("stage end", "depth split 2/4", "explicit", "head")

    @property
    def is_head(self) -> bool:
        return self.rule == "head"

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "teacher": self.teacher.label if self.teacher else ("output" if self.is_head else None),
            "student": self.student.label if self.student else "output",
            "teacher_node": self.teacher.node if self.teacher else None,
            "student_node": self.student.node if self.student else None,
            "adapter": self.adapter.to_dict() if self.adapter else None,
            "rule": self.rule,
            **({"teacher_tensors": list(self.teacher.nodes) if self.teacher else None,
                "student_tensors": list(self.student.nodes)} if self.multi else {}),
        }

    @property
    def multi(self) -> bool:
        """The block ends at a multi-tensor cut."""
        return bool(self.student is not None and self.student.multi)


@dataclass(frozen=True)
class Pairing:
    blocks: tuple[BlockPair, ...]

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def adapters(self) -> list[AdapterSpec | TupleAdapterSpec]:
        return [b.adapter for b in self.blocks if b.adapter]


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
    """``spec`` with the parameter counts of its built lift and lower (no closed form for these)."""
    pair = AdapterPair(spec)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return replace(spec, built_params=(count(pair.lift), count(pair.lower)))


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


def pair_pass(spec: Spec, models: Models, input_size: tuple[int, int, int]) -> Pairing:
    """Pass 7: teacher and student blocks paired, adapters planned where they differ."""
    teacher = list(models.teacher.boundaries) if models.teacher else None
    return pair_blocks(list(models.student.boundaries), teacher, input_size[1:], spec.decompose.projector)
