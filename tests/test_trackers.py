"""kdgraph.runtime.trackers: runtime.report_to sends a run to MLflow and W&B. Each is checked by
reading the run back through the tracker's own client (MLflow's local file store, W&B's offline
run file), against the run's own run.json, plan.json and metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import RunFolder, _flatten
from kdgraph.runtime.trackers import MLflowTracker, flat_params, numbers, open_trackers
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec, train_here


def _trained(tmp_path, monkeypatch, report_to: list[str]) -> RunFolder:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(tmp_path / "run", "supervised", epochs=2, fraction=0.1,
                     runtime={"report_to": report_to, "log_every": 2})
    train_here(load_spec(spec))
    return RunFolder(tmp_path / "run")


def _expected_series(folder: RunFolder) -> dict[str, list[tuple[int, float]]]:
    """{KIND/FIELD: [(global_step, value), ...]} written out from metrics.jsonl by hand."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in folder.metrics.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("global_step", "kind", "time") and type(value) in (int, float):
                series.setdefault(f"{record['kind']}/{key}", []).append((record["global_step"], float(value)))
    return series


def _expected_params(folder: RunFolder) -> dict[str, str]:
    spec = json.loads(folder.stored_spec.read_text())["spec"]
    return {f"spec.{key}": value if isinstance(value, str) else json.dumps(value)
            for key, value in _flatten(spec).items() if not (isinstance(value, list) and value)}


def test_flat_params_and_numbers():
    assert flat_params({"a": {"b": 1, "c": [2, {"d": "x"}], "e": [], "f": None}}) == \
        {"a.b": "1", "a.c.0": "2", "a.c.1.d": "x", "a.e": "[]", "a.f": "null"}
    assert numbers({"kind": "epoch", "global_step": 7, "top1": 90, "loss": 0.5, "ok": True, "name": "x"}) == \
        {"epoch/top1": 90.0, "epoch/loss": 0.5}


def test_no_report_to_opens_nothing(tmp_path):
    folder = RunFolder(tmp_path)
    folder.stored_spec.write_text(json.dumps({"spec": {"runtime": {"report_to": []}}}))
    assert open_trackers(folder, resumed=False) == []


def test_mlflow_run_reads_back_with_spec_plan_and_every_metric(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'kdgraph[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = _trained(tmp_path, monkeypatch, ["mlflow"])
    client = MlflowClient(tracking_uri=(folder.root / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny-supervised")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kdgraph.output"] == str(folder.root.resolve())
    params = run.data.params
    for key, value in _expected_params(folder).items():
        assert params[key] == value, key
    assert params["spec.runtime.report_to.0"] == "mlflow" and params["spec.data.batch_size"] == "16"
    plan = json.loads(folder.plan.read_text())
    assert any(key.startswith("plan.") for key in params) and len(params) > len(_expected_params(folder))
    for key, value in plan.items():
        if not isinstance(value, (dict, list)):
            assert params[f"plan.{key}"] == (value if isinstance(value, str) else json.dumps(value))
    series = _expected_series(folder)
    assert "epoch/student_top1" in series or any(k.startswith("epoch/") for k in series)
    assert set(run.data.metrics) == set(series)
    for key, points in series.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == sorted(points), key


def test_mlflow_resumed_run_continues_the_same_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'kdgraph[mlflow]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    spec = {"name": "r", "runtime": {"report_to": ["mlflow"]}}
    first = MLflowTracker(folder, spec, {"k": 3}, resumed=False)
    first.log({"kind": "epoch", "global_step": 1, "loss": 1.0})
    first.close()
    again = MLflowTracker(folder, spec, {"k": 3}, resumed=True)
    fresh = MLflowTracker(folder, spec, {"k": 3}, resumed=False)  # a --force run: a new MLflow run
    assert again.run_id == first.run_id != fresh.run_id
    again.log({"kind": "epoch", "global_step": 2, "loss": 0.5})
    history = again.client.get_metric_history(first.run_id, "epoch/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]


def test_mlflow_history_of_a_killed_and_resumed_run_is_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'kdgraph[mlflow]')")
    from kdgraph.runtime.metrics import Metrics

    class Killed(BaseException):
        pass

    write = Metrics.write

    def killed_at_step_5(self, record):  # the process dies after logging step 5; its checkpoint is step 3's
        write(self, record)
        if record["kind"] == "step" and record["global_step"] == 5:
            raise Killed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(tiny_spec(tmp_path / "run", "supervised", epochs=2, fraction=0.1,
                               runtime={"report_to": ["mlflow"], "log_every": 1, "checkpoint_every": 3}))
    monkeypatch.setattr(Metrics, "write", killed_at_step_5)
    with pytest.raises(Killed):
        train_here(spec)
    monkeypatch.setattr(Metrics, "write", write)
    folder = RunFolder(tmp_path / "run")
    tracker = MLflowTracker(folder, {"name": spec.name}, {}, resumed=True)
    before = tracker.client.get_metric_history(tracker.run_id, "step/loss")
    assert max(m.step for m in before) == 5 > max(r["global_step"] for r in _steps_kept(folder))
    from kdgraph.runtime.loop import train

    train(spec, resume=True)
    expected = _expected_series(folder)
    assert any(step <= 5 for step, _ in expected["step/loss"]) and max(s for s, _ in expected["step/loss"]) > 5
    for key, series in expected.items():  # one value per step; the same values, measured speeds aside
        got = sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key))
        if key in ("step/images_per_s", "step/data_wait_share"):  # the killed process's measurements
            got, series = [s for s, _ in got], [s for s, _ in series]
        assert got == sorted(series), key


def _steps_kept(folder: RunFolder) -> list[dict]:
    """The step records of metrics.jsonl that a resume from the last checkpoint keeps."""
    import torch

    pos = torch.load(folder.root / "checkpoints" / "last.pt", weights_only=False)["position"]
    return [r for r in map(json.loads, folder.metrics.read_text().splitlines())
            if r["kind"] == "step" and r["global_step"] <= pos["global_step"]]


def _wandb_records(path) -> list[bytes]:
    """The records of a W&B run file (run-ID.wandb). wandb 0.31 has no Python reader of its own
    (its core is Go; wandb.Api needs a server), so the file is read here: a 7-byte header
    (":W&B", 0xBEE1, version 0), then LevelDB's log format: 32 KiB blocks of records, each
    with a 7-byte header (CRC32C, length, type: 1 whole, 2 first, 3 middle, 4 last part)."""
    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind in (2, 3):
            pending = payload if kind == 2 else pending + payload
        elif kind == 4:
            out.append(pending + payload)
    return out


def test_wandb_offline_run_reads_back_with_spec_plan_and_every_metric(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'kdgraph[wandb]')")
    from wandb.proto import wandb_internal_pb2  # W&B's own record schema

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "kdgraph-test"}.items():
        monkeypatch.setenv(key, value)
    folder = _trained(tmp_path, monkeypatch, ["wandb"])
    (run_file,) = (folder.root / "wandb").glob("offline-run-*/run-*.wandb")
    config, history, exited = {}, [], False
    for data in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        exited |= kind == "exit"
    assert exited  # the run was finished
    assert config["spec"] == json.loads(folder.stored_spec.read_text())["spec"]
    assert config["plan"] == json.loads(folder.plan.read_text())
    got: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if not key.startswith("_"):
                got.setdefault(key, []).append((row["_step"], value))
    assert got == _expected_series(folder)


def test_a_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    folder = RunFolder(tmp_path)
    folder.stored_spec.write_text(json.dumps({"spec": {"name": "x", "runtime": {"report_to": ["mlflow"]}}}))
    with pytest.raises(KDGraphError, match=r"report_to: mlflow needs the mlflow package.*kdgraph\[mlflow\]"):
        open_trackers(folder, resumed=False)


def test_a_wandb_init_error_is_one_line(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'kdgraph[wandb]')")
    from kdgraph.runtime.trackers import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "bogus")  # wandb.init refuses it with a multi-line ValidationError
    wandb.teardown()  # W&B reads the environment once per process, at its first setup
    try:
        with pytest.raises(KDGraphError) as info:
            WandbTracker(RunFolder(tmp_path), {"name": "x"}, {}, resumed=False)
    finally:
        monkeypatch.delenv("WANDB_MODE")
        wandb.teardown()
    message = str(info.value)
    assert message.startswith("runtime.report_to: wandb.init failed: ValidationError") and "\n" not in message
    assert "'bogus'" in message


def test_report_to_is_validated():
    from kdgraph.errors import SpecError

    with pytest.raises(SpecError, match="report_to"):
        load_spec(tiny_spec(runtime={"report_to": ["comet"]}))
    assert load_spec(tiny_spec(runtime={"report_to": ["mlflow", "wandb"]})).runtime.report_to == ["mlflow", "wandb"]


def test_report_to_tensorboard_writes_the_scalars_as_log_tensorboard_does(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'kdgraph[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdgraph.runtime.metrics import Metrics

    folder = RunFolder(tmp_path)
    folder.stored_spec.write_text(json.dumps({"spec": {"name": "x", "runtime": {"report_to": ["tensorboard"]}}}))
    metrics = Metrics(folder, enabled=True, keep_until_step=None, tensorboard=False)
    records = [{"kind": "epoch", "global_step": 4, "loss": 0.75}, {"kind": "epoch", "global_step": 8, "loss": 0.5}]
    for record in records:
        metrics.write(record)
    metrics.close()
    board = EventAccumulator(str(folder.tensorboard))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("epoch/loss")] == [(4, 0.75), (8, 0.5)]


def _wandb_history(folder: RunFolder) -> dict[str, list[tuple[int, float]]]:
    """{KEY: [(step, value), ...]} of every W&B offline run file in the run folder, in step order."""
    from wandb.proto import wandb_internal_pb2

    got: dict[str, list[tuple[int, float]]] = {}
    for run_file in sorted((folder.root / "wandb").glob("offline-run-*/run-*.wandb")):
        for data in _wandb_records(run_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    got.setdefault(key, []).append((row["_step"], value))
    return {key: sorted(series) for key, series in got.items()}


def test_wandb_history_of_a_killed_and_resumed_run_is_metrics_jsonl(tmp_path, monkeypatch):
    """Killed after logging step 5 with its checkpoint at step 3: the resumed run replays steps 4
    and 5, which W&B already holds (offline, W&B itself knows nothing of them); the two offline run
    files together hold each step once, the values of metrics.jsonl (the killed process's
    measured speeds aside)."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'kdgraph[wandb]')")
    from kdgraph.runtime.loop import train
    from kdgraph.runtime.metrics import Metrics

    class Killed(BaseException):
        pass

    write = Metrics.write

    def killed_at_step_5(self, record):
        write(self, record)
        if record["kind"] == "step" and record["global_step"] == 5:
            raise Killed

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "kdgraph-test"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(tiny_spec(tmp_path / "run", "supervised", epochs=2, fraction=0.1,
                               runtime={"report_to": ["wandb"], "log_every": 1, "checkpoint_every": 3}))
    monkeypatch.setattr(Metrics, "write", killed_at_step_5)
    with pytest.raises(Killed):
        train_here(spec)
    wandb.teardown()  # the killed process's W&B run ends where it stopped
    monkeypatch.setattr(Metrics, "write", write)
    folder = RunFolder(tmp_path / "run")
    assert max(s for s, _ in _wandb_history(folder)["step/loss"]) == 5 > max(
        r["global_step"] for r in _steps_kept(folder))
    train(spec, resume=True)
    expected, got = _expected_series(folder), _wandb_history(folder)
    assert any(step <= 5 for step, _ in expected["step/loss"]) and max(s for s, _ in expected["step/loss"]) > 5
    assert got.keys() == expected.keys()
    for key, series in expected.items():
        if key in ("step/images_per_s", "step/data_wait_share"):
            got[key], series = [s for s, _ in got[key]], [s for s, _ in series]
        assert got[key] == sorted(series), key


def test_a_resumed_online_wandb_run_gets_no_step_below_wandbs_own(tmp_path, monkeypatch):
    """W&B online resumes a run at its last step + 1 (``run.step``; ``run.resumed``) and drops any
    lower step with a warning: the tracker sends none of them, nor a step metrics.jsonl shows the
    killed process sent for that kind; a new run (--force) sends every step. A stand-in wandb
    module records the calls."""
    import sys
    import types

    from kdgraph.runtime.trackers import WandbTracker, logged_steps

    calls = []

    class Run:
        def __init__(self, resumed):
            self.resumed, self.step = resumed, 7 if resumed else 0

        def log(self, values, step):
            calls.append((step, sorted(values)))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: Run(resumed=kw["resume"] == "allow")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    folder = RunFolder(tmp_path / "run")
    (folder.root / "wandb" / "run-20260101_000000-abc123").mkdir(parents=True)
    (folder.root / "wandb" / "latest-run").symlink_to(folder.root / "wandb" / "run-20260101_000000-abc123")
    folder.metrics.write_text("".join(json.dumps(r) + "\n" for r in (
        {"kind": "step", "global_step": 8, "loss": 1.0}, {"kind": "epoch", "global_step": 6, "loss": 1.0},
        {"kind": "step", "global_step": 9, "loss": 1.0})) + '{"kind": "step", "global_st')  # a line cut short
    assert logged_steps(folder.metrics) == {"step": 9, "epoch": 6}
    records = [{"kind": kind, "global_step": step, "loss": 0.5} for kind, step in
               (("epoch", 6), ("step", 7), ("step", 8), ("step", 9), ("epoch", 7), ("step", 10))]
    resumed = WandbTracker(folder, {"name": "x"}, {}, resumed=True)
    for r in records:
        resumed.log(r)
    assert calls == [(7, ["epoch/loss"]), (10, ["step/loss"])]
    calls.clear()
    fresh = WandbTracker(folder, {"name": "x"}, {}, resumed=False)
    for r in records:
        fresh.log(r)
    assert [step for step, _ in calls] == [6, 7, 8, 9, 7, 10]
