"""Block boundaries (``compiler.boundaries``): one per resolution, the shallowest dropped, the
longest stage split by depth (near-equal chunks, the larger first: 10/4 -> 3, 3, 2, 2; Minitron's
rule for decoder stacks), a U-Net cut on its way down then up, explicit cuts and their refusals.

The truth is written out by hand for each case, on models small enough to trace in a blink (a
stem, ``depth`` residual blocks of one width and a head; a two-level U-Net), and on timm ResNets."""

from __future__ import annotations

import io

import pytest
from torch import nn

from kdgraph.compiler import compile_spec
from kdgraph.compiler.artifacts import ModelArtifacts
from kdgraph.compiler.boundaries import _depth_sizes, _split, choose_boundaries, depth_ends, pairable_stages
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.stages import find_stages
from kdgraph.compiler.trace import trace
from kdgraph.errors import PlanError
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec
from test_cuts import TinyUNet  # enc -> down, mid -> up -> concat with enc -> out


@pytest.mark.parametrize("n,parts,sizes", [
    (10, 4, [3, 3, 2, 2]), (7, 3, [3, 2, 2]), (7, 4, [2, 2, 2, 1]), (11, 4, [3, 3, 3, 2]),
    (5, 2, [3, 2]), (12, 4, [3, 3, 3, 3]), (8, 4, [2, 2, 2, 2]), (4, 4, [1, 1, 1, 1]), (3, 1, [3]),
])
def test_split_puts_the_larger_chunks_first(n, parts, sizes):
    assert _split(n, parts) == sizes


@pytest.mark.parametrize("lt,ls,teacher_layers", [
    # Minitron's rule written out: student layer i <-> teacher layer round((i + 1)·Lt / Ls) − 1
    (6, 3, [1, 3, 5]), (5, 3, [1, 2, 4]), (32, 16, [2 * i + 1 for i in range(16)]), (4, 4, [0, 1, 2, 3]),
    (7, 2, [3, 6]),  # 3.5 rounds up: layer 4 - 1 = 3
    (28, 12, [1, 4, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27]),
])
def test_decoder_stacks_pair_by_minitrons_rule(lt, ls, teacher_layers):
    assert depth_ends(lt, ls) == teacher_layers
    assert depth_ends(ls, ls) == list(range(ls))  # each student layer ends its own part
    sizes = _depth_sizes(lt, ls, tokens=True)
    assert sum(sizes) == lt and [sum(sizes[:i + 1]) - 1 for i in range(ls)] == teacher_layers
    assert _depth_sizes(lt, ls, tokens=False) == _split(lt, ls)  # other models keep the larger chunks first


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


class _Isotropic(nn.Module):
    """A stem, then ``depth`` residual blocks at one resolution and width (a ViT's shape)."""

    def __init__(self, depth: int, width: int = 8, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 2, stride=2)
        self.blocks = nn.Sequential(*[_Residual(width) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


@pytest.mark.parametrize("depth,blocks,ends,sizes", [
    (10, 5, ["blocks.2", "blocks.5", "blocks.7"], "3/3/2/2"),
    (7, 4, ["blocks.2", "blocks.4"], "3/2/2"),
    (7, 5, ["blocks.1", "blocks.3", "blocks.5"], "2/2/2/1"),
    (12, 5, ["blocks.2", "blocks.5", "blocks.8"], "3/3/3/3"),  # even: the case tested before
])
def test_uneven_depth_split_cuts_and_rule_text(depth, blocks, ends, sizes):
    model = _Isotropic(depth).eval()
    traced = trace(model, (1, 8, 8))
    bounds = choose_boundaries(find_stages(find_cuts(traced), traced), blocks, traced)
    parts = blocks - 1
    assert [b.cut.module for b in bounds[:-1]] == ends
    assert f"blocks.{depth - 1}" in bounds[-1].cut.closes  # the last chunk ends with the stage
    assert [b.rule for b in bounds] == [f"depth split {j}/{parts} ({sizes})" for j in range(1, parts + 1)]


def test_the_plan_shows_the_uneven_split():
    """Through the compiler to the plan's blocks table: teacher 10 deep (3/3/2/2), student 7
    deep (2/2/2/1), each block's rule naming both splits."""
    from rich.console import Console

    from kdgraph.render import blocks_table

    spec = load_spec(tiny_spec(blocks=5, data={"dataset": "synthetic", "input_size": [1, 8, 8]}))
    c = compile_spec(spec, models=(_Isotropic(10), _Isotropic(7)))
    body = [b for b in c.pairing.blocks if not b.is_head]
    assert [(b.to_dict()["teacher"], b.to_dict()["student"]) for b in body[:3]] == [
        ("blocks.2", "blocks.1"), ("blocks.5", "blocks.3"), ("blocks.7", "blocks.5")]
    assert [b.rule for b in body] == [f"depth split {j}/4 (3/3/2/2) / depth split {j}/4 (2/2/2/1)"
                                      for j in range(1, 5)]
    console = Console(file=io.StringIO(), width=300, record=True)
    console.print(blocks_table(c))
    text = console.export_text()
    for j in range(1, 5):
        assert f"depth split {j}/4 (3/3/2/2) / depth split {j}/4 (2/2/2/1)" in text, text


def _pair(teacher: str, student: str, size: int, **extra) -> dict:
    return {
        "name": "pair",
        "teacher": {"model": f"timm:{teacher}", "kwargs": {"num_classes": 10}},
        "student": {"model": f"timm:{student}", "kwargs": {"num_classes": 10}},
        "data": {"dataset": "synthetic", "input_size": [3, size, size], "num_classes": 10},
        **extra,
    }


def _labels(bounds):
    return [b.cut.label for b in bounds]


def test_explicit_cuts_override_the_automatic_choice():
    raw = _pair("resnet34", "resnet18", 32, decompose={"blocks": 3, "cuts": [
        {"teacher": "layer2", "student": "layer2"}, {"teacher": "layer4.1", "student": "layer4"}]})
    c = compile_spec(load_spec(raw))
    assert _labels(c.teacher.boundaries) == ["layer2", "layer4.1"]
    assert _labels(c.student.boundaries) == ["layer2", "layer4"]
    assert [b.rule for b in c.teacher.boundaries] == ["explicit", "explicit"]
    assert [b.rule for b in c.pairing.blocks] == ["explicit", "explicit", "head"]
    assert [b["rule"] for b in c.to_dict()["blocks"]] == ["explicit", "explicit", "head"]
    assert c.teacher.boundaries[0].cut.shape == c.student.boundaries[0].cut.shape


def test_explicit_cut_that_is_no_module_is_rejected():
    raw = _pair("resnet34", "resnet18", 32, decompose={"blocks": 3, "cuts": [
        {"teacher": "layer2", "student": "layer2"}, {"teacher": "layer4", "student": "layer9"}]})
    with pytest.raises(PlanError, match=r"decompose\.cuts\.1\.student: 'layer9'"):
        compile_spec(load_spec(raw))


def test_explicit_cut_inside_a_residual_block_is_rejected():
    raw = _pair("resnet34", "resnet18", 32, schedule={"recompositions": 1}, decompose={"blocks": 2, "cuts": [
        {"teacher": "layer2.0.conv1", "student": "layer2"}]})
    with pytest.raises(PlanError, match=r"decompose\.cuts\.0\.teacher"):
        compile_spec(load_spec(raw))


def test_explicit_cuts_out_of_order_are_rejected():
    raw = _pair("resnet34", "resnet18", 32, decompose={"blocks": 3, "cuts": [
        {"teacher": "layer3", "student": "layer2"}, {"teacher": "layer2", "student": "layer3"}]})
    with pytest.raises(PlanError, match="forward order"):
        compile_spec(load_spec(raw))


def _bounds(model, size, blocks):
    traced = trace(model.eval(), size)
    return choose_boundaries(find_stages(find_cuts(traced), traced), blocks, traced), traced


def _pyramid():
    """Three resolutions (1, 2, 4) of widths 4, 8, 16, then the head."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 2))


@pytest.mark.parametrize("blocks,ends", [(1, []), (2, ["5"]), (3, ["3", "5"]), (4, ["1", "3", "5"])])
def test_one_boundary_per_resolution_the_shallowest_dropped_first(blocks, ends):
    bounds, _ = _bounds(_pyramid(), (3, 8, 8), blocks)
    assert [b.cut.module for b in bounds] == ends  # each resolution ends at its ReLU, the later cut
    assert all(b.rule == "stage end" for b in bounds)


def test_too_many_blocks_for_the_stages_and_their_units_is_refused():
    with pytest.raises(PlanError, match=r"^the student cannot be cut into 5 blocks: it has 1 resolution stages and "
                                        r"2 repeated units in all; lower decompose.blocks$"):
        _bounds(_Isotropic(2), (1, 8, 8), 5)
    with pytest.raises(PlanError, match=r"^the student cannot be cut into 5 blocks: it has 3 resolution stages and "
                                        r"3 repeated units in all; lower decompose.blocks$"):
        _bounds(_pyramid(), (3, 8, 8), 5)  # no stage repeats a unit: only one cut per resolution


def test_a_model_with_only_vector_cuts_cannot_be_split():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(PlanError, match=r"^the student has no feature-map or token cut to split at; name the cuts "
                                        r"in decompose.cuts or use decompose.blocks: 1$"):
        _bounds(mlp, (3, 4, 4), 2)
    assert _bounds(mlp, (3, 4, 4), 1)[0] == []


@pytest.mark.parametrize("blocks,ends,rules", [
    (2, [("enc", "mid")], ["stage end"]),  # the bottleneck, carrying the skip
    (3, [("enc",), ("enc", "mid")], ["stage end", "stage end"]),
    (4, [("enc",), ("enc", "mid"), ("cat",)], ["stage end", "stage end", "decoder stage end"]),
])
def test_a_unet_is_cut_on_its_way_down_then_up(blocks, ends, rules):
    bounds, _ = _bounds(TinyUNet(), (3, 8, 8), blocks)
    assert [b.cut.nodes for b in bounds] == ends and [b.rule for b in bounds] == rules
    with pytest.raises(PlanError, match=r"^the student cannot be cut into 5 blocks: it has 2 resolutions on the way "
                                        r"down and 1 on the way up; lower decompose.blocks$"):
        _bounds(TinyUNet(), (3, 8, 8), 5)


def test_pairable_stages_leave_a_unet_its_single_tensor_ends_against_a_plain_partner():
    def art(model):
        traced = trace(model.eval(), (3, 8, 8))
        return ModelArtifacts("student", model, traced, stages=tuple(find_stages(find_cuts(traced), traced)))

    unet, plain = art(TinyUNet()), art(_pyramid())
    assert any(s.end.multi for s in unet.stages)
    single = pairable_stages(unet, plain)
    assert single and not any(s.end.multi for s in single)
    assert [s.end.node for s in single] == [s.end.node for s in unet.stages if not s.end.multi]
    assert pairable_stages(unet, unet) == list(unet.stages)  # both carry skips: every stage
    assert pairable_stages(unet, None) == list(unet.stages)
    assert pairable_stages(plain, unet) == list(plain.stages)


def test_explicit_cuts_are_resolved_by_module_and_refused_with_the_cuts_near_them():
    from kdgraph.compiler.boundaries import boundaries_for

    traced = trace(_pyramid().eval(), (3, 8, 8))
    cuts = find_cuts(traced)
    stages = find_stages(cuts, traced)
    bounds = boundaries_for(traced, cuts, stages, 3, ["1", "4"])
    assert [(b.cut.module, b.rule) for b in bounds] == [("1", "explicit"), ("4", "explicit")]
    assert boundaries_for(traced, cuts, stages, 3, None) == choose_boundaries(stages, 3, traced)
    with pytest.raises(PlanError, match=r"^decompose\.cuts\.1\.student: '10' is not a cut of the student \(no single "
                                        r"tensor crosses there, or no such module\); cuts near it: 0, 1\. "
                                        r"`kdgraph plan` lists every cut\.$"):
        boundaries_for(traced, cuts, stages, 3, ["1", "10"])
    with pytest.raises(PlanError, match=r"^decompose\.cuts: the student cuts must be in forward order$"):
        boundaries_for(traced, cuts, stages, 3, ["4", "1"])
