"""Depth splits of an isotropic stage whose depth the blocks do not divide: the rule is
near-equal chunks, the larger ones first (``boundaries._split``: 10/4 -> 3, 3, 2, 2), and the
plan says which chunks it cut (``depth split 1/4 (3/3/2/2)``).

The truth is written out by hand for each case; the model is a stem, ``depth`` residual
blocks of one width in a Sequential, and the head, small enough to trace in a blink."""

from __future__ import annotations

import io

import pytest
from torch import nn

from kdgraph.compiler import compile_spec
from kdgraph.compiler.boundaries import _depth_sizes, _split, choose_boundaries, depth_ends
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.stages import find_stages
from kdgraph.compiler.trace import trace
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec


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
