"""Progress reporting: rich bars on a terminal, plain lines in CI (--quiet or no TTY)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


PLAIN_EVERY_S = 30.0  # seconds between plain step lines without a terminal


class Reporter:
    def __init__(self, quiet: bool, total_epochs: int, steps_per_epoch: int, silent: bool = False):
        """``quiet``: plain lines instead of bars; ``silent``: nothing at all (DDP ranks > 0)."""
        self.quiet = quiet or silent
        self.silent = silent
        # soft_wrap: one unwrapped line per record without a terminal (CI, nohup, Slurm logs)
        self.console = Console(highlight=False, soft_wrap=True, markup=False)  # notes hold user paths
        self.total_epochs, self.steps = total_epochs, steps_per_epoch
        self.t0 = time.monotonic()
        self.first_epoch: int | None = None
        self.last_plain: float | None = None  # when the last plain step line was printed
        # The ETA's clock starts when the run's first step ends: that step pays the start-up
        # (workers spawning, compilation, allocator and autotuner warm-up), the others do not.
        self.steps_done = 0
        self.warm: tuple[float, int] | None = None  # (time, steps done) when the first step ended
        self.progress = None if self.quiet else Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
            self.run_task = self.progress.add_task("epochs", total=self.total_epochs, info="")
            self.step_task = self.progress.add_task("steps ", total=self.steps, info="")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False

    def note(self, text: str) -> None:
        if not self.silent:
            self.console.print(text)

    def start_epoch(self, epoch: int, stage, start_step: int) -> None:
        if self.first_epoch is None:
            self.first_epoch, self.t0 = epoch, time.monotonic()
        groups = " ".join("[" + ",".join(map(str, g)) + "]" for g in stage.groups)
        if self.progress is not None:
            self.progress.update(self.run_task, completed=epoch + start_step / max(self.steps, 1),
                                 info=f"stage {stage.index}: {groups}")
            self.progress.reset(self.step_task, total=self.steps, completed=start_step)
        elif start_step and not self.silent:
            self.console.print(f"resuming epoch {epoch} at step {start_step}")

    def advance(self) -> None:
        self.steps_done += 1
        if self.warm is None:
            self.warm = (time.monotonic(), self.steps_done)
        if self.progress is not None:
            self.progress.advance(self.step_task)
            # the epochs bar moves by steps too, so its time-remaining column has a speed before an epoch ends
            self.progress.advance(self.run_task, 1 / max(self.steps, 1))

    def log(self, record: dict) -> None:
        info = f"loss {record['loss']:.4f} lr {record['lr']:.3g} {record['images_per_s']:.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.step_task, info=info)
            return
        # Without a terminal, a plain line every PLAIN_EVERY_S (the first at once): an epoch can
        # take minutes, and a log that says nothing until it ends looks like a hang.
        now = time.monotonic()
        if not self.silent and (self.last_plain is None or now - self.last_plain >= PLAIN_EVERY_S):
            self.last_plain = now
            self.console.print(f"epoch {record['epoch'] + 1}/{self.total_epochs} step {record['step']}/{self.steps}: "
                               f"{info} | elapsed {_clock(now - self.t0)}")

    def end_epoch(self, record: dict) -> None:
        acc = record["student_top1"]
        losses = " ".join(f"{k[6:]} {v:.4f}" for k, v in record.items() if k.startswith("train_"))
        line = (f"stage {record['stage']} epoch {record['epoch'] + 1}/{self.total_epochs}: {losses}"
                + (f" | top-1 {acc:.2f}% top-5 {record['student_top5']:.2f}%" if acc is not None else "")
                + (f" mIoU {record['student_miou']:.2f}%" if record.get("student_miou") is not None else "")
                + f" | {record['images_per_s']:.0f} img/s"
                + (f", {record['data_wait_share']:.0%} of it waiting for data"
                   if record.get("data_wait_share", 0) >= 0.05 else ""))
        elapsed = time.monotonic() - self.t0
        line += f" | elapsed {_clock(elapsed)}, ETA {_clock(self._eta(record['epoch']))}"
        if self.progress is not None:
            self.progress.update(self.run_task, completed=record["epoch"] + 1)
            self.progress.console.print(line)
        elif not self.silent:
            self.console.print(line)


    def _eta(self, epoch: int) -> float:
        """Seconds left after ``epoch``: the time per step since the first step ended (evaluation
        and checkpoints included, start-up not) times the steps left; before a second step, the
        time per epoch so far."""
        now, left = time.monotonic(), self.total_epochs - epoch - 1
        if self.warm is not None and self.steps_done > self.warm[1]:
            return (now - self.warm[0]) / (self.steps_done - self.warm[1]) * left * self.steps
        return (now - self.t0) / max(epoch + 1 - (self.first_epoch or 0), 1) * left


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
