"""Pass 4: pair teacher and student blocks and decide where adapters go.

Block i of the teacher and block i of the student end at boundary cuts of the same
reduction and layout. Where their widths differ an adapter pair is planned: ``lift``
(Cs -> Ct) on the student's feature and ``lower`` (Ct -> Cs) on the teacher's.
Where the reductions or layouts differ, a cross-architecture adapter would be needed;
until it exists the pairing fails with a message naming both cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cuts import Cut, find_cut_by_module
from .errors import PlanError
from .stages import Boundary, Stage, choose_boundaries
from .trace import TracedModel


@dataclass(frozen=True)
class AdapterSpec:
    """A lift/lower pair at the end of block ``index`` (both are linear maps on channels)."""

    index: int
    kind: str  # "conv1x1" (NCHW maps: 1x1 conv + BN) or "linear" (tokens, NHWC: Linear)
    layout: str
    student_channels: int
    teacher_channels: int

    @property
    def lift(self) -> tuple[int, int]:
        return (self.student_channels, self.teacher_channels)

    @property
    def lower(self) -> tuple[int, int]:
        return (self.teacher_channels, self.student_channels)

    def _map_params(self, cin: int, cout: int) -> int:
        # conv1x1: bias-free conv, then BN's weight and bias; linear: weight and bias
        return cin * cout + (2 * cout if self.kind == "conv1x1" else cout)

    @property
    def lift_params(self) -> int:
        return self._map_params(self.student_channels, self.teacher_channels)

    @property
    def lower_params(self) -> int:
        return self._map_params(self.teacher_channels, self.student_channels)

    @property
    def params(self) -> int:
        return self.lift_params + self.lower_params

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layout": self.layout, "lift": list(self.lift),
                "lower": list(self.lower), "params": self.params}


@dataclass(frozen=True)
class BlockPair:
    """Block ``index`` (1-based): where it ends in each model. The head ends at the output."""

    index: int
    teacher: Cut | None  # None: the head (ends at the logits) or no teacher
    student: Cut | None
    adapter: AdapterSpec | None
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
        }


@dataclass(frozen=True)
class Pairing:
    blocks: tuple[BlockPair, ...]

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def adapters(self) -> list[AdapterSpec]:
        return [b.adapter for b in self.blocks if b.adapter]


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


def _adapter(index: int, t: Cut, s: Cut) -> AdapterSpec | None:
    if t.channels == s.channels:
        return None
    kind = "conv1x1" if s.layout == "NCHW" else "linear"
    return AdapterSpec(index, kind, s.layout, s.channels, t.channels)


def pair_blocks(student: list[Boundary], teacher: list[Boundary] | None) -> Pairing:
    """Pair the i-th teacher and student boundaries; the head is the last block.

    Raises PlanError naming both cuts where reductions or layouts differ.
    """
    pairs: list[BlockPair] = []
    problems = []
    for i, sb in enumerate(student, start=1):
        tb = teacher[i - 1] if teacher is not None else None
        adapter = None
        if tb is not None:
            t, s = tb.cut, sb.cut
            if (t.reduction, t.layout, t.prefix_tokens) != (s.reduction, s.layout, s.prefix_tokens):
                problems.append(
                    f"block {i}: teacher cut '{t.label}' is {t.layout} at reduction {t.reduction} "
                    f"{list(t.shape)}, student cut '{s.label}' is {s.layout} at reduction "
                    f"{s.reduction} {list(s.shape)}")
                continue
            if t.shape[:-1] != s.shape[:-1] and t.layout in ("NHWC", "tokens") or \
                    t.layout == "NCHW" and t.shape[1:] != s.shape[1:]:
                problems.append(f"block {i}: spatial sizes differ: teacher '{t.label}' "
                                f"{list(t.shape)} vs student '{s.label}' {list(s.shape)}")
                continue
            adapter = _adapter(i, t, s)
        rule = sb.rule if tb is None or tb.rule == sb.rule else f"{tb.rule} / {sb.rule}"
        pairs.append(BlockPair(i, tb.cut if tb else None, sb.cut, adapter, rule))
    if problems:
        raise PlanError(
            "teacher and student blocks do not match in resolution or layout:\n  "
            + "\n  ".join(problems)
            + "\nA resampling / token<->map adapter is needed there; kdgraph does not build one yet. "
              "Choose other cuts with decompose.cuts or fewer decompose.blocks.")
    head = BlockPair(len(student) + 1, None, None, None, "head")
    return Pairing(tuple(pairs) + (head,))
