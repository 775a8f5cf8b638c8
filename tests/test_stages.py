"""Stages (``compiler.stages``): cuts grouped by feature shape, each stage's end by the rule
(lowest level, containers, latest) or moved to a declared feature tap; the truth is written out
by hand for small models and for Cut records built directly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.stages import feature_taps, find_stages, preferred, same_value, tapped
from kdgraph.compiler.trace import trace
from kdgraph.ir import Cut


def _pyramid():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 2))


def test_stages_group_consecutive_cuts_of_one_shape():
    traced = trace(_pyramid().eval(), (3, 8, 8))
    stages = find_stages(find_cuts(traced), traced)
    assert [[c.module for c in s.cuts] for s in stages] == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert [s.end.module for s in stages] == ["1", "3", "5", "7"]  # the later cut of equals
    assert [(s.reduction, s.channels) for s in stages] == [(1, 4), (2, 8), (4, 16), (None, 16)]
    assert [s.index for s in stages] == [0, 1, 2, 3] and all(s.tap == "" for s in stages)


def _record(node, index, shape=(8, 4, 4), layout="NCHW", level=0, module=None, reduction=2):
    module = node if module is None else module
    return Cut(node, index, module, (module,) if module else (), shape, layout, shape[0], reduction, level=level)


FAKE = SimpleNamespace(model=nn.Module(), is_container=lambda path: path.startswith("layer"))


def test_other_layouts_start_no_stage_and_join_none():
    a, b = _record("a", 1), _record("b", 3)
    odd = _record("odd", 2, (3, 5, 7), "other", reduction=None)
    wider = _record("c", 4, (16, 4, 4))
    stages = find_stages([a, odd, b, wider], FAKE)
    assert [s.cuts for s in stages] == [(a, b), (wider,)]  # the odd cut between a and b splits nothing


def test_the_preferred_end_is_the_lowest_level_then_a_container_then_the_latest():
    inner = _record("inner", 1, level=1)
    layer = _record("layer1", 2)
    act = _record("act", 3)
    assert preferred([inner, layer, act], FAKE) is layer  # the container wins over a later leaf
    assert preferred([inner, act], FAKE) is act
    assert preferred([inner], FAKE) is inner
    assert preferred([_record("x", 1), _record("y", 2)], FAKE).node == "y"


class _Tapped(nn.Module):
    """stem, a container of two convs, an identity, the head: one stage at full resolution."""

    def __init__(self, drop: float | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
        self.ident = nn.Identity() if drop is None else nn.Dropout(drop)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.ident(self.layer(self.stem(x)))).flatten(1))


def _first_stage(info, drop=None):
    model = _Tapped(drop)
    if info is not None:
        model.feature_info = info
    traced = trace(model, (3, 8, 8))
    return find_stages(find_cuts(traced), traced)[0], traced


@pytest.mark.parametrize("info,end,tap", [
    (None, "layer", ""),
    ([{"module": "stem", "num_chs": 4}], "stem", "feature_info tap stem"),  # the tap moves the end
    ([{"module": "stem", "num_chs": 5}], "layer", ""),  # a tap of another width is none of this stage's
    ([{"module": "ident", "num_chs": 4}], "layer", "same tensor as feature_info tap ident"),
    ([{"module": "layer", "num_chs": 4}], "layer", ""),  # the rule already ends there
])
def test_a_declared_feature_tap_moves_or_confirms_the_end(info, end, tap):
    stage, _ = _first_stage(info)
    assert [c.module for c in stage.cuts] == ["stem", "layer.0", "layer", "ident"]
    assert (stage.end.module, stage.tap) == (end, tap)
    assert stage.rule == (f"stage end ({tap})" if tap else "stage end")


def test_same_value_follows_identities_only():
    stage, traced = _first_stage(None)
    cut = {c.module: c for c in stage.cuts}
    assert same_value(traced, cut["layer"], cut["ident"]) and same_value(traced, cut["ident"], cut["layer"])
    assert not same_value(traced, cut["stem"], cut["layer"])
    for rate, same in ((0.0, True), (0.2, False)):  # a dropout that drops is no identity in training
        stage, traced = _first_stage(None, drop=rate)
        cut = {c.module: c for c in stage.cuts}
        assert same_value(traced, cut["layer"], cut["ident"]) is same


def test_feature_taps_read_timm_feature_info_and_skip_malformed_entries():
    model = nn.Module()
    model.feature_info = [{"module": "a", "num_chs": 8}, {"module": "b"}, {"num_chs": 3}, "junk",
                          {"module": "", "num_chs": 2}, {"module": 7, "num_chs": 2}]
    assert feature_taps(SimpleNamespace(model=model)) == {"a": 8, "b": None}
    assert feature_taps(SimpleNamespace(model=nn.Module())) == {}
    cut = Cut("n", 1, "a", ("a", "a.b"), (8, 4, 4), "NCHW", 8, 2)
    assert tapped(cut, {"a": 8, "a.b": None}) == "a.b"  # the innermost of several
    assert tapped(cut, {"a": 8, "a.b": 16}) == "a" and tapped(cut, {"a": 16}) is None
