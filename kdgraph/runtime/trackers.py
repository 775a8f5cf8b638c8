"""Experiment trackers beside metrics.jsonl: ``runtime.report_to: [mlflow, wandb]`` (TensorBoard
is ``Metrics``' own writer). Each gets the resolved spec and the plan as parameters when the run
starts and every number of every metrics.jsonl record at its global step, under the name
``KIND/FIELD`` (``epoch/student_top1``), as TensorBoard does.

The spec and plan are read from the run folder (``run.json``, ``plan.json``), which the run
writes before its first record, so ``Metrics`` opens the trackers itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import RunFolder

__all__ = ["flat_params", "logged_steps", "numbers", "open_trackers", "reported_to", "MLflowTracker", "WandbTracker"]

MLFLOW_BATCH = 100  # MLflow's most params (and metrics, 1000) per log_batch call
MLFLOW_VALUE_MAX = 6000  # MLflow's longest param value


def _missing(tracker: str, package: str) -> KDGraphError:
    return KDGraphError(f"runtime.report_to: {tracker} needs the {package} package; install it with "
                        f"pip install 'kdgraph[{tracker}]' (or pip install {package})")


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as {dotted.key: text}: lists by index (``plan.stages.0.epochs``), leaves as JSON."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix.rstrip("."): value if isinstance(value, str) else json.dumps(value)}
    out: dict[str, str] = {}
    for key, sub in items:
        out.update(flat_params(sub, f"{prefix}{key}."))
    return out


def numbers(record: dict) -> dict[str, float]:
    """{KIND/FIELD: value} of a metrics record's numbers (not its step, not booleans)."""
    return {f"{record['kind']}/{key}": float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step"}


def _run_files(folder: RunFolder) -> tuple[dict, dict]:
    """(resolved spec, plan) of the run in ``folder``; {} for a file not written."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}
    return read(folder.stored_spec).get("spec", {}), read(folder.plan)


def reported_to(folder: RunFolder) -> list[str]:
    """The spec's ``runtime.report_to`` as the run stored it, each tracker once."""
    stored, _ = _run_files(folder)
    return list(dict.fromkeys(stored.get("runtime", {}).get("report_to", [])))


class MLflowTracker:
    """A run in MLflow: MLFLOW_TRACKING_URI, else a file store in OUTPUT/mlruns (experiment: the
    spec's name). A resumed run continues the MLflow run tagged with its output folder and logs
    only the steps past those it holds per metric (the killed process's measured speeds stay)."""

    def __init__(self, folder: RunFolder, stored_spec: dict, plan: dict, resumed: bool):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self._metric, where = Metric, str(folder.root.resolve())
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (folder.root.resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless this is set
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        self.held: dict[str, int] | None = None  # a resumed run's last step per metric (None: a new run)
        name = stored_spec.get("name", "kdgraph")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        earlier = [r for r in client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
                   if r.data.tags.get("kdgraph.output") == where] if resumed else []
        if earlier:
            self.run_id, self.held = earlier[0].info.run_id, {}
            client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = client.create_run(experiment_id, run_name=name, tags={"kdgraph.output": where}).info.run_id
        params = [Param(key[:250], text[:MLFLOW_VALUE_MAX]) for key, text in
                  {**flat_params(stored_spec, "spec."), **flat_params(plan, "plan.")}.items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            client.log_batch(self.run_id, params=params[start:start + MLFLOW_BATCH])

    def _new(self, key: str, step: int) -> bool:
        """Whether the run lacks ``key`` at ``step``: a resumed run re-runs the steps after its
        checkpoint, which the killed process may have logged already (metrics.jsonl drops them)."""
        if self.held is None:
            return True
        if key not in self.held:
            self.held[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
        return step > self.held[key]

    def log(self, record: dict) -> None:
        stamp, step = int(time.time() * 1000), record["global_step"]
        metrics = [self._metric(key, value, stamp, step) for key, value in numbers(record).items()
                   if self._new(key, step)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def logged_steps(path: Path) -> dict[str, int]:
    """{kind: last global step} of the records in metrics.jsonl at ``path`` (a line a kill cut
    short: passed over); {} before any."""
    last: dict[str, int] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "kind" in record and "global_step" in record:
            last[record["kind"]] = max(last.get(record["kind"], -1), int(record["global_step"]))
    return last


class WandbTracker:
    """A W&B run with its files in OUTPUT/wandb; project WANDB_PROJECT, else "kdgraph". The mode is
    W&B's own (kdgraph sets no WANDB_MODE): online needs an account and the network, the user's
    WANDB_MODE=offline neither. A resumed run continues the latest W&B run there and, as with
    MLflow, logs only the steps past those already sent: W&B keeps one step per run, only ever
    increasing (an online resumed run starts at its last step + 1 and drops lower ones with a
    warning; an offline one knows no history and would hold the replayed steps twice), so a
    record is sent where its step is at least W&B's and past the last one of its kind in
    metrics.jsonl as the killed process left it (read before the resume cuts it back)."""

    def __init__(self, folder: RunFolder, stored_spec: dict, plan: dict, resumed: bool):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        latest = folder.root / "wandb" / "latest-run"
        run_id = latest.resolve().name.rsplit("-", 1)[-1] if resumed and latest.exists() else None
        (folder.root / "wandb").mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdgraph"), name=stored_spec.get("name"),
                                  dir=str(folder.root), config={"spec": stored_spec, "plan": plan}, id=run_id,
                                  resume="allow" if run_id else None, reinit="create_new")
        except Exception as exc:  # W&B's errors (login, network, a bad WANDB_* setting) as one line
            raise KDGraphError(f"runtime.report_to: wandb.init failed: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:400]} (WANDB_MODE=offline needs no account)") from None
        self.sent = logged_steps(folder.metrics) if resumed else {}
        self.first_step = self.run.step if resumed and self.run.resumed else 0

    def log(self, record: dict) -> None:
        values, step = numbers(record), record["global_step"]
        if values and step >= self.first_step and step > self.sent.get(record["kind"], -1):
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"mlflow": MLflowTracker, "wandb": WandbTracker}


def open_trackers(folder: RunFolder, resumed: bool) -> list:
    """The trackers the run's spec reports to (besides TensorBoard, which ``Metrics`` writes)."""
    names = [name for name in reported_to(folder) if name in TRACKERS]
    if not names:
        return []
    stored_spec, plan = _run_files(folder)
    return [TRACKERS[name](folder, stored_spec, plan, resumed) for name in names]
