"""bench/stablekd_study.py's cell selection: --block h100-open (issue 38 item 4) picks exactly the
full-width cells the audit left open, each spec carries its lr and BatchNorm re-estimation, the
cell names are new (a finished cell of another block is not taken for one of them), and the
report's tables leave them out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stablekd_study as study  # noqa: E402  (bench/ is not a package)

from kdgraph.spec import load_spec  # noqa: E402


@pytest.fixture
def args(tmp_path, monkeypatch):
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(study, "teacher", lambda a: (ckpt, {}))  # no teacher is trained here
    return argparse.Namespace(width_div=1, seeds=[0, 1, 2], fractions=[1.0, 0.2], mults=None, work=str(tmp_path),
                              root=None, device="cpu", threads=None, base_epochs=None, teacher_epochs=None)


def test_h100_open_cells_are_the_issues_grid(args, tmp_path):
    cells = study.cells_of(args, "h100-open", tmp_path / "results.jsonl")
    # the issue's list written out: 5/0 and 5/2 with re-estimation auto at lr 0.5 and 1.0, KD at 0.2; 20 %; 3 seeds
    want = {(m, lr, bn, seed) for seed in (0, 1, 2)
            for m, lr, bn in [("stablekd-5/0", 0.5, "auto"), ("stablekd-5/0", 1.0, "auto"),
                              ("stablekd-5/2", 0.5, "auto"), ("stablekd-5/2", 1.0, "auto"), ("kd", 0.2, None)]}
    assert {(c["method"], c["lr"], c.get("bn"), c["seed"]) for c in cells} == want and len(cells) == 15
    assert {(c["fraction"], c["mult"], c["block"]) for c in cells} == {(0.2, 1, "h100-open")}
    args.seeds = [4]
    assert {c["seed"] for c in study.cells_of(args, "h100-open", tmp_path / "results.jsonl")} == {4}


def test_h100_open_specs_carry_lr_and_bn(args, tmp_path):
    specs = {(c["method"], c["lr"], c["seed"]): study.cell_spec(args, **c)
             for c in study.cells_of(args, "h100-open", tmp_path / "r.jsonl")}
    sk = specs[("stablekd-5/2", 1.0, 1)]
    assert sk["optim"]["lr"] == 1.0 and sk["runtime"]["bn_recalibrate"] == "auto" and sk["seed"] == 1
    assert sk["schedule"] == {"method": "stablekd", "epochs": 15, "recompositions": 2} and sk["data"]["fraction"] == 0.2
    assert specs[("stablekd-5/0", 0.5, 0)]["schedule"]["recompositions"] == 0
    kd = specs[("kd", 0.2, 2)]
    assert kd["optim"]["lr"] == 0.2 and kd["runtime"]["bn_recalibrate"] is False  # kd's own (no override)
    assert kd["optim"]["lr_schedule"] == "onecycle"
    assert load_spec(sk).runtime.bn_recalibrate == "auto"  # a spec kdgraph takes
    # new names: not the paper-protocol cells of the same method and seed (no re-estimation, lr 0.5)
    names = [s["name"] for s in specs.values()]
    assert len(set(names)) == 15
    plain = study.cell_spec(args, "stablekd-5/2", 1, 0.2, 1, lr=1.0)
    assert plain["name"] != sk["name"] and plain["runtime"]["bn_recalibrate"] is False
    assert sk["name"] == "full-stablekd-5/2-x1-f0.2-s1-lr1.0-bnauto"


def test_finished_cells_are_skipped_and_left_out_of_the_tables(args, tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    cells = study.cells_of(args, "h100-open", results)
    done = {"cell": study.cell_spec(args, **cells[0])["name"], "width_div": 1, **cells[0], "top1": 50.0}
    main = {"cell": "full-kd-x1-f0.2-s0-lr0.1", "width_div": 1, "method": "kd", "mult": 1, "fraction": 0.2,
            "seed": 0, "top1": 88.0}
    results.write_text(json.dumps(done) + "\n" + json.dumps(main) + "\n")
    ran = []
    monkeypatch.setattr(study, "_run_cell", lambda job: ran.append(job[1]["name"]) or {
        "cell": job[1]["name"], **job[0], "top1": 1.0, "wall_s": 0.0, "images_per_s": 0.0})
    args.jobs = 1
    study.run_cells(args, results, cells)
    assert len(ran) == 14 and done["cell"] not in ran
    agg = study.aggregate([json.loads(ln) for ln in results.read_text().splitlines()])
    assert agg == {(1, 0.2, "kd", 1): (88.0, 0.0, 1)}  # the h100-open rows are not the method's cells
