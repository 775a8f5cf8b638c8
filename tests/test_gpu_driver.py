"""bench/gpu/driver.py, the one command a lent GPU runs, checked on the CPU: its arguments,
which parts it picks and in what order, the commands of both modes, its scheduler (budget,
side by side, stop at the end, figures merged) on stand-in parts, and a dry run of real parts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_driver", ROOT / "bench" / "gpu" / "driver.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_driver"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


driver = _load()
NAMES = [p.name for p in driver.PARTS]


def test_parts_by_name_or_group_in_priority_order():
    pick = driver.select_parts
    assert [p.name for p in pick(None)] == [p.name for p in driver.PARTS if p.default]
    assert "stablekd" not in [p.name for p in pick(None)]  # whole epochs: only when asked for
    assert [p.name for p in pick(["tier"])] == ["tier-eager", "tier-other", "tier-compiled"]
    assert [p.name for p in pick(["throughput-compiled"])] == [n for n in NAMES if n.startswith("throughput-compiled-")]
    # priority order, whatever order they were given in
    assert [p.name for p in pick(["data", "env", "stablekd"])] == ["env", "data", "stablekd"]
    with pytest.raises(SystemExit, match="unknown part.*tie.*the parts: env, tier-eager"):
        pick(["tie"])


def test_arguments():
    args = driver.parse_args(["--out", "/tmp/x", "--parts", "tier", "data", "--budget", "300", "--dry-run"])
    assert (args.out, args.parts, args.budget, args.dry_run, args.jobs) == (Path("/tmp/x"), ["tier", "data"], 300, True, 3)
    assert driver.parse_args(["--list"]).out is None  # --list runs nothing: no --out needed


def test_out_defaults_to_the_device_tools_out(monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert driver.parse_args([]).out == Path("/tmp/device-out")
    monkeypatch.delenv("OUT")
    with pytest.raises(SystemExit):
        driver.parse_args([])


def _opt(cmd: list[str], flag: str) -> str:
    """The value after the last ``flag`` in ``cmd`` (``python -m pytest ... -m cuda``: the last)."""
    return cmd[len(cmd) - cmd[::-1].index(flag)]


def test_commands_on_the_gpu_and_in_a_dry_run(tmp_path):
    gpu, dry = driver.Ctx(False, tmp_path, 3), driver.Ctx(True, tmp_path, 3)
    by_name = {p.name: p for p in driver.PARTS}
    tier = by_name["tier-compiled"].command(gpu)
    assert _opt(tier, "-m") == "cuda" and _opt(tier, "-k") == "on_cuda and compiled"
    tier = by_name["tier-compiled"].command(dry)
    assert _opt(tier, "-m") == "not cuda and not slow"
    assert _opt(tier, "-k").startswith("on_cpu and compiled and (quickstart")
    other = by_name["tier-other"].command(dry)
    assert _opt(other, "-k") == "(bf16 or resume) and cpu"  # no spec filter: not a per-spec test
    thr = by_name["throughput-compiled-vitS-r18@224"].command(gpu)
    assert _opt(thr, "--pairs") == "vitS-r18@224" and "--backend" not in thr  # inductor on the GPU
    thr = by_name["throughput-compiled-vitS-r18@224"].command(dry)
    assert _opt(thr, "--device") == "cpu" and _opt(thr, "--backend") == "eager"
    assert by_name["stablekd"].command(dry) is None
    for part in driver.PARTS:  # every script a part names is in the tree
        cmd = part.command(gpu)
        scripts = [a for a in cmd if a.endswith(".py")]
        assert all((ROOT / s).exists() for s in scripts), (part.name, scripts)


def test_causal_lm_and_evidence_parts(tmp_path):
    """Issues 36-38's parts: after the headline figures (the causal-LM ones by default, the
    whole-epoch cells only when named), GPU sizes on the GPU, tiny ones on the CPU."""
    gpu, dry = driver.Ctx(False, tmp_path, 3), driver.Ctx(True, tmp_path, 3)
    by_name = {p.name: p for p in driver.PARTS}
    assert NAMES.index("lm-throughput") == NAMES.index("throughput-compiled-r34-r18@224") + 1
    assert NAMES.index("lm-memory") == NAMES.index("lm-throughput") + 1 < NAMES.index("data")
    defaults = [p.name for p in driver.select_parts(None)]
    assert "lm-throughput" in defaults and "lm-memory" in defaults and "evidence-h100" not in defaults
    assert [p.name for p in driver.select_parts(["lm"])] == ["lm-throughput", "lm-memory"]
    thr = by_name["lm-throughput"].command(gpu)
    assert [_opt(thr, f) for f in ("--device", "--width", "--teacher-layers", "--batch", "--seq")] == \
        ["cuda", "1024", "16", "16", "1024"]
    assert _opt(thr, "--out") == str(tmp_path / "lm-throughput.jsonl")
    thr = by_name["lm-throughput"].command(dry)
    assert _opt(thr, "--device") == "cpu" and _opt(thr, "--width") == "64" and _opt(thr, "--rounds") == "1"
    mem = by_name["lm-memory"].command(gpu)
    assert "--measure" in mem and _opt(mem, "--device") == "cuda" and "--size" not in mem  # the Qwen2.5 pair
    mem = by_name["lm-memory"].command(dry)
    assert _opt(mem, "--device") == "cpu" and _opt(mem, "--size") == "tiny"
    ev = by_name["evidence-h100"]
    # before the full block, alone: the two share the teacher's work folder (trained once, not twice at once)
    assert ev.exclusive and NAMES.index("evidence-h100") == NAMES.index("stablekd") - 1
    assert ev.resume_from == "bench/results/stablekd-study-full.jsonl" and (ROOT / ev.resume_from).exists()
    cmd = ev.command(gpu)
    assert _opt(cmd, "--block") == "h100-open" and _opt(cmd, "--device") == "cuda" and "--width-div" not in cmd
    assert "--seeds" not in cmd  # the study's default: seeds 0, 1, 2
    cmd = ev.command(dry)
    assert _opt(cmd, "--device") == "cpu" and _opt(cmd, "--width-div") == "16" and _opt(cmd, "--seeds") == "0"
    assert _opt(cmd, "--work").startswith(str(tmp_path))  # a dry run writes nothing into the tree


def _part(name, seconds, exclusive=False, estimate=1, rc=0):
    """A stand-in part: sleeps, writes one figure line with its start and end time, exits rc."""
    code = (f"import json, os, sys, time; t=time.time(); time.sleep({seconds}); "
            f"open(sys.argv[1], 'a').write(json.dumps({{'start': t, 'end': time.time()}}) + chr(10)); sys.exit({rc})")
    return driver.Part(name, name, estimate, exclusive,
                       lambda ctx: [sys.executable, "-c", code, str(ctx.figures(name))])


def test_scheduler_runs_checks_side_by_side_timings_alone_and_keeps_to_the_budget(tmp_path):
    ctx = driver.Ctx(False, tmp_path / "work", jobs=2)
    parts = [_part("a", 1.0), _part("b", 1.0), _part("timing", 0.3, exclusive=True), _part("fails", 0.1, rc=1),
             _part("too-long", 0.1, estimate=10_000), _part("stopped", 60)]
    out = tmp_path / "out"
    summary = driver.run_parts(parts, ctx, budget_s=8, out=out)
    status = {r["part"]: r["status"] for r in summary}
    assert status == {"a": "ok", "b": "ok", "timing": "ok", "fails": "failed", "too-long": "skipped",
                      "stopped": "stopped"}
    rows = {r["part"]: r for r in map(json.loads, (out / "figures.jsonl").read_text().splitlines())}
    assert rows["a"]["start"] < rows["b"]["end"] and rows["b"]["start"] < rows["a"]["end"]  # side by side
    assert rows["timing"]["start"] >= max(rows["a"]["end"], rows["b"]["end"])  # alone
    assert "stopped" not in rows  # killed before it wrote
    saved = json.loads((out / "summary.json").read_text())
    assert [r["part"] for r in saved["parts"]] == [p.name for p in parts] and saved["dry_run"] is False
    assert "===== fails (exit 1) =====" in (out / "log.txt").read_text()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT


def test_tier_outcomes_are_counted_per_part(tmp_path):
    ctx = driver.Ctx(False, tmp_path / "work", jobs=1)
    code = ("import json, sys; f = open(sys.argv[1], 'a'); "
            "[f.write(json.dumps({'test': str(i), 'outcome': o}) + chr(10)) for i, o in enumerate(['passed', 'passed', 'failed'])]")
    part = driver.Part("tier-x", "x", 1, False, lambda c: [sys.executable, "-c", code, str(c.figures("tier-x"))])
    (record,) = driver.run_parts([part], ctx, budget_s=60, out=tmp_path / "out")
    assert record["tests"] == {"failed": 1, "passed": 2}


def test_a_part_that_resumes_adds_only_its_new_lines(tmp_path, monkeypatch):
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text('{"cell": 1}\n{"cell": 2}\n')
    monkeypatch.setattr(driver, "ROOT", tmp_path)
    ctx = driver.Ctx(False, tmp_path / "work", jobs=1)
    code = "import sys; open(sys.argv[1], 'a').write('{\"cell\": 3}' + chr(10))"
    part = driver.Part("study", "s", 1, False, lambda c: [sys.executable, "-c", code, str(c.figures("study"))],
                       resume_from="earlier.jsonl")
    (record,) = driver.run_parts([part], ctx, budget_s=60, out=tmp_path / "out")
    assert record["figures"] == 1
    assert [json.loads(x)["cell"] for x in (tmp_path / "out" / "figures.jsonl").read_text().splitlines()] == [3]


def test_dry_run_of_the_environment_part(tmp_path):
    t0 = time.monotonic()
    rc = driver.main(["--dry-run", "--parts", "env", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    assert rc == 0, (tmp_path / "out" / "log.txt").read_text()
    (row,) = map(json.loads, (tmp_path / "out" / "figures.jsonl").read_text().splitlines())
    assert row["part"] == "env" and row["dry_run"] is True and row["pydantic"] and row["timm"]
    assert time.monotonic() - t0 < 120


@pytest.mark.slow
def test_dry_run_of_the_tier_and_benchmark_parts(tmp_path):
    """The real commands on the CPU: tier cases of three specs, the throughput benchmark
    (eager, and compiled by Dynamo's eager backend) and the data benchmark at tiny sizes."""
    out = tmp_path / "out"
    rc = driver.main(["--dry-run", "--parts", "tier-eager", "throughput-eager", "throughput-compiled-r34-r18@32",
                      "data", "--out", str(out), "--work", str(tmp_path / "w"), "--budget", "900"])
    summary = json.loads((out / "summary.json").read_text())["parts"]
    assert rc == 0, (summary, (out / "log.txt").read_text()[-3000:])
    by = {r["part"]: r for r in summary}
    assert by["tier-eager"]["tests"] == {"passed": 10}  # 5 specs x channels_last on/off
    rows = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
    thr = [r for r in rows if r["part"].startswith("throughput")]
    assert {r["method"] for r in thr} == {"loop", "kd", "decomposed", "merged"}
    assert all(r["recompile_limit_hits"] == 0 for r in thr if r["mode"] == "compiled")
    assert any("summary" in r for r in rows if r["part"] == "data")


@pytest.mark.slow
def test_dry_run_of_the_causal_lm_parts(tmp_path):
    """bench/lm_throughput.py and bench/lm_memory.py --measure through the driver at tiny sizes."""
    out = tmp_path / "out"
    rc = driver.main(["--dry-run", "--parts", "lm", "--out", str(out), "--work", str(tmp_path / "w"),
                      "--budget", "600"])
    summary = json.loads((out / "summary.json").read_text())["parts"]
    assert rc == 0, (summary, (out / "log.txt").read_text()[-3000:])
    rows = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
    assert sorted(r["runner"] for r in rows if r["part"] == "lm-throughput") == ["kdgraph", "loop"]
    memory = [r for r in rows if r["part"] == "lm-memory"]
    assert [r["checkpointing"] for r in memory] == [False, True]
    assert all(r["measured_bytes"] is None and r["predicted_bytes"] > 0 for r in memory)  # the CPU: not measured
