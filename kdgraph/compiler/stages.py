"""Pass 5: group cuts into stages, each of one feature shape.

A stage is a run of consecutive cuts with one feature shape: the same reduction and
width. Its end is the cut that closes the shallowest module, preferring containers
(``layer2`` over ``act1``, ``blocks`` over ``norm``) and then the latest such cut.
Blocks are then chosen from the stage ends (``boundaries``, pass 6).

Where the model names its own feature taps (timm's ``feature_info``: module, width,
reduction), a stage whose cuts include a tap ends there: the rule above and timm's
conventions differ in a few families (resnet18d's deep stem, dpn, nfnet, ghostnet), and a
tap is where a user of that model expects the feature. Where the rule's end carries the
very same tensor as the tap (an ``nn.Identity`` after it), the rule's end stays and the
stage says so. ``Stage.tap`` records either, and the block's rule column shows it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from kdgraph.ir import Cut, Stage

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import Models, TracedModel



def _stage_key(cut: Cut) -> tuple:
    # The shape too: a nominal reduction (cuts._nominal_reduction) spans grids of a few sizes.
    # and the tensors a multi-tensor cut carries: a U-Net's decoder at 14x14 (enc1 + dec2 live)
    # is not its encoder at 14x14.
    return (cut.layout == "vector", cut.reduction, cut.channels, cut.shape if cut.layout != "vector" else None,
            tuple(m.shape for m in cut.tensors))


def preferred(cuts: list[Cut], traced: TracedModel) -> Cut:
    """The cut at the lowest nesting level; those closing containers first; the latest of those."""
    lowest = min(c.level for c in cuts)
    candidates = [c for c in cuts if c.level == lowest]
    containers = [c for c in candidates if c.module and traced.is_container(c.module)]
    return (containers or candidates)[-1]


def feature_taps(traced: TracedModel) -> dict[str, int | None]:
    """{module: width} of the feature taps the model declares (timm's ``feature_info``)."""
    info = getattr(traced.model, "feature_info", None)
    taps = {}
    for entry in info if isinstance(info, (list, tuple)) else ():
        try:
            module, width = entry["module"], entry.get("num_chs")
        except (TypeError, KeyError, AttributeError):
            continue
        if isinstance(module, str) and module:
            taps[module] = width
    return taps


def tapped(cut: Cut, taps: dict[str, int | None]) -> str | None:
    """The declared tap ``cut`` closes with the declared width (the innermost of several)."""
    hits = [m for m in cut.closes if m in taps and taps[m] in (None, cut.channels)]
    return hits[-1] if hits else None


def _end(group: list[Cut], traced: TracedModel, taps: dict[str, int | None]) -> tuple[Cut, str]:
    """The stage's end and its ``tap`` note (see Stage)."""
    end = preferred(group, traced)
    hits = [c for c in group if tapped(c, taps)]
    if not hits or end is hits[-1] or end.layout == "vector":
        return end, ""
    tap = hits[-1]
    name = tapped(tap, taps)
    if same_value(traced, end, tap):
        return end, f"same tensor as feature_info tap {name}"
    return tap, f"feature_info tap {name}"


def find_stages(cuts: list[Cut], traced: TracedModel) -> list[Stage]:
    """Stages in graph order. Cuts of an unknown layout start no stage and join none."""
    groups: list[list[Cut]] = []
    for cut in cuts:
        if cut.layout == "other":
            continue
        if groups and _stage_key(groups[-1][-1]) == _stage_key(cut):
            groups[-1].append(cut)
        else:
            groups.append([cut])
    taps = feature_taps(traced)
    return [Stage(i, tuple(g), *_end(g, traced, taps)) for i, g in enumerate(groups)]


def _identity(traced: TracedModel, node) -> bool:
    """A node whose output is its input, in both modes: nn.Identity, a rate-0 dropout or drop
    path, ``contiguous``."""
    if node.op == "call_method":
        return node.target == "contiguous"
    if node.op != "call_module":
        return False
    module = traced.gm.get_submodule(node.target)
    if isinstance(module, nn.Identity):
        return True
    rate = getattr(module, "p", getattr(module, "drop_prob", None))
    return "drop" in type(module).__name__.lower() and rate == 0


def same_value(traced: TracedModel, a: Cut, b: Cut) -> bool:
    """True when cuts ``a`` and ``b`` carry the same tensor: the later is the earlier passed
    through identities only (repvgg's ``final_conv = nn.Identity()`` after ``stages``)."""
    if a.index > b.index:
        a, b = b, a
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    node = nodes[b.node]
    while node.name != a.node:
        inputs = [x for x in node.all_input_nodes if traced.nodes[x.name].input_dependent]
        if len(inputs) != 1 or not _identity(traced, node):
            return False
        node = inputs[0]
    return True


def stages_pass(models: Models) -> Models:
    """Pass 5: cuts grouped into stages of one feature shape."""
    return models.map(lambda art: replace(art, stages=tuple(find_stages(list(art.cuts), art.traced))))
