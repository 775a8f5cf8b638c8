"""``Task``: what a run of one task asks of its task (see ``kdgraph.tasks``). Its defaults are
an image classifier's: a batch is (images, labels) with no side inputs, the head loss is the
spec's logit loss, the score is top-1/top-5 and a higher top-1 is better, nothing is reported
beyond the scores, and the student ships in timm's layout. Where a method takes ``spec``, the
runtime hands it the run's ``RunRecord`` (``Compiled.run``: the spec's sections, resolved by
the compiler); a loaded ``Spec`` reads the same."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kdgraph.errors import KDGraphError

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled, RunRecord
    from kdgraph.spec import Spec

Batch = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]  # (input, target, side inputs)


class Task:
    """One task. A subclass sets ``name`` (its ``TASKS`` entry) and overrides what differs."""

    name: ClassVar[str] = ""
    # the kdgraph.losses.LOSSES head entries of its own head loss (with a teacher, without), or a
    # function of the spec's loss block giving them; None: the spec's loss.logit (cross-entropy
    # alone without a teacher)
    head_loss: ClassVar[tuple[str, str] | Callable[[Any], tuple[str, str]] | None] = None
    metrics: ClassVar[tuple[str, ...]] = ("top1", "top5")  # the scores records and summaries keep
    best_metric: ClassVar[str] = "top1"  # the score a new best is chosen by
    higher_is_better: ClassVar[bool] = True
    indexed: ClassVar[bool] = False  # its batches carry their samples' dataset indices
    # False for `kdgraph eval`: build_data writes nothing under the spec's output folder
    writes_output: bool = True

    def __init__(self, spec: Spec | RunRecord, compiled: Compiled):
        self.seed = spec.seed
        self.num_classes = compiled.num_classes

    # ------------------------------------------------------------------ batches

    def build_data(self, spec: Spec | RunRecord, plan, device: torch.device, dist_info, channels_last: bool = False):
        """The run's data (``kdgraph.data.Data``: its train, validation and test loaders)."""
        from kdgraph.data import build_data

        return build_data(spec, plan, device, dist_info, channels_last)

    def check_data(self, data, dataset: str) -> None:
        """Refuse data the run cannot learn from, before training."""
        if self.num_classes is not None and data.num_classes > self.num_classes:
            raise KDGraphError(f"{dataset} has {data.num_classes} classes but the student predicts "
                               f"{self.num_classes}: set student.kwargs.num_classes: {data.num_classes}")

    def batches(self, loader, epoch: int, start: int = 0) -> Iterator:
        """(x, y, sample indices or None) of ``loader``'s ``epoch`` from step ``start``."""
        if self.indexed:
            return loader.epoch_indexed(epoch, start)
        return ((xb, yb, None) for xb, yb in loader.epoch(epoch, start))

    def prepare(self, xb: torch.Tensor, yb: torch.Tensor, idx, epoch: int, step: int, mix: Callable) -> Batch:
        """The training step's (input, target, side inputs): the batch, mixed by ``mix`` (the
        run's consistent teaching, ``mix(x, y, epoch, step)``)."""
        return (*mix(xb, yb, epoch, step), ())

    def inputs(self, xb: torch.Tensor, yb: torch.Tensor, idx) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """What the student's inference reads of an epoch-0 batch (BatchNorm re-estimation)."""
        return xb, ()

    def fit_batches(self, loader) -> Iterator:
        """The batches of the projection fit (epoch 0): (x, y) or (x, y, side inputs)."""
        return loader.epoch(0)

    # ------------------------------------------------------------------ scores

    def score(self, forward: Callable, loader, device: torch.device, precision: str = "fp32",
              channels_last: bool = False) -> dict[str, float]:
        """``forward`` on ``loader`` (a run's evaluation): {'top1', 'top5'} in %."""
        from kdgraph.runtime.evaluate import accuracy  # at call time: the import floors stay at six

        return accuracy(forward, loader, device, precision, channels_last)

    def score_trained(self, model: torch.nn.Module, loader, device: torch.device, precision: str) -> dict[str, float]:
        """A trained model on ``loader`` (`kdgraph eval`)."""
        return self.score(model, loader, device, precision)

    def better(self, score: dict[str, float], best: float | None) -> bool:
        """``score`` beats ``best`` (None: nothing yet); a tie keeps the earlier one."""
        value = score[self.best_metric]
        return best is None or (value > best if self.higher_is_better else value < best)

    def describe(self, score: dict[str, float]) -> str:
        """One line of ``score``, as the run's notes print it."""
        return f"top-1 {score['top1']:.2f}%, top-5 {score['top5']:.2f}%"

    @classmethod
    def headline(cls, summary: dict, teacher: bool = False) -> str | None:
        """The student's score of a run's summary (None where it has none: a rank other than
        the main one); with ``teacher`` the teacher's too."""
        if summary.get("student_top1") is None:
            return None
        top5 = f" (top-5 {summary['student_top5']:.2f}%)" if teacher else ""
        return f"student top-1 {summary['student_top1']:.2f}%{top5}" + (
            f", teacher top-1 {summary['teacher_top1']:.2f}%" if teacher and summary.get("teacher_top1") is not None
            else "")

    @classmethod
    def render_heads(cls, compiled: Compiled) -> list[tuple[str, str]] | None:
        """The plan's rows for the head block, (head name, what it predicts) each, where the task
        names its heads itself; None: one row of ``num_classes`` logits (the renderer's)."""
        return None

    # ------------------------------------------------------------------ reports and export

    def reports(self, run) -> dict:
        """What the main rank reports after training besides the scores (``run``: the Trainer)."""
        return {}

    def reports_elsewhere(self, run) -> dict:
        """What another rank does while the main one reports (a sharded teacher's share)."""
        return {}

    @classmethod
    def layouts(cls) -> tuple:
        """The export folders of other libraries' layouts its students ship in
        (``kdgraph.runtime.ship.FolderLayout``), which eval and export read back."""
        return ()

    @classmethod
    def check_export(cls, spec: Spec | RunRecord) -> None:
        """Refuse, before anything is built, a student this task cannot ship."""

    def ship(self, spec: Spec | RunRecord, compiled: Compiled, maps: dict, path: Path, to: Path, command: str) -> dict:
        """The trained student (loaded into ``compiled.student.model``, its folded adapter maps
        ``maps``, read from ``path``) as a folder timm loads, with preprocessing and card."""
        from kdgraph.data import build_data
        from kdgraph.runtime import ship
        from kdgraph.runtime.export import preprocessing_of
        from kdgraph.runtime.runs import RunFolder
        from kdgraph.runtime.techniques import DistInfo

        summary_file = RunFolder(spec.output_dir).summary
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        preprocessing = summary.get("preprocessing")
        if preprocessing is None:  # a run stopped before its summary: read the data as training did
            preprocessing = preprocessing_of(spec, build_data(spec, compiled.data, torch.device("cpu"), DistInfo()))
        card = {"top1": summary.get("student_top1"), "top5": summary.get("student_top5"),
                "teacher_top1": summary.get("teacher_top1"), "method": compiled.plan.method,
                "resize": preprocessing.get("resize"), "weights_from": str(path), "command": command}
        compiled.student.model.eval()
        return ship.ship_student(compiled, maps, to, preprocessing, card)

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name}
