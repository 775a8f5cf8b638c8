"""The compiler's records: what its passes read and write, as frozen, torch-free data.

    Cut -> Stage -> Boundary -> BlockPair (AdapterSpec) -> Pairing
        -> Op -> Program -> TrainingStage -> Plan;  DataPlan, FeatureFormat, NodeInfo

Every pass (``kdgraph.compiler``), the adapters, layouts and losses that are built from
these records, and the runtime that executes them import this module; it imports nothing of
theirs (nor torch), as torch.fx keeps ``Node``/``Graph`` apart from the passes over them.
Each record renders itself for the plan's JSON (``to_dict``, keys kept stable). Records that
hold built torch objects (a traced GraphModule, a model's segments) are the compiler's
artifacts (``kdgraph.compiler.artifacts``), one layer up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import networkx as nx

__all__ = ["LAYOUTS", "graph_json", "AdapterSpec", "BlockPair", "Boundary", "Cut", "DataPlan", "ExplicitPair", "FeatureFormat",
           "Groups", "NodeInfo", "Op", "Pairing", "Plan", "Program", "ProjectionFit", "ProjectionSpec", "SideInput", "Stage",
           "TrainingStage", "TupleAdapterSpec"]

Groups = tuple[tuple[int, ...], ...]  # a training stage's groups of consecutive blocks (1-based)


# ------------------------------------------------------------------------------ traced nodes

@dataclass(frozen=True)
class NodeInfo:
    """What the compiler needs to know about one fx node."""

    name: str
    op: str
    index: int
    modules: tuple[str, ...]  # module paths the node was called from, outermost first
    shape: tuple[int, ...] | None  # full shape (batch included) when the value is one tensor
    dtype: str | None
    input_dependent: bool  # computed (transitively) from the primary input
    # computed from side inputs (a timestep, a class) and not from the primary input: the
    # time embedding; not part of any cut, every block that reads it receives it
    side_dependent: bool = False

    @property
    def module(self) -> str:
        return self.modules[-1] if self.modules else ""


@dataclass(frozen=True)
class SideInput:
    """A model input besides the image (a denoiser's timestep, its class label): a forward
    argument traced as a graph input. It and every value computed from side inputs alone
    (the time-embedding MLP) are no part of a cut: every block receives the side tensors it
    reads. Per sample one integer in ``[0, high)``."""

    name: str  # the forward parameter
    kind: str  # "timestep" or "class"
    high: int

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ cuts and blocks

LAYOUTS = ("NCHW", "NHWC", "tokens", "vector", "other")


@dataclass(frozen=True)
class Cut:
    """A cut point: after ``node``, the rest of the model depends on the input only through
    the tensor(s) that cross it. A single-tensor cut carries ``node``'s value alone; a
    multi-tensor cut (a U-Net's skips) carries ``tensors`` (graph order, ``node``'s last) and
    reports ``node``'s shape, layout, width and reduction. ``shape`` excludes the batch
    dimension."""

    node: str
    index: int  # position of the node in graph order
    module: str  # the shallowest module the cut closes ("" when it closes none)
    closes: tuple[str, ...]  # every module whose last node this is, shallowest first
    shape: tuple[int, ...]
    layout: str  # one of LAYOUTS
    channels: int | None
    reduction: int | None  # input size / feature size; None for vectors and unknown layouts
    prefix_tokens: int = 0  # class/register tokens in front of the patch tokens
    level: int = 0  # how many enclosing modules (sequence containers aside) stay open after it
    # A multi-tensor cut: every tensor live after it, in graph order, the last being this
    # node (each a single-tensor Cut record of its own node); () for a single-tensor cut.
    tensors: tuple[Cut, ...] = ()

    @property
    def label(self) -> str:
        return self.module or self.node

    @property
    def members(self) -> tuple[Cut, ...]:
        """The tensors that cross the cut, in graph order (one for a single-tensor cut)."""
        return self.tensors or (self,)

    @property
    def multi(self) -> bool:
        return len(self.tensors) > 1

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node names of the tensors that cross the cut, in graph order."""
        return tuple(m.node for m in self.members)

    @property
    def shapes(self) -> list:
        """The shape of the cut's tensor, or the list of its tensors' shapes (multi-tensor)."""
        if self.multi:
            return [list(m.shape) for m in self.tensors]
        return list(self.shape)

    @property
    def description(self) -> str:
        """``enc2`` for a single-tensor cut, ``enc2 (3 tensors: enc1, pool1, enc2)`` otherwise."""
        if not self.multi:
            return self.label
        return f"{self.label} ({len(self.tensors)} tensors: {', '.join(m.label for m in self.tensors)})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["closes"] = list(self.closes)
        d["shape"] = list(self.shape)
        del d["tensors"]
        if self.multi:  # single-tensor cuts keep the keys they always had
            d["tensors"] = [m.to_dict() for m in self.tensors]
        return d


@dataclass(frozen=True)
class Stage:
    """Consecutive cuts with one feature shape; ``end`` is where the stage is cut."""

    index: int
    cuts: tuple[Cut, ...]
    end: Cut
    # How feature_info moved or confirmed the end: "" (the rule alone), "feature_info tap X"
    # (the end moved to tap X), "same tensor as feature_info tap X" (an identity of the end).
    tap: str = ""

    @property
    def rule(self) -> str:
        """The boundary rule for this stage's end, as the plan's rule column shows it."""
        return f"stage end ({self.tap})" if self.tap else "stage end"

    @property
    def reduction(self) -> int | None:
        return self.end.reduction

    @property
    def channels(self) -> int | None:
        return self.end.channels

    def to_dict(self) -> dict:
        e = self.end
        return {"index": self.index, "module": e.module, "node": e.node, "shape": list(e.shape),
                "layout": e.layout, "channels": e.channels, "reduction": e.reduction,
                "cuts": len(self.cuts), "tap": self.tap}


@dataclass(frozen=True)
class Boundary:
    """The end of a block: a cut, and how it was chosen."""

    cut: Cut
    rule: str  # "stage end", "depth split k/m", "explicit"


@dataclass(frozen=True)
class FeatureFormat:
    layout: str  # NCHW | NHWC | tokens
    channels: int
    hw: tuple[int, int]
    prefix: int = 0  # class/register tokens in front of the patch tokens

    @classmethod
    def of(cls, cut: Cut, input_hw: tuple[int, int]) -> FeatureFormat:
        if cut.layout == "NCHW":
            return cls("NCHW", cut.shape[0], (cut.shape[1], cut.shape[2]))
        if cut.layout == "NHWC":
            return cls("NHWC", cut.shape[2], (cut.shape[0], cut.shape[1]))
        if cut.layout == "tokens":
            r = cut.reduction
            return cls("tokens", cut.shape[1], (input_hw[0] // r, input_hw[1] // r), cut.prefix_tokens)
        raise ValueError(f"cut '{cut.label}' has layout {cut.layout}; only maps and tokens convert")

    @property
    def shape(self) -> tuple[int, ...]:
        h, w = self.hw
        return {"NCHW": (self.channels, h, w), "NHWC": (h, w, self.channels),
                "tokens": (self.prefix + h * w, self.channels)}[self.layout]


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
    # (lift, lower) parameters of a format or cap pair, counted by the pair pass (``pair._counted``)
    module_params: tuple[int, int] = (0, 0)

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
        return self.module_params[0]

    @property
    def lower_params(self) -> int:
        if self.foldable:
            return self._map_params(self.teacher_channels, self.student_channels)
        return self.module_params[1]

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
class ProjectionSpec:
    """The frozen projection of the teacher's feature at the end of block ``index`` into the
    student's format (``decompose.adapters: projected``): to a map, resampled to the student's
    grid, ``Cs`` principal components of the teacher's channels (a PCA fitted on training
    batches before decomposition), then the student's layout. ``split``: the student's block
    ends in a ReLU, so each of ``Cs/2`` components is carried as its positive and negative
    part (both non-negative, which a ReLU output can match exactly). A token student's prefix
    tokens are the teacher's (projected alike) where it has as many, else the projection of the
    teacher's map pooled over the grid."""

    index: int
    student_format: FeatureFormat
    teacher_format: FeatureFormat
    split: bool = False

    @property
    def components(self) -> int:
        """Principal components kept: Cs, or Cs/2 carried as sign-split pairs (at most Ct)."""
        cs = self.student_format.channels
        return min(cs // 2 if self.split else cs, self.teacher_format.channels)

    def describe(self) -> str:
        """``pca 256→64`` or ``pca± 256→32×2`` (the plan's adapter column)."""
        t, s = self.teacher_format, self.student_format
        body = f"{t.channels}→{self.components}×2" if self.split else f"{t.channels}→{self.components}"
        move = "" if (t.layout, t.hw) == (s.layout, s.hw) else f", {t.layout} {list(t.hw)}→{s.layout} {list(s.hw)}"
        prefix = "" if not s.prefix else (", prefix tokens: the teacher's" if t.prefix == s.prefix
                                          else ", prefix tokens: the pooled map")
        return f"pca{'±' if self.split else ''} {body}{move}{prefix}"

    def to_dict(self) -> dict:
        return {"kind": "pca", "split": self.split, "components": self.components,
                "student_format": [self.student_format.layout, list(self.student_format.shape)],
                "teacher_format": [self.teacher_format.layout, list(self.teacher_format.shape)]}


@dataclass(frozen=True)
class ProjectionFit:
    """The plan's projection fit, a stage before decomposition: the PCA of the teacher's
    features at ``blocks`` over ``batches`` training batches, frozen afterwards."""

    blocks: tuple[int, ...]
    batches: int

    def to_dict(self) -> dict:
        return {"method": "pca", "blocks": list(self.blocks), "batches": self.batches}


@dataclass(frozen=True)
class BlockPair:
    """Block ``index`` (1-based): where it ends in each model. The head ends at the output."""

    index: int
    teacher: Cut | None  # None: the head (ends at the logits) or no teacher
    student: Cut | None
    adapter: AdapterSpec | TupleAdapterSpec | None
    rule: str  # how the boundary was chosen ("stage end", "depth split 2/4", "explicit", "head")
    projection: ProjectionSpec | None = None  # decompose.adapters: projected, in place of an adapter

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
            **({"projection": self.projection.to_dict()} if self.projection else {}),
            **({"teacher_tensors": list(self.teacher.nodes) if self.teacher else None,
                "student_tensors": list(self.student.nodes)} if self.multi else {}),
        }

    @property
    def multi(self) -> bool:
        """The block ends at a multi-tensor cut."""
        return bool(self.student is not None and self.student.multi)


@dataclass(frozen=True)
class ExplicitPair:
    """A layer pair named in the spec (``loss.pairs[index - 1]``): a feature loss between the
    student's output of one module and the teacher's of another, both single-tensor cuts, on
    top of the block losses. Each is read inside its model's block (``student_block``,
    ``teacher_block``) by a tap (``kdgraph.compiler.split``), where the cut is not the block's
    end; ``adapter`` lifts the student's feature to the teacher's (its lift only)."""

    index: int  # 1-based
    student: Cut
    teacher: Cut
    student_block: int
    teacher_block: int
    adapter: AdapterSpec | None
    loss: str  # a feature entry of kdgraph.losses.LOSSES
    weight: float

    @property
    def name(self) -> str:
        """The suffix of its graph nodes and terms: ``p1`` (``xs_p1``, ``mse_p1``)."""
        return f"p{self.index}"

    def to_dict(self) -> dict:
        return {"index": self.index, "student": self.student.label, "teacher": self.teacher.label,
                "student_node": self.student.node, "teacher_node": self.teacher.node,
                "student_block": self.student_block, "teacher_block": self.teacher_block,
                "adapter": self.adapter.to_dict() if self.adapter else None, "loss": self.loss,
                "weight": self.weight, "rule": "explicit"}


@dataclass(frozen=True)
class Pairing:
    blocks: tuple[BlockPair, ...]
    pairs: tuple[ExplicitPair, ...] = ()  # the spec's explicit layer pairs (loss.pairs)
    adapters_mode: str = "in_path"  # decompose.adapters as resolved: "in_path" or "projected"
    # Why a spec asking for projected blocks got adapters in the path instead ("" otherwise).
    fallback: str = ""

    @property
    def projections(self) -> list[ProjectionSpec]:
        return [b.projection for b in self.blocks if b.projection]

    @property
    def k(self) -> int:
        return len(self.blocks)

    @property
    def adapters(self) -> list[AdapterSpec | TupleAdapterSpec]:
        return [b.adapter for b in self.blocks if b.adapter]


@dataclass(frozen=True)
class Op:
    """Compute graph node ``node`` (of ``kind``) from the values of ``inputs``, in that order.

    kinds: ``teacher`` (frozen teacher block, no autograd), ``cache`` (the teacher's logits of
    this batch's views replayed from a teacher cache, in place of the teacher's head block),
    ``student`` (student block),
    ``project`` (the frozen projection of teacher block ``block``'s feature into the student's
    format: ``decompose.adapters: projected``),
    ``whole`` (the student's own forward on the input, in place of blocks 1..``block`` run in
    order where nothing else reads their inner outputs: ``compiler.program.whole_student``),
    ``lift`` / ``lower`` (the adapter pair after block ``block``), ``folded`` (that pair folded
    into one map, in an exported student), ``proxy`` (teacher block ``block`` on a student
    feature, with autograd: TPP), ``tap`` (an explicit layer pair's feature inside block
    ``block``, kept while that block ran), ``pair_lift`` (that pair's lift), ``loss`` (adds
    ``terms``; ``loss`` says where it sits:
    feature, head or tpp; ``entry`` names the ``kdgraph.losses.LOSSES`` entry that computes
    it and ``params`` that entry's constructor arguments, resolved from the spec by the
    compiler)."""

    node: str
    kind: str
    inputs: tuple[str, ...]
    block: int | None = None
    loss: str = ""
    terms: tuple[str, ...] = ()
    entry: str = ""
    params: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict:
        d = {"node": self.node, "kind": self.kind, "inputs": list(self.inputs), "block": self.block}
        if self.kind == "loss":
            d.update(loss=self.loss, terms=list(self.terms), entry=self.entry, params=dict(self.params))
        return d


@dataclass(frozen=True)
class Program:
    """Operations in execution order, and the edges of the block graph they realise: a
    training stage's (its loss terms), or the student's inference path (``output``: the node
    whose value is the student's output)."""

    ops: tuple[Op, ...]
    edges: tuple[tuple[str, str], ...]
    output: str = ""

    @property
    def adapter_blocks(self) -> tuple[int, ...]:
        """The blocks whose adapter pair the program runs (lift, then lower)."""
        return tuple(op.block for op in self.ops if op.kind == "lift")

    def folded(self) -> Program:
        """An inference program with each lift -> lower pair replaced by one ``folded`` op
        (what an exported student runs: ``adapters.fold``)."""
        lifts = {op.node: op for op in self.ops if op.kind == "lift"}
        renamed: dict[str, str] = {}
        ops = []
        for op in self.ops:
            inputs = tuple(renamed.get(n, n) for n in op.inputs)
            if op.kind == "lower" and op.inputs[0] in lifts:
                renamed[op.node] = f"folded{op.block}"
                ops.append(Op(f"folded{op.block}", "folded", lifts[op.inputs[0]].inputs, op.block))
            elif op.kind != "lift":
                ops.append(replace(op, inputs=inputs))
        return replace(self, ops=tuple(ops), edges=(), output=renamed.get(self.output, self.output))

    @property
    def terms(self) -> tuple[str, ...]:
        """Every loss term the stage computes, in the order it computes them."""
        return tuple(t for op in self.ops if op.kind == "loss" for t in op.terms)

    @property
    def teacher_reads(self) -> tuple[int, ...]:
        """The teacher blocks whose outputs the rest of the program reads (the teacher runs
        up to the last of them)."""
        teacher = {op.node: op.block for op in self.ops if op.kind == "teacher"}
        return tuple(sorted({teacher[n] for op in self.ops if op.kind != "teacher" for n in op.inputs
                             if n in teacher}))

    @property
    def replayable(self) -> bool:
        """The teacher's logits are the only teacher output the program reads, by the head loss
        alone (no feature, no TPP proxy): a teacher cache can stand in for the teacher."""
        teacher = {op.node: op.block for op in self.ops if op.kind == "teacher"}
        if not teacher or any(op.kind == "proxy" for op in self.ops):
            return False
        k = max(teacher.values())
        reads = [(n, op) for op in self.ops if op.kind != "teacher" for n in op.inputs if n in teacher]
        return all(teacher[n] == k and op.kind == "loss" and op.loss == "head" for n, op in reads)

    @property
    def reads_cache(self) -> bool:
        return any(op.kind == "cache" for op in self.ops)

    def terms_of(self, group: tuple[int, ...]) -> tuple[str, ...]:
        """The loss terms of the loss nodes that the blocks of ``group`` reach."""
        return tuple(t for op in self.ops if op.kind == "loss" and op.block in group for t in op.terms)

    def to_dict(self) -> dict:
        d = {"ops": [op.to_dict() for op in self.ops], "edges": [list(e) for e in self.edges]}
        return {**d, "output": self.output} if self.output else d


@dataclass(frozen=True)
class TrainingStage:
    index: int
    epochs: int
    groups: Groups
    program: Program | None = None  # what the runtime executes: set by the compiler's plan pass
    # The student as evaluated, recalibrated and exported during this stage (plan pass).
    inference: Program | None = None

    @property
    def losses(self) -> tuple[tuple[str, ...], ...]:
        """Per group: the loss terms it is trained with (from its program's loss nodes)."""
        if self.program is None:
            return tuple(() for _ in self.groups)
        return tuple(self.program.terms_of(group) for group in self.groups)

    def to_dict(self) -> dict:
        return {"index": self.index, "epochs": self.epochs, "groups": [list(g) for g in self.groups],
                "losses": [list(terms) for terms in self.losses],
                "program": self.program.to_dict() if self.program is not None else None,
                "inference": self.inference.to_dict() if self.inference is not None else None}


@dataclass(frozen=True)
class Plan:
    method: str
    k: int  # blocks in the block graph
    n: int  # recompositions
    stages: tuple[TrainingStage, ...]
    tpp_block: int | None = None  # ScaleKD's proxy path leaves the student at this block end
    # KD + MSE: an MSE at every inner block end of the one end-to-end group (the method's
    # ``Method.feature_losses``, read from its registry entry by ``build_plan``).
    feature_losses: bool = False
    projection_fit: ProjectionFit | None = None  # the projection fit before stage 0 (projected blocks)
    # The frozen teacher's weights and computation: their dtype (teacher.dtype; its outputs
    # reach the losses as float32), and whether FSDP2 shards them over torchrun's ranks.
    teacher_dtype: str = "float32"
    teacher_shard: bool = False

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    @property
    def uses_adapters(self) -> bool:
        """Adapters are trained (and kept at inference) only where features are compared."""
        return self.feature_losses or self.tpp_block is not None or any(len(s.groups) > 1 for s in self.stages)

    @property
    def chains_adapters(self) -> bool:
        """A group's blocks are chained through lower(lift(.)) where adapters exist (StableKD,
        TPP); KD + MSE uses lift for its losses only and chains the blocks directly."""
        return self.uses_adapters and not self.feature_losses

    @property
    def cache_stages(self) -> tuple[int, ...]:
        """The stages whose programs replay the teacher's logits from a cache."""
        return tuple(st.index for st in self.stages if st.program is not None and st.program.reads_cache)

    @property
    def live_teacher(self) -> bool:
        """Some stage runs the teacher itself (its blocks, or TPP's proxy path through them)."""
        return any(op.kind in ("teacher", "proxy") for st in self.stages if st.program is not None
                   for op in st.program.ops)

    def stage_epochs(self, index: int) -> range:
        """The epochs (0-based) stage ``index`` trains."""
        start = sum(st.epochs for st in self.stages[:index])
        return range(start, start + self.stages[index].epochs)

    def with_programs(self, programs: list[Program], inference: list[Program]) -> Plan:
        return replace(self, stages=tuple(replace(st, program=p, inference=i)
                                          for st, p, i in zip(self.stages, programs, inference)))

    def to_dict(self) -> dict:
        d = {"method": self.method, "k": self.k, "n": self.n, "epochs": self.epochs,
             "tpp_block": self.tpp_block, "stages": [s.to_dict() for s in self.stages],
             **({"cache_stages": list(self.cache_stages)} if self.cache_stages else {}),
             **({"teacher_dtype": self.teacher_dtype, "teacher_shard": self.teacher_shard}
                if (self.teacher_dtype, self.teacher_shard) != ("float32", False) else {})}
        return {**d, "projection_fit": self.projection_fit.to_dict()} if self.projection_fit else d


@dataclass(frozen=True)
class DataPlan:
    """How a spec's data will be read, decided without decoding any image.

    ``mean``/``std`` are per channel in 0..1 pixel units, or None where the training
    split's statistics are used (known once it is read); ``stats`` says which. The data is
    normalised with them, which is what the student sees; ``teacher_mean``/``teacher_std``,
    where set, are the teacher's own normalisation (its pretrained_cfg differs from the
    student's), into which the teacher's input is renormalised."""

    dataset: str
    loader: str  # "memory" or "stream"
    reason: str
    input_size: tuple[int, int, int]
    train_images: int | None = None  # image folders only
    test_images: int | None = None
    decoded_mb: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None  # streamed evaluation only
    stats: str = "the training split's statistics"
    num_classes: int | None = None  # image folders: their class folders
    teacher_mean: tuple[float, ...] | None = None
    teacher_std: tuple[float, ...] | None = None

    def __str__(self) -> str:
        norm = f"mean {_fmt(self.mean)} std {_fmt(self.std)} from {self.stats}" if self.mean else \
            f"normalised with {self.stats}"
        if self.teacher_mean is not None:
            norm = f"student: {norm}; teacher renormalised to its own mean {_fmt(self.teacher_mean)} std " \
                   f"{_fmt(self.teacher_std)} (its pretrained_cfg)"
        crop = f", eval crop_pct {self.crop_pct}" if self.loader == "stream" else ""
        return f"{self.loader} ({self.reason}); {norm}{crop}"

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "loader": self.loader, "reason": self.reason,
                "input_size": list(self.input_size), "train_images": self.train_images,
                "test_images": self.test_images, "decoded_mb": self.decoded_mb,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "crop_pct": self.crop_pct, "stats": self.stats,
                "teacher_mean": list(self.teacher_mean) if self.teacher_mean else None,
                "teacher_std": list(self.teacher_std) if self.teacher_std else None}


def _fmt(values: tuple[float, ...] | None) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]" if values else "-"


def graph_json(g: nx.DiGraph) -> dict:
    """The block graph's JSON form (networkx node-link data), as `kdgraph plan --format json`
    and ``blockgraph.dumps`` write it."""
    return nx.node_link_data(g, edges="edges")
