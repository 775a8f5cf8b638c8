"""kdgraph.sweep: its statistics against scipy.stats; the cell key (each of its fields changes it,
and a row of the old key no longer counts as that cell done); the arms of --grid/--baseline;
selection, bracketing and following on rows written here; and `kdgraph sweep` end to end on the
quickstart pair at a tiny size: killed mid-cell, resumed, its report recomputed by hand from
its JSONL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as stats

from kdgraph import sweep as sw
from kdgraph.errors import KDGraphError

from _runtime_helpers import ROOT, cli_cmd, cli_env, run_cli

QUICKSTART = ROOT / "specs" / "quickstart.yaml"


# --------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df", [1, 2, 2.7, 5, 17.3, 60])
def test_t_distribution_matches_scipy(df):
    for t in (0.0, 0.05, 1.0, 2.5, 7.0, 40.0):
        assert sw.t_sf2(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-300)
    assert sw.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_welch_and_describe_match_scipy():
    a, b = [88.1, 88.9, 87.6, 88.4], [89.9, 90.6, 89.2]
    w = sw.welch(b, a)
    ref = stats.ttest_ind(b, a, equal_var=False)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-12) and w["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert w["df"] == pytest.approx(df) and w["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    d = sw.describe(b)
    lo, hi = stats.t.interval(0.95, len(b) - 1, loc=np.mean(b), scale=stats.sem(b))
    assert d["ci95"] == pytest.approx((lo, hi), rel=1e-9) and d["std"] == pytest.approx(np.std(b, ddof=1))
    assert sw.welch([1.0], b) is None and sw.welch([1.0, 1.0], [2.0, 2.0]) is None  # undefined
    assert sw.describe([3.0]) == {"n": 1, "mean": 3.0, "std": None, "ci95": None, "values": [3.0]}


# --------------------------------------------------------------------- arms, keys


def test_arms_from_cli():
    arms, base = sw.arms_from_cli(["optim.lr=0.5,1,2", "loss.logit=kl,dkd"], "loss.logit=kl")
    assert base == "loss.logit=kl" and [a.name for a in arms] == ["loss.logit=kl", "loss.logit=dkd"]
    assert arms[1].overrides == ("loss.logit=dkd",) and arms[1].grid == (("optim.lr", ("0.5", "1", "2")),)
    one, none = sw.arms_from_cli(["optim.lr=0.5,1"], None)
    assert none is None and len(one) == 1 and one[0].grid == (("optim.lr", ("0.5", "1")),)
    for grid, baseline, match in [
        (["optim.lr"], None, "dotted.path=value1"),
        (["optim.lr=1,,2"], None, "dotted.path=value1"),
        (["optim.lr=1,1"], None, "listed twice"),
        (["optim.lr=1", "optim.lr=2"], None, "given twice"),
        ([], None, "at least one --grid"),
        (["optim.lr=1,2"], "loss.logit=kl", "not a value of a --grid axis"),
        (["optim.lr=1,2"], "optim.lr=3", "not a value"),
        (["optim.lr=1,2"], "optim.lr", "write axis=value"),
    ]:
        with pytest.raises(KDGraphError, match=match):
            sw.arms_from_cli(grid, baseline)
    with pytest.raises(KDGraphError, match="comma-separated integers"):
        sw.parse_seeds("1,x", "--seeds")


def _sweep(tmp_path, arms=None, spec=QUICKSTART, **kw):
    arms = arms or [sw.Arm("a", ("loss.temperature=1",), (("optim.lr", ("0.1", "0.2", "0.4")),))]
    kw.setdefault("seeds", (0,))
    kw.setdefault("report_seeds", (1, 2))
    return sw.Sweep(spec, arms, results=tmp_path / "r.jsonl", work=tmp_path / "w", **kw)


def test_cell_key_guards_reuse(tmp_path):
    """Each field of the key (spec file bytes, common overrides, arm overrides, grid point, seed)
    makes another cell: a row of the old key is not that cell done."""
    s = _sweep(tmp_path)
    arm, point = s.arms[0], (("optim.lr", "0.1"),)
    cell = s.cell(arm, point, 0)
    done = {cell.key: {"key": cell.key, "val_top1": 50.0}}
    assert cell.key not in {c.key for c in s.pending(["a"], done)}
    assert s.cell(arm, point, 0) == cell  # an unchanged cell keeps its key
    edited = tmp_path / "q.yaml"
    edited.write_bytes(QUICKSTART.read_bytes() + b"\n# edited\n")
    other_arm = sw.Arm("a", ("loss.temperature=4",), arm.grid)
    changed = [  # (the sweep, its cell at the same arm name, point and seed)
        (_sweep(tmp_path, spec=edited), arm, point, 0),
        (_sweep(tmp_path, common=("data.val_fraction=0.2",)), arm, point, 0),
        (_sweep(tmp_path, arms=[other_arm]), other_arm, point, 0),
        (s, arm, (("optim.lr", "0.2"),), 0),
        (s, arm, point, 1),
    ]
    keys = {cell.key}
    for sweep, a, p, seed in changed:
        other = sweep.cell(a, p, seed)
        keys.add(other.key)
        if seed == 0:  # a selection cell: still to train despite the old row
            assert other.key in {c.key for c in sweep.pending(["a"], done)}
    assert len(keys) == 6


def _simulate(s, val_of, test_of=lambda c: 80.0 + c.seed):
    """Run the sweep's waves on made-up scores: ``val_of(cell)`` (None: diverged)."""
    done = {}
    for wave in s.waves:
        while cells := s.pending(wave, done):
            for c in cells:
                v = val_of(c)
                done[c.key] = {"key": c.key, "val_top1": v, "test_top1": None if v is None else test_of(c),
                               **({"diverged": "nan"} if v is None else {})}
    return done


def _lr(cell) -> float:
    return float(dict(cell.point)["optim.lr"])


def test_selection_brackets_its_choice(tmp_path):
    peak = lambda c: -abs(math.log2(_lr(c) / 0.8))  # noqa: E731  best at lr 0.8, above the grid
    s = _sweep(tmp_path, extend=2)
    st = s.arm_state(s.arms[0], _simulate(s, peak))
    assert st.grid == [("optim.lr", ["0.1", "0.2", "0.4", "0.8", "1.6"])] and dict(st.chosen) == {"optim.lr": "0.8"}
    assert st.edges == []
    s1 = _sweep(tmp_path, extend=1)
    far = lambda c: _lr(c)  # noqa: E731  the higher the better: still at the edge after one step
    st1 = s1.arm_state(s1.arms[0], _simulate(s1, far))
    assert st1.grid == [("optim.lr", ["0.1", "0.2", "0.4", "0.8"])] and st1.edges == ["optim.lr"]
    low = s1.arm_state(s1.arms[0], _simulate(s1, lambda c: -_lr(c)))
    assert low.grid == [("optim.lr", ["0.05", "0.1", "0.2", "0.4"])] and dict(low.chosen) == {"optim.lr": "0.05"}
    s0 = _sweep(tmp_path)  # extend 0: flagged, not grown
    st0 = s0.arm_state(s0.arms[0], _simulate(s0, far))
    assert st0.grid == [("optim.lr", ["0.1", "0.2", "0.4"])] and st0.edges == ["optim.lr"]


def test_selection_skips_diverged_and_ties_keep_the_first(tmp_path):
    s = _sweep(tmp_path, seeds=(0, 1), report_seeds=(2, 3))
    div = lambda c: None if _lr(c) == 0.4 and c.seed == 1 else _lr(c)  # noqa: E731
    st = s.arm_state(s.arms[0], _simulate(s, div))
    assert dict(st.chosen) == {"optim.lr": "0.2"} and st.means[(("optim.lr", "0.4"),)] is None
    text = sw.format_report(sw.sweep_report(s, _simulate(s, div)))
    assert "[optim.lr=0.2 → 0.20], optim.lr=0.4 → diverged" in text  # said, not a dash
    tie = s.arm_state(s.arms[0], _simulate(s, lambda c: 70.0))
    assert dict(tie.chosen) == {"optim.lr": "0.1"} and tie.edges == ["optim.lr"]


def test_follow_arm_and_waves_and_report(tmp_path):
    arms = [sw.Arm("kd", ("schedule.method=kd",), (("optim.lr", ("0.1", "0.2", "0.4")),)),
            sw.Arm("ctl", ("schedule.method=kd+mse",), follow="kd")]
    s = _sweep(tmp_path, arms=arms, baseline="kd", waves=[["kd"], ["ctl"]])
    assert s.count() == 3 + 2 + 2
    done = _simulate(s, lambda c: -abs(_lr(c) - 0.2), test_of=lambda c: 80.0 + c.seed + (c.arm == "ctl"))
    ctl = [r for r in done.values() if r["key"] in {c.key for c in s.report_cells(s.arm_state(arms[1], done))}]
    assert len(ctl) == 2
    cells = s.report_cells(s.arm_state(arms[1], done))
    assert all(c.overrides == ("schedule.method=kd+mse", "optim.lr=0.2") for c in cells)
    rep = sw.sweep_report(s, done)
    kd, c = rep["arms"]
    assert kd["chosen"] == c["chosen"] == {"optim.lr": "0.2"} and kd["test"]["values"] == [81.0, 82.0]
    assert c["test"]["values"] == [82.0, 83.0] and c["vs_baseline"]["diff"] == pytest.approx(1.0)
    assert c["vs_baseline"]["p"] == pytest.approx(stats.ttest_ind([82, 83], [81, 82], equal_var=False).pvalue)
    text = sw.format_report(rep)
    assert "[optim.lr=0.2 → 0.00], optim.lr=0.4 → -0.20" in text and "| ctl | optim.lr=0.2 | 2 | 82.50 ± 0.71 |" in text
    with pytest.raises(KDGraphError, match="not an arm with a grid"):
        _sweep(tmp_path, arms=[arms[1]])
    with pytest.raises(KDGraphError, match="must list every arm once"):
        _sweep(tmp_path, arms=arms, waves=[["kd"]])
    with pytest.raises(KDGraphError, match="not one of the arms"):
        _sweep(tmp_path, arms=arms, baseline="nope")


def test_report_seeds_overlapping_the_selection_seeds_are_refused(tmp_path):
    with pytest.raises(KDGraphError, match=r"fresh, not selection seeds; both have \[0, 2\]"):
        _sweep(tmp_path, seeds=(0, 2), report_seeds=(2, 1, 0))
    res = run_cli("sweep", str(QUICKSTART), "--grid", "optim.lr=0.1,0.2", "--seeds", "0", "--report-seeds", "0,1,2",
                  "--results", str(tmp_path / "r.jsonl"), "--work", str(tmp_path / "w"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "fresh" in res.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_a_spec_of_another_task_is_refused(tmp_path):
    arms = [sw.Arm("a", (), (("optim.lr", ("0.01", "0.02")),))]
    lm = ROOT / "specs" / "shakespeare-lm.yaml"
    with pytest.raises(KDGraphError, match=r"validation top1; .* is a causal_lm spec, which measures loss, ppl, bpb"):
        _sweep(tmp_path, arms=arms, spec=lm).check()
    val = ("data.val_fraction=0.05",)
    with pytest.raises(KDGraphError, match="causal_lm's bpb is better lower; the sweep was told otherwise"):
        _sweep(tmp_path, arms=arms, spec=lm, common=val, metric="bpb").check()
    with pytest.raises(KDGraphError, match="set data.val_fraction"):
        _sweep(tmp_path, arms=arms, spec=lm, metric="bpb", higher_is_better=False).check()
    _sweep(tmp_path, arms=arms, spec=lm, common=val, metric="bpb", higher_is_better=False).check()
    cli = sw.from_cli(lm, ["optim.lr=0.01,0.02"], "0", "1", overrides=list(val), work=tmp_path / "w")
    assert (cli.metric, cli.higher_is_better) == ("bpb", False)  # `kdgraph sweep` takes the task's metric
    cli.check()
    quick = sw.from_cli(QUICKSTART, ["optim.lr=0.1,0.2"], "0", "1", work=tmp_path / "w")
    assert (quick.metric, quick.higher_is_better) == ("top1", True)


def test_a_lower_is_better_metric_chooses_the_lowest_and_reports_it(tmp_path):
    """bits per byte: the lowest validation mean is chosen (a diverged cell still loses), grids
    grow at the low end where it sits there, and the report reads test_bpb."""
    arms = [sw.Arm("ce", (), (("optim.lr", ("0.002", "0.005", "0.01")),)),
            sw.Arm("kd", ("schedule.method=kd",), follow="ce")]
    s = _sweep(tmp_path, arms=arms, baseline="ce", metric="bpb", higher_is_better=False, extend=1,
               waves=[["ce"], ["kd"]])
    bpb = {0.001: 2.3, 0.002: 2.1, 0.005: 2.0, 0.01: 2.2}
    done = {}
    for wave in s.waves:
        while cells := s.pending(wave, done):
            for c in cells:
                lr = _lr(c)
                test = bpb[lr] + 0.01 * c.seed - (0.05 if c.arm == "kd" else 0.0)
                done[c.key] = {"key": c.key, "val_bpb": None if lr == 0.01 else bpb[lr], "test_bpb": test}
    ce = s.arm_state(arms[0], done)
    assert dict(ce.chosen) == {"optim.lr": "0.005"} and ce.edges == [] and ce.means[(("optim.lr", "0.01"),)] is None
    rep = sw.sweep_report(s, done)
    assert rep["arms"][0]["test"]["values"] == pytest.approx([2.01, 2.02])
    assert rep["arms"][1]["vs_baseline"]["diff"] == pytest.approx(-0.05)
    text = sw.format_report(rep)
    assert "(mean bpb, lower is better; chosen in brackets)" in text and "[optim.lr=0.005 → 2.0000]" in text
    assert "| kd | optim.lr=0.005 | 2 | 1.9650 ± 0.0071 |" in text
    low = {**bpb, 0.002: 1.9}  # the best at the low edge: the grid grows down once (0.002² / 0.005)
    done = {}
    while cells := s.pending(["ce"], done):
        for c in cells:
            done[c.key] = {"key": c.key, "val_bpb": low.get(_lr(c), 1.95), "test_bpb": 2.0}
    grown = s.arm_state(arms[0], done)
    assert grown.grid == [("optim.lr", ["0.0008", "0.002", "0.005", "0.01"])]
    assert dict(grown.chosen) == {"optim.lr": "0.002"}


def test_a_spec_without_validation_split_is_refused(tmp_path):
    with pytest.raises(KDGraphError, match="set data.val_fraction"):
        _sweep(tmp_path).check()
    _sweep(tmp_path, common=("data.val_fraction=0.1",)).check()


# --------------------------------------------------------------------- end to end

TINY = ["--set", "teacher.checkpoint=null", "--set", "schedule={method: kd, epochs: 2}",
        "--set", "data.fraction=0.3", "--set", "data.val_fraction=0.2", "--set", "runtime.device=cpu",
        "--set", "runtime.num_threads=1", "--set", "runtime.checkpoint_every=2", "--set", "runtime.log_every=1"]


def _args(tmp_path):
    return ["sweep", str(QUICKSTART), "--grid", "optim.lr=0.05,0.1", "--grid", "loss.temperature=1,4",
            "--baseline", "loss.temperature=1", "--seeds", "0", "--report-seeds", "1,2",
            "--work", str(tmp_path / "w"), *TINY]


def _mid_cell(work: Path) -> bool:
    cells = work / "cells"
    return cells.is_dir() and any((c / "checkpoints" / "last.pt").exists() and not (c / "summary.json").exists()
                                  for c in cells.iterdir())


@pytest.mark.slow
def test_sweep_quickstart_killed_resumed_and_reported_by_hand(tmp_path):
    results, work = tmp_path / "w" / "results.jsonl", tmp_path / "w"
    proc = subprocess.Popen(cli_cmd(*_args(tmp_path)), cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not (results.exists() and results.read_text().strip() and _mid_cell(work)):
        assert proc.poll() is None and time.time() - t0 < 300, "the sweep ended before it could be killed mid-cell"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the cell it runs
    proc.wait()
    before = results.read_text()
    killed = [c.name for c in (work / "cells").iterdir() if not (c / "summary.json").exists()]
    res = run_cli(*_args(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr
    after = results.read_text()
    assert after.startswith(before)  # appended to, nothing rewritten
    rows = [json.loads(ln) for ln in after.splitlines()]
    assert len(rows) == len({r["key"] for r in rows}) == 8  # 2 arms x 2 lrs x seed 0, + 2 arms x seeds 1, 2
    logs = {p.stem: p.read_text() for p in (work / "logs").iterdir()}
    for r in (json.loads(ln) for ln in before.splitlines()):  # finished before the kill: not trained again
        name = Path(r["output"]).name
        assert logs[name].count("starting") == 1 and "resuming" not in logs[name]
    assert any("resuming" in logs[name] for name in killed)  # the killed cell went on from its checkpoint
    rerun = run_cli(*_args(tmp_path), timeout=300)  # everything done: nothing trains
    assert rerun.returncode == 0 and results.read_text() == after and "training" not in rerun.stderr

    # the report, recomputed here from the JSONL alone
    report = sw.sweep_report(sw.from_cli(QUICKSTART, ["optim.lr=0.05,0.1", "loss.temperature=1,4"], "0", "1,2",
                                         "loss.temperature=1", TINY[1::2], work=work))
    got = {a["arm"]: a for a in report["arms"]}
    tests = {}
    for temp in ("1", "4"):
        arm = f"loss.temperature={temp}"
        mine = [r for r in rows if r["arm"] == arm]
        val = {r["point"]["optim.lr"]: r["val_top1"] for r in mine if r["seed"] == 0}
        chosen = "0.1" if val["0.1"] > val["0.05"] else "0.05"  # ties: the first in grid order
        test = [r["test_top1"] for r in sorted(mine, key=lambda r: r["seed"]) if r["seed"] in (1, 2)]
        assert all(r["point"]["optim.lr"] == chosen for r in mine if r["seed"] in (1, 2))
        tests[temp] = test
        g = got[arm]
        assert g["chosen"] == {"optim.lr": chosen} and g["edge"] == ["optim.lr"]  # 2 values: always an edge
        assert {p["point"]["optim.lr"]: p["val_mean"] for p in g["selection"]} == val
        assert g["test"]["n"] == 2 and g["test"]["mean"] == pytest.approx(np.mean(test))
        assert g["test"]["std"] == pytest.approx(np.std(test, ddof=1))
        ci = stats.t.interval(0.95, 1, loc=np.mean(test), scale=np.std(test, ddof=1) / math.sqrt(2))
        assert g["test"]["ci95"] == pytest.approx(ci)
    ref = stats.ttest_ind(tests["4"], tests["1"], equal_var=False)
    w = got["loss.temperature=4"]["vs_baseline"]
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    printed = run_cli(*_args(tmp_path), "--report").stdout
    assert f"{np.mean(tests['4']):.2f} ± {np.std(tests['4'], ddof=1):.2f}" in printed and f"{ref.pvalue:.3g}" in printed


def test_a_failing_cell_stops_the_sweep_and_records_nothing(tmp_path):
    res = run_cli("sweep", str(QUICKSTART), "--grid", "optim.lr=0.1", "--seeds", "0", "--report-seeds", "",
                  "--work", str(tmp_path / "w"), *TINY, "--set", "data.dataset=fashion-mnist",
                  "--set", f"data.root={tmp_path / 'missing'}", "--set", "data.input_size=[1,8,8]")
    assert res.returncode == 2 and "failed (exit 2)" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "w" / "results.jsonl").exists()


def test_one_sweep_at_a_time_per_work_folder(tmp_path):
    import fcntl

    s = _sweep(tmp_path, common=("data.val_fraction=0.1",))
    (tmp_path / "w").mkdir()
    with open(tmp_path / "w" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep, or a cell it left running
        with pytest.raises(KDGraphError, match="another sweep .* is running"):
            s.run()
    assert not (tmp_path / "r.jsonl").exists()


def test_results_file_survives_a_line_cut_short(tmp_path):
    path = tmp_path / "r.jsonl"
    sw.append_row(path, {"key": "a", "val_top1": 1.0})
    with open(path, "a") as f:
        f.write('{"key": "b", "val_')  # a kill while writing
    assert set(sw.load_rows(path)) == {"a"}  # b is not done
    sw.append_row(path, {"key": "b", "val_top1": 2.0})
    assert sw.load_rows(path)["b"]["val_top1"] == 2.0 and path.read_text().endswith("2.0}\n")
    assert path.read_text().splitlines()[1] == '{"key": "b", "val_'  # kept: the sweep deletes nothing
    assert set(sw.load_rows(path)) == {"a", "b"}


# --------------------------------------------------------------------- grid scripts' helpers


def test_train_teacher_once_writes_the_summary_row_once(tmp_path):
    """The teacher trains once into its folder: its row holds the run's own summary.json numbers
    (test and validation of the metric, extra fields), and a second call trains nothing."""
    spec = tmp_path / "teacher.yaml"
    spec.write_text("\n".join([
        "name: t", "seed: 0", "output: unused", "decompose: {blocks: 1}", "schedule: {epochs: 1}",
        'student: {model: "module:kdgraph.zoo:resnet_tiny_student", kwargs: {num_classes: 10, in_chans: 1}}',
        "data: {dataset: digits, batch_size: 64, fraction: 0.2, val_fraction: 0.2}",
        "optim: {name: sgd, lr: 0.1}", "runtime: {device: cpu, num_threads: 1, log_every: 100}"]) + "\n")
    results, out, logged = tmp_path / "r" / "rows.jsonl", tmp_path / "teacher", []
    row = sw.train_teacher_once(results, "teacher-x", spec, out, extra={"test_top5": "student_top5"},
                                what="the X teacher", log=logged.append)
    summary = json.loads((out / "summary.json").read_text())
    assert list(row) == ["key", "arm", "test_top1", "val_top1", "test_top5", "epochs", "wall_s", "output"]
    assert (row["key"], row["arm"], row["epochs"]) == ("teacher-x", "teacher", 1)
    assert (row["test_top1"], row["val_top1"], row["test_top5"]) == (
        summary["student_top1"], summary["student_val_top1"], summary["student_top5"])
    assert row["val_top1"] is not None and Path(row["output"]) == out and logged == ["training the X teacher"]
    assert sw.load_rows(results) == {"teacher-x": row}
    mtime = (out / "summary.json").stat().st_mtime_ns
    assert sw.train_teacher_once(results, "teacher-x", spec, out, log=logged.append) is None
    assert len(results.read_text().splitlines()) == 1 and logged == ["training the X teacher"]
    assert (out / "summary.json").stat().st_mtime_ns == mtime


def test_dry_run_line_counts_arms_cells_and_growth(tmp_path):
    val = ("data.val_fraction=0.1",)
    one = _sweep(tmp_path, common=val, extend=2)  # 1 arm x 3 lrs on seed 0 + 2 report seeds
    other = _sweep(tmp_path, common=val, extend=1, arms=[
        sw.Arm("a", (), (("optim.lr", ("0.1", "0.2")),)), sw.Arm("b", ("loss.temperature=4",), follow="a")])
    assert sw.dry_run([one], "the teacher") == (
        "1 arms, 5 cells as given (+ up to 4 per swept arm where a grid grows) + the teacher; specs valid")
    assert sw.dry_run([one, other], "two teachers") == (
        "3 arms in 2 sweeps, 11 cells as given (+ up to 4 per swept arm where a grid grows) + two teachers; "
        "specs valid")
    with pytest.raises(KDGraphError, match="set data.val_fraction"):
        sw.dry_run([one, _sweep(tmp_path)], "x")


def test_run_script_exits_with_the_one_line_error_or_130(capsys):
    logged = []

    def fails():
        raise KDGraphError("no such spec")

    with pytest.raises(SystemExit) as got:
        sw.run_script(fails, logged.append)
    assert got.value.code == "error: no such spec" and logged == []

    def stopped():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as got:
        sw.run_script(stopped, logged.append, stopped="stopped here")
    assert got.value.code == 130 and logged == ["stopped here"]
    done = []
    sw.run_script(lambda: done.append(1), logged.append)
    assert done == [1] and logged == ["stopped here"]
