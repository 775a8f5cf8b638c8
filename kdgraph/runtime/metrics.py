"""What a run records as it goes: metrics.jsonl (and TensorBoard scalars, and the trackers of
``runtime.report_to``), and the time its loop waits for data."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime, timezone

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import RunFolder


class Metrics:
    """metrics.jsonl, appended line by line (main rank only); with ``tensorboard``, every
    numeric field also as a TensorBoard scalar ``KIND/FIELD`` at the record's global step, and
    to each tracker of the stored spec's ``runtime.report_to`` (kdgraph.runtime.trackers)."""

    def __init__(self, folder: RunFolder, enabled: bool, keep_until_step: int | None, tensorboard: bool = False):
        self.path, self.enabled = folder.metrics, enabled
        self.board, self.trackers = None, []
        if not enabled:
            return
        from kdgraph.runtime.trackers import open_trackers, reported_to

        tensorboard = tensorboard or "tensorboard" in reported_to(folder)
        if tensorboard:  # a missing package is said before any tracker starts a run
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise KDGraphError("runtime.log: tensorboard needs the tensorboard package; install it with "
                                   "pip install 'kdgraph[tensorboard]' (or pip install tensorboard)") from None
        # before metrics.jsonl is cut back: W&B's tracker reads how far the killed process got
        self.trackers = open_trackers(folder, resumed=keep_until_step is not None)
        lines = []
        if keep_until_step is not None and self.path.exists():  # resume: drop what the checkpoint lost
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["global_step"] <= keep_until_step]
        self.path.write_text("".join(ln + "\n" for ln in lines))
        if tensorboard:
            # purge_step: a resumed run drops the events the checkpoint did not keep, as metrics.jsonl does
            self.board = SummaryWriter(str(folder.tensorboard),
                                       purge_step=None if keep_until_step is None else keep_until_step + 1)

    def write(self, record: dict) -> None:
        if self.enabled:
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.board is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                        self.board.add_scalar(f"{record['kind']}/{key}", value, record["global_step"])
                if record["kind"] == "epoch":
                    self.board.flush()
            for tracker in self.trackers:
                tracker.log(record)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        for tracker in self.trackers:
            tracker.close()

    def read(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


class WaitTimed:
    """A batch iterator that adds up, in ``waited``, the seconds spent waiting for its next
    batch (timm's train loop logs the same as data_time)."""

    def __init__(self, batches: Iterable):
        self.batches, self.waited = iter(batches), 0.0

    def __iter__(self) -> WaitTimed:
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - t0
