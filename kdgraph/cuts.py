"""Pass 2: find the cuts of a traced model.

A cut is a node after which exactly one input-dependent value is live: everything later
depends on the input only through that node, so the network splits there into a prefix
and a suffix and the suffix can be fed any tensor of the cut's shape. Values computed only
from parameters, buffers and constants (``get_attr``, constant arithmetic) are not
input-dependent and do not count; sizes read from an input-dependent tensor
(``x.shape``) do, because a suffix fed another tensor could not recompute them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from .trace import TracedModel

LAYOUTS = ("NCHW", "NHWC", "tokens", "vector", "other")


@dataclass(frozen=True)
class Cut:
    """A single-tensor cut point. ``shape`` excludes the batch dimension."""

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

    @property
    def label(self) -> str:
        return self.module or self.node

    def to_dict(self) -> dict:
        d = asdict(self)
        d["closes"] = list(self.closes)
        d["shape"] = list(self.shape)
        return d


def _reduction(size: tuple[int, int], h: int, w: int) -> int | None:
    H, W = size
    if h <= 0 or w <= 0 or H % h or W % w or H // h != W // w:
        return None
    return H // h


def _token_reduction(size: tuple[int, int], n: int) -> tuple[int, int] | None:
    """(reduction, prefix tokens) for n tokens covering an H×W input, allowing up to 8 prefix tokens."""
    H, W = size
    for prefix in range(0, 9):
        patches = n - prefix
        if patches <= 0 or (H * W) % patches:
            continue
        r = math.isqrt(H * W // patches)
        if r * r * patches == H * W and H % r == 0 and W % r == 0:
            return r, prefix
    return None


def infer_layout(shape: tuple[int, ...], input_hw: tuple[int, int]) -> tuple[str, int | None, int | None, int]:
    """(layout, channels, reduction, prefix tokens) of a per-sample feature shape.

    A 3-D feature is NCHW when its last two dims tile the input evenly, NHWC when its first
    two do; when both fit (an 8×8×8 map of an 8×8 input) NCHW is assumed.
    """
    if len(shape) == 1:
        return "vector", shape[0], None, 0
    if len(shape) == 2:
        found = _token_reduction(input_hw, shape[0])
        if found:
            return "tokens", shape[1], found[0], found[1]
        return "other", shape[-1], None, 0
    if len(shape) == 3:
        r = _reduction(input_hw, shape[1], shape[2])
        if r is not None:
            return "NCHW", shape[0], r, 0
        r = _reduction(input_hw, shape[0], shape[1])
        if r is not None:
            return "NHWC", shape[2], r, 0
    return "other", None, None, 0


_POOL_FUNCTIONS = {"mean", "amax", "max", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d",
                   "max_pool2d", "sum"}


def _spatial(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    return tuple(shape[1:3]) if layout == "NCHW" else tuple(shape[0:2])


def _is_global_pool(traced: TracedModel, node) -> bool:
    """A node that pools a map to 1x1: a pooling module or a mean/max over the spatial axes."""
    if node.op == "call_module":
        return "pool" in type(traced.model.get_submodule(node.target)).__name__.lower()
    target = getattr(node.target, "__name__", node.target)
    return isinstance(target, str) and target in _POOL_FUNCTIONS


def _is_sequence(traced: TracedModel, path: str) -> bool:
    module = traced.model.get_submodule(path)
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def find_cuts(traced: TracedModel) -> list[Cut]:
    """Every single-tensor cut, in graph order, found in one sweep that tracks the live set.

    After: cuts are strictly increasing in ``index``; the model output is not a cut (the
    head block ends there) and neither is the input.
    """
    nodes = list(traced.gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    last_in_module: dict[str, int] = {}
    for n in nodes:
        for path in traced.nodes[n.name].modules:
            last_in_module[path] = index[n]

    input_hw = traced.input_size[1:]
    live: set = set()
    expiring: dict[int, list] = {}
    cuts: list[Cut] = []
    pooled = False  # once features are pooled to a vector, later 1x1 maps are vectors too
    for i, n in enumerate(nodes):
        info = traced.nodes[n.name]
        if info.input_dependent and n.users:
            live.add(n)
            expiring.setdefault(last_use[n], []).append(n)
        for dead in expiring.pop(i, ()):
            live.discard(dead)
        if n.op in ("placeholder", "output") or live != {n} or info.shape is None:
            continue
        if nodes[i + 1].op == "output":
            continue  # the logits: the end of the head block, not a place to cut
        closes = tuple(p for p in info.modules if last_in_module[p] == i)
        # A cut inside layer3.0 leaves layer3.0 open: level 1. Sequence containers (layer3,
        # blocks, stages) do not count, so every stage of a ModuleList sits at level 0.
        level = sum(1 for p in info.modules if p not in closes and not _is_sequence(traced, p))
        layout, channels, reduction, prefix = infer_layout(info.shape[1:], input_hw)
        if layout in ("NCHW", "NHWC") and _spatial(info.shape[1:], layout) == (1, 1) \
                and input_hw != (1, 1) and (pooled or _is_global_pool(traced, n)):
            layout, reduction = "vector", None  # (C, 1, 1) after a global pool is a vector
        pooled = pooled or layout == "vector"
        cuts.append(Cut(
            node=n.name, index=i, module=closes[0] if closes else "", closes=closes,
            shape=tuple(info.shape[1:]), layout=layout, channels=channels,
            reduction=reduction, prefix_tokens=prefix, level=level,
        ))
    return cuts


def find_cut_by_module(cuts: list[Cut], path: str) -> Cut | None:
    """The cut that closes module ``path`` (or whose node is named ``path``)."""
    for cut in cuts:
        if path in cut.closes or cut.node == path:
            return cut
    return None
