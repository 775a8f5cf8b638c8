"""What a run records as it goes: metrics.jsonl (and TensorBoard scalars, and the trackers of
``runtime.report_to``), and the time its loop waits for data."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

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
        # resume: drop what the checkpoint lost (read, and refused, before any tracker starts)
        lines = [] if keep_until_step is None else kept_lines(self.path, keep_until_step)
        # before metrics.jsonl is cut back: W&B's tracker reads how far the killed process got
        self.trackers = open_trackers(folder, resumed=keep_until_step is not None)
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


def kept_lines(path: Path, until_step: int) -> list[str]:
    """The lines of metrics.jsonl at ``path`` whose record's global step is at most ``until_step``.
    A last line without its newline is one a kill cut short (``Metrics.write`` writes a record
    and its newline in one call): kept if it still reads as a record, else dropped. Any other
    line that is not a record (a whole line, so not a kill's doing) is refused, the file left as it is."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")  # bytes that are no text: a line that is no record
    lines = text.splitlines()
    last_cut_short = bool(lines) and not text.endswith("\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["global_step"] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            step = None
        if isinstance(step, int) and not isinstance(step, bool):
            if step <= until_step:
                kept.append(line)
        elif number < len(lines) or not last_cut_short:
            raise KDGraphError(f"{path}: line {number} is not a metrics record (JSON with a global_step); "
                               "kdgraph wrote none such: mend or remove that line, then resume again")
    return kept


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
