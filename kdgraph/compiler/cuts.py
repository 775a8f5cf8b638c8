"""Pass 4: find the cuts of a traced model.

A cut is a node after which exactly one input-dependent value is live: everything later
depends on the input only through that node, so the network splits there into a prefix
and a suffix and the suffix can be fed any tensor of the cut's shape. Values computed only
from parameters, buffers and constants (``get_attr``, constant arithmetic) are not
input-dependent and do not count; sizes read from an input-dependent tensor
(``x.shape``) do, because a suffix fed another tensor could not recompute them. Values of a
denoiser's side inputs alone (its time embedding) do not count either: every block receives
them (``split.split_side``).

Non-sequential networks (a U-Net's encoder features cross to the decoder over long skips)
have no single-tensor cut at their deeper resolutions. Where the deepest feature-map
resolution of a model has no single-tensor cut, the sweep also records **multi-tensor
cuts**: positions after which between 2 and ``MAX_CUT_TENSORS`` input-dependent values are
live, every one a feature map, the node itself among them. Such a cut lists its tensors in
``Cut.tensors`` (graph order; the last is the cut's own node, whose shape, layout, width and
reduction the cut reports); a suffix is fed every one of them. Sequential models never get
one, so their cuts are exactly the single-tensor ones.

``MAX_CUT_TENSORS`` is 32. Nothing downstream depends on the count (splitting, pairing,
adapters and feature losses all work per tensor, by position), so the bound only keeps
positions whose live set is a tangle of many small values from counting as cuts. A
diffusers ``UNet2DModel`` keeps its input conv's output, every resnet's and every
downsampler's live until the decoder reads them: 12 skips at its default four levels of two
resnets, 18 at the six levels of the DDPM CelebA-HQ and LSUN configs, and at its middle one
or two more (the middle block's own tensors). 32 holds six levels of three resnets (24 skips).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from kdgraph.ir import Cut

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Models, TracedModel



MAX_CUT_TENSORS = 32  # the most tensors a multi-tensor cut may carry: see the module docstring


def _pow2(r: int) -> bool:
    return r > 0 and r & (r - 1) == 0


def _reduction(size: tuple[int, int], h: int, w: int) -> int | None:
    """The exact reduction of an h×w grid of an H×W input (None when it does not tile it).

    Where that is not a power of two but a power-of-two stride with padding gives the same
    grid (4x4 of 224 is 224/56 exactly, and 224/64 rounded up), the stride is meant: 64.
    """
    H, W = size
    if h <= 0 or w <= 0 or H % h or W % w or H // h != W // w:
        return None
    r = H // h
    if not _pow2(r):
        padded = [p for p in (2 ** k for k in range(1, max(H, W).bit_length() + 1))
                  if -(-H // p) == h and -(-W // p) == w]
        if padded:
            return padded[0]
    return r


def _nominal_reduction(size: tuple[int, int], h: int, w: int) -> int | None:
    """The stride product (a power of two) of a grid that does not tile the input exactly.

    Unpadded convolutions and ceil-mode pools leave grids near, not at, H/r (AlexNet's 55 of
    224 at stride 4, SqueezeNet's 109 at stride 2, Inception's 147, 35 and 8 of 299): the
    grid is taken as reduction r when both sides are within 1.5 cells, or 10 %, of H/r and
    W/r (and square when the input is). timm's feature_info gives such maps the same
    nominal reduction.
    """
    H, W = size
    if h <= 0 or w <= 0 or (H == W and h != w):  # a square input keeps square maps
        return None
    best = None
    r = 1
    while r <= max(H, W):
        eh, ew = H / r, W / r
        if all(abs(got - want) <= max(1.5, 0.1 * want) for got, want in ((h, eh), (w, ew))):
            err = abs(math.log(eh / h)) + abs(math.log(ew / w))
            if best is None or err < best[0]:
                best = (err, r)
        r *= 2
    return best[1] if best else None


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
        for reduction in (_reduction, _nominal_reduction):  # exact grids first, in either layout
            r = reduction(input_hw, shape[1], shape[2])
            if r is not None:
                return "NCHW", shape[0], r, 0
            r = reduction(input_hw, shape[0], shape[1])
            if r is not None:
                return "NHWC", shape[2], r, 0
    return "other", None, None, 0


_POOL_FUNCTIONS = {"mean", "amax", "max", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d",
                   "max_pool2d", "sum"}


_FIXED_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _spatial(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    return tuple(shape[1:3]) if layout == "NCHW" else tuple(shape[0:2])


def _is_global_pool(traced: TracedModel, node) -> bool:
    """A node that pools a map to 1x1: a pooling module or a mean/max over the spatial axes.

    A pool of fixed kernel (VGG's last ``MaxPool2d(2)`` of a 2x2 map at a small input) is
    not global: its 1x1 output is a feature map of the next reduction, as timm's
    feature_info says.
    """
    if node.op == "call_module":
        module = traced.model.get_submodule(node.target)
        if isinstance(module, _FIXED_POOLS):
            return False
        return "pool" in type(module).__name__.lower()
    target = getattr(node.target, "__name__", node.target)
    if target in ("max_pool2d", "avg_pool2d"):
        kernel = node.kwargs.get("kernel_size", node.args[1] if len(node.args) > 1 else None)
        return not isinstance(kernel, (int, tuple))  # a kernel read from the map's size is global
    return isinstance(target, str) and target in _POOL_FUNCTIONS


def _is_sequence(traced: TracedModel, path: str) -> bool:
    module = traced.model.get_submodule(path)
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _map_reduction(shape, input_hw: tuple[int, int]) -> int | None:
    """The reduction of a batched shape that is a feature map (NCHW or NHWC) larger than 1x1
    (a squeeze-excitation's pooled 1x1 is no resolution of the network), else None."""
    if shape is None or len(shape) != 4:
        return None
    layout, _, reduction, _ = infer_layout(tuple(shape[1:]), input_hw)
    if layout not in ("NCHW", "NHWC") or _spatial(tuple(shape[1:]), layout) == (1, 1):
        return None
    return reduction


def needs_multi_tensor_cuts(traced: TracedModel, cuts: list[Cut]) -> bool:
    """True when the model's deepest feature-map resolution has no single-tensor cut (a U-Net:
    its encoder features stay live over long skips while the bottleneck runs)."""
    input_hw = traced.input_size[1:]
    deepest = max((r for n in traced.gm.graph.nodes if traced.nodes[n.name].input_dependent
                   for r in [_map_reduction(traced.nodes[n.name].shape, input_hw)] if r is not None), default=None)
    covered = max((c.reduction for c in cuts if c.layout != "vector" and c.reduction is not None), default=0)
    return deepest is not None and deepest > covered


def find_cuts(traced: TracedModel, multi: bool | None = None) -> list[Cut]:
    """Every cut, in graph order, found in one sweep that tracks the live set: the
    single-tensor cuts and, where the model needs them (``needs_multi_tensor_cuts``; or
    ``multi=True``), the multi-tensor cuts too.

    After: cuts are strictly increasing in ``index``; the model output is not a cut (the
    head block ends there) and neither is the input.
    """
    if multi is None:
        single = _sweep(traced, False)
        return _sweep(traced, True) if needs_multi_tensor_cuts(traced, single) else single
    return _sweep(traced, multi)


def _positions(traced: TracedModel) -> tuple[list, dict, dict, dict[str, int]]:
    """(graph nodes in order, each one's position, the position of its last use, the position
    of the last node inside each module)."""
    nodes = list(traced.gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    last_in_module: dict[str, int] = {}
    for n in nodes:
        for path in traced.nodes[n.name].modules:
            last_in_module[path] = index[n]
    return nodes, index, last_use, last_in_module


def _sweep(traced: TracedModel, multi: bool) -> list[Cut]:
    nodes, index, last_use, last_in_module = _positions(traced)
    input_hw = traced.input_size[1:]
    live: set = set()
    expiring: dict[int, list] = {}
    cuts: list[Cut] = []
    pooled = False  # once features are pooled to a vector, later 1x1 maps are vectors too
    last_hw: tuple[int, int] | None = None  # the grid of the latest map cut
    for i, n in enumerate(nodes):
        info = traced.nodes[n.name]
        if info.input_dependent and n.users:
            live.add(n)
            expiring.setdefault(last_use[n], []).append(n)
        for dead in expiring.pop(i, ()):
            live.discard(dead)
        if n.op in ("placeholder", "output") or n not in live or info.shape is None:
            continue
        if nodes[i + 1].op == "output":
            continue  # the logits: the end of the head block, not a place to cut
        if live != {n}:
            if multi and len(live) <= MAX_CUT_TENSORS:
                members = [_member(traced, m, index[m], last_in_module, input_hw)
                           for m in sorted(live, key=index.__getitem__)]
                if all(m is not None for m in members):
                    cuts.append(replace(members[-1], tensors=tuple(members)))
            continue
        if info.dtype is not None and not info.dtype.startswith(("float", "bfloat", "half")):
            continue  # integers (token ids, positions) are no feature to compare or feed
        closes = tuple(p for p in info.modules if last_in_module[p] == i)
        # A cut inside layer3.0 leaves layer3.0 open: level 1. Sequence containers (layer3,
        # blocks, stages) do not count, so every stage of a ModuleList sits at level 0.
        level = sum(1 for p in info.modules if p not in closes and not _is_sequence(traced, p))
        layout, channels, reduction, prefix = infer_layout(info.shape[1:], input_hw)
        if layout in ("NCHW", "NHWC") and _spatial(info.shape[1:], layout) == (1, 1) \
                and input_hw != (1, 1) and (pooled or _is_global_pool(traced, n)
                                            or (last_hw is not None and max(last_hw) > 3)):
            # (C, 1, 1) after a global pool is a vector, and so is one reached from a grid
            # larger than 3x3 in one step (VGG's 7x7 conv head at 224): only a stride-2 step
            # (VGG's last max pool of a 2x2 map at 32 px, AlexNet's of 3x3 at 64) keeps a 1x1 map a map.
            layout, reduction = "vector", None
        if layout in ("NCHW", "NHWC"):
            hw = _spatial(info.shape[1:], layout)
            if last_hw is not None and hw[0] * hw[1] > last_hw[0] * last_hw[1] \
                    and _reduction(input_hw, *hw) is None:
                # A grid blown up to a fixed size (torchvision VGG's AdaptiveAvgPool2d((7, 7))
                # of a 1x1 map at 32 px) has no reduction: not a place to compare features.
                layout, reduction = "other", None
            else:
                last_hw = hw
        pooled = pooled or layout == "vector"
        cuts.append(Cut(
            node=n.name, index=i, module=closes[0] if closes else "", closes=closes,
            shape=tuple(info.shape[1:]), layout=layout, channels=channels,
            reduction=reduction, prefix_tokens=prefix, level=level,
        ))
    return cuts


def _member(traced: TracedModel, n, i: int, last_in_module: dict[str, int],
            input_hw: tuple[int, int]) -> Cut | None:
    """The record of one tensor of a multi-tensor cut: node ``n`` (at index ``i``) as a cut of
    its own; None unless it is a feature map."""
    info = traced.nodes[n.name]
    if info.shape is None or len(info.shape) != 4:
        return None
    layout, channels, reduction, _ = infer_layout(tuple(info.shape[1:]), input_hw)
    if layout not in ("NCHW", "NHWC") or reduction is None:
        return None
    closes = tuple(p for p in info.modules if last_in_module[p] == i)
    level = sum(1 for p in info.modules if p not in closes and not _is_sequence(traced, p))
    return Cut(node=n.name, index=i, module=closes[0] if closes else "", closes=closes,
               shape=tuple(info.shape[1:]), layout=layout, channels=channels, reduction=reduction, level=level)


def find_cut_by_module(cuts: list[Cut], path: str) -> Cut | None:
    """The cut that closes module ``path`` (or whose node is named ``path``)."""
    for cut in cuts:
        if path in cut.closes or cut.node == path:
            return cut
    return None


def cuts_pass(models: Models) -> Models:
    """Pass 4: every cut of each model (multi-tensor ones where the model needs them)."""
    return models.map(lambda art: replace(art, cuts=tuple(find_cuts(art.traced))))
