"""bench/recipes.py's bookkeeping on fake results: best lr per recipe from the sweep (and the
sweep's best cell counted as seed 0's), the best logit head for StableKD, the table and plot;
and every recipe's spec of the grid is a valid kdgraph spec."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import recipes  # noqa: E402  (bench/ is not a package; a failed import fails the module, never skips it)


def _args(tmp_path, **kw):
    return argparse.Namespace(width_div=8, root=None, device="cpu", threads=1, work=str(tmp_path), jobs=2,
                              base_epochs=None, teacher_epochs=None, methods=recipes.ORDER, seeds=[0, 1, 2],
                              fractions=[0.2, 1.0], teacher_ckpt=tmp_path / "t.safetensors", **kw)


def _row(method, fraction, seed, lr, top1, sweep=False, head=None):
    r = {"cell": f"{method}-{fraction}-{seed}-{lr}-{head}", "tag": "w8", "width_div": 8, "method": method,
         "fraction": fraction, "seed": seed, "lr": lr, "top1": top1, "wall_s": 100.0}
    if sweep:
        r["sweep"] = True
    if head:
        r["head"] = head
    return r


def _rows():
    rows = [_row("kd", 0.2, 0, lr, acc, sweep=True) for lr, acc in [(0.05, 80.0), (0.1, 82.0), (0.2, 81.0)]]
    rows += [_row("kd", 0.2, s, 0.1, acc) for s, acc in [(1, 84.0), (2, 83.0)]]
    rows += [_row("dkd", 0.2, 0, lr, acc, sweep=True) for lr, acc in [(0.05, 85.0), (0.1, 84.0), (0.2, 70.0)]]
    rows += [_row("dkd", 0.2, s, 0.05, 86.0) for s in (1, 2)]
    rows += [_row("dist", 0.2, 0, 0.1, 83.0, sweep=True), _row("dist", 0.2, 1, 0.1, 83.5)]
    rows += [_row("kd", 1.0, s, 0.1, 90.0 + s) for s in range(3)]
    rows += [_row("stablekd-5/2+best", 0.2, s, 0.5, 87.0, head="dkd") for s in range(3)]
    rows.append({"cell": "recipes-teacher-w8", "method": "teacher", "tag": "w8", "top1": 91.0, "epochs": 8,
                 "wall_s": 900.0})
    return rows


def test_sweep_best_lr_and_best_head(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert recipes.best_lrs(_rows(), "w8") == {"kd": 0.1, "dkd": 0.05, "dist": 0.1}
    assert recipes.best_head(results, "w8") == "dkd"


def test_aggregate_counts_only_the_sweeps_best_cell():
    agg = recipes.aggregate(_rows())
    assert agg[(0.2, "kd")] == pytest.approx((83.0, 1.0, 3))
    assert agg[(0.2, "dkd")][:2] == pytest.approx((85.6667, 0.5774), abs=1e-3)
    assert agg[(0.2, "stablekd-5/2+dkd")][2] == 3
    assert agg[(1.0, "kd")][0] == pytest.approx(91.0)


def test_report_writes_table_and_plot(tmp_path):
    results = tmp_path / "recipes-w8.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    text = recipes.report(results)
    assert "| dkd | 85.67 ± 0.58 (3) | +2.67 |" in text
    assert "stablekd-5/2+dkd" in text and "teacher ResNet-34 (w8): top-1 91.00%" in text
    assert results.with_suffix(".png").exists()


def test_grid_cells_and_specs(tmp_path):
    from kdgraph.spec import load_spec

    args = _args(tmp_path)
    assert recipes.grid_units(args) == 70  # 7 sweeps x 3 lrs (fm x2) + 8 x 2 x 3 main (fm x2) - the sweeps' best
    for method in recipes.ORDER:
        for fraction in (0.2, 1.0):
            head = recipes.LOGIT_RECIPES[0] if method == "stablekd-5/2+best" else None
            spec = load_spec(recipes.recipe_spec(args, method, fraction, 1, lr=0.1, head=head))
            assert spec.schedule.epochs == recipes.BASE_EPOCHS[fraction] * recipes.RECIPES[method].get("mult", 1)
            assert spec.data.augment == "crop+flip"
    fm = recipes.recipe_spec(args, "fm", 0.2, 0, lr=0.1)
    assert fm["schedule"]["epochs"] == 30 and fm["loss"]["ce_weight"] == 0.0 and "mixup" in fm["data"]
    dkd = recipes.recipe_spec(args, "dkd", 0.2, 0, lr=0.1)
    assert dkd["loss"]["dkd_warmup_epochs"] == pytest.approx(15 / 12)
    head = recipes.recipe_spec(args, "stablekd-5/2+best", 0.2, 0, lr=0.5, head="dist")
    assert head["loss"]["logit"] == "dist" and "stablekd-5_2pdist" in head["output"]
    # a sweep cell and the main cell it stands for are one cell
    assert recipes.recipe_spec(args, "kd", 0.2, 0, lr=0.1, sweep=True)["name"] == \
        recipes.recipe_spec(args, "kd", 0.2, 0, lr=0.1)["name"]
