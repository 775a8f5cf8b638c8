"""kdgraph.tasks: a task is one registered entry. The built-in tasks answer for what was
special-cased in the runtime, and a new task, written here and touching no file of kdgraph/
(``register_task`` and ``LOSSES.register`` are its only contact), trains, evaluates, resumes
its teacher's score and exports through the real runtime.

The toy task is rotation prediction (Gidaris et al. 2018): a batch is its images each turned
by k quarter turns, k drawn from (seed, epoch, step), the target k; its head loss is its own
(cross-entropy on k plus KL to the teacher); its metric the share of test images whose turn
is recognised (each test image i turned by i mod 4); its export a folder of its own layout.
Independent truth: the turns and the metric recomputed here by hand from the trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from _runtime_helpers import tiny_spec
from kdgraph.losses import LOSSES
from kdgraph.registry import TASK_HEAD_LOSSES, TASKS
from kdgraph.spec import load_spec
from kdgraph.tasks import register_task
from kdgraph.tasks.base import Task
from kdgraph.tasks.create import create_task, task_class

TURNS = 4


def turned(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each image x[i] turned by k[i] quarter turns (in the plane of its last two dims)."""
    return torch.stack([torch.rot90(xi, int(ki), dims=(-2, -1)) for xi, ki in zip(x, k)])


class RotationKD(nn.Module):
    """``rot = CE(k, z_s)`` plus ``kl = T^2 KL(softmax(z_t/T) || softmax(z_s/T))``."""

    summary = "cross-entropy on the quarter turns plus KL to the teacher"
    role = "head"
    terms = ("rot", "kl")
    params = {"temperature": "temperature"}

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student: torch.Tensor, turns: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                      reduction="batchmean", log_target=True) * t * t
        return {"rot": F.cross_entropy(student.float(), turns), "kl": kl}


class Rotation(Task):
    name = "rotation"
    head_loss = ("rotation_kd", "ce")
    metrics = ("rot_acc",)
    best_metric = "rot_acc"

    def check_data(self, data, dataset: str) -> None:
        """Any labels: the targets are the turns."""

    def draw(self, n: int, epoch: int, step: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + step)
        return torch.randint(0, TURNS, (n,), generator=g).to(device)

    def prepare(self, xb, yb, idx, epoch, step, mix):
        k = self.draw(len(xb), epoch, step, xb.device)
        return turned(xb, k), k, ()

    def score(self, forward, loader, device, precision="fp32", channels_last=False):
        hits, seen = 0, 0
        with torch.no_grad():
            for xb, _ in loader.epoch(0):
                k = torch.arange(seen, seen + len(xb), device=xb.device) % TURNS
                hits += int((forward(turned(xb, k)).argmax(1) == k).sum())
                seen += len(xb)
        return {"rot_acc": 100.0 * hits / max(seen, 1)}

    def describe(self, score):
        return f"turns recognised {score['rot_acc']:.2f}%"

    @classmethod
    def headline(cls, summary, teacher=False):
        value = summary.get("student_rot_acc")
        return None if value is None else f"student turns recognised {value:.2f}%"

    def ship(self, spec, compiled, maps, path, to, command):
        to.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in compiled.student.model.state_dict().items()},
                  str(to / "rotation.safetensors"))
        (to / "rotation.json").write_text(json.dumps({"turns": TURNS, "weights_from": str(path)}))
        return {"folder": str(to), "format": "rotation", "reason": None}


@pytest.fixture
def rotation_task():
    LOSSES.register("rotation_kd", RotationKD)
    register_task(Rotation)
    yield Rotation
    TASKS.unregister("rotation")
    TASK_HEAD_LOSSES.unregister("rotation")
    LOSSES.unregister("rotation_kd")


def _rotation_spec(out: Path):
    raw = tiny_spec(out, method="kd", blocks=1, epochs=2, task="rotation")
    for role in ("student", "teacher"):
        raw[role]["kwargs"]["num_classes"] = TURNS
    return load_spec(raw)


def test_a_new_task_trains_evaluates_and_exports_through_the_runtime(rotation_task, tmp_path):
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.commands import evaluate_spec, export_spec
    from kdgraph.runtime.loop import train

    spec = _rotation_spec(tmp_path / "run")
    compiled = compile_spec(spec)
    assert compiled.task == "rotation" and compiled.to_dict()["task"] == "rotation"
    head = [d for _, d in compiled.graph.nodes(data=True) if d.get("loss") == "head"]
    assert [d["entry"] for d in head] == ["rotation_kd"]

    summary = train(spec)
    assert summary["task"] == "rotation" and summary["student_top1"] is None
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"rot", "kl"} <= set(next(r for r in steps if r["kind"] == "step"))

    # the metric by hand: the final student's weights, each test image i turned by i mod 4
    from kdgraph.data import build_data
    from kdgraph.runtime.techniques import DistInfo

    model = compile_spec(spec).student.model.eval()
    model.load_state_dict(load_file(str(tmp_path / "run" / "student.safetensors")))
    data = build_data(spec, compiled.data, torch.device("cpu"), DistInfo())
    x = torch.cat([xb for xb, _ in data.test.epoch(0)])
    k = torch.arange(len(x)) % TURNS
    with torch.no_grad():
        by_hand = 100.0 * int((model(turned(x, k)).argmax(1) == k).sum()) / len(x)
    assert summary["student_rot_acc"] == pytest.approx(by_hand, abs=1e-9)
    epochs = [r for r in steps if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["student_rot_acc"])  # the earliest of equals, as a tie keeps it
    assert (summary["best_rot_acc"], summary["best_epoch"]) == (best["student_rot_acc"], best["epoch"] + 1)
    assert evaluate_spec(spec)["student_rot_acc"] == pytest.approx(by_hand, abs=1e-9)

    shipped = export_spec(spec, tmp_path / "ship")
    assert shipped["format"] == "rotation"
    weights = load_file(str(tmp_path / "ship" / "rotation.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_the_toy_task_draws_the_batch_it_declares(rotation_task, tmp_path):
    """prepare turns each image by the drawn k, the target is k, and the draw is a function of
    (seed, epoch, step): the same position draws the same turns (a resumed run's)."""
    spec = _rotation_spec(tmp_path / "run")
    from kdgraph.compiler import compile_spec

    task = create_task(spec, compile_spec(spec))
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    xb, k, side = task.prepare(x, torch.zeros(2, dtype=torch.long), None, 1, 5, mix=None)
    assert side == () and torch.equal(k, task.draw(2, 1, 5, "cpu"))
    for i in range(2):
        expected = x[i]
        for _ in range(int(k[i])):
            expected = torch.flip(expected.transpose(-2, -1), dims=(-2,))  # one quarter turn anticlockwise
        assert torch.equal(xb[i], expected)


def test_the_spec_names_its_task_and_refuses_one_not_registered(tmp_path):
    from kdgraph.errors import SpecError

    with pytest.raises(SpecError, match="task"):
        load_spec(tiny_spec(tmp_path, task="no-such-task"))
    with pytest.raises(SpecError, match="task"):
        load_spec(tiny_spec(tmp_path, task="denoise"))  # no denoise block


@pytest.mark.parametrize("name, best, higher", [("classification", "top1", True), ("dense", "miou", True),
                                                ("denoise", "mse", False), ("causal_lm", "bpb", False)])
def test_the_builtin_tasks_say_which_way_best_points(name, best, higher):
    cls = task_class(name)
    assert cls.name == name and cls.best_metric == best and cls.higher_is_better is higher
    task = object.__new__(cls)
    assert task.better({best: 2.0}, None)
    assert task.better({best: 2.0}, 1.0) is higher and task.better({best: 1.0}, 2.0) is not higher
    assert not task.better({best: 1.0}, 1.0)  # a tie keeps the earlier epoch


def test_plan_infers_the_task(tmp_path):
    from kdgraph.compiler import compile_spec

    assert compile_spec(load_spec(tiny_spec(tmp_path)), materialize=False).task == "classification"


def test_a_task_names_its_head_rows_its_loss_defaults_and_the_datasets_it_alone_reads(rotation_task, tmp_path):
    """The compiler and the plan read a task's own parts by registry, never by its name: its
    ``TASK_LOSS_DEFAULTS`` fill the loss fields left None (a value given stays), a dataset it
    alone reads (``DATASET_TASKS``) is refused to a run of another task, and the plan's head rows
    are its ``render_heads``."""
    import io

    from rich.console import Console

    from kdgraph.compiler import compile_spec
    from kdgraph.compiler.blockgraph import resolved_loss
    from kdgraph.errors import PlanError
    from kdgraph.registry import DATASET_TASKS, TASK_LOSS_DEFAULTS
    from kdgraph.render import blocks_table

    class Named(Rotation):
        @classmethod
        def render_heads(cls, compiled):
            return [("turns", f"{compiled.num_classes} quarter turns")]

    register_task(Named, overwrite=True)
    TASK_LOSS_DEFAULTS.register("rotation", {"ignore_index": 3})
    DATASET_TASKS.register("digits", "rotation")
    try:
        assert resolved_loss({"ignore_index": None}, "rotation")["ignore_index"] == 3
        assert resolved_loss({"ignore_index": 7}, "rotation")["ignore_index"] == 7
        assert resolved_loss({"ignore_index": None}, "classification")["ignore_index"] == -100
        compiled = compile_spec(_rotation_spec(tmp_path / "run"), allow_missing_weights=True, materialize=False)
        console = Console(file=io.StringIO(), width=200, record=True)
        console.print(blocks_table(compiled))
        rows = [line for line in console.export_text().splitlines() if "head" in line]
        assert len(rows) == 1 and "head turns" in rows[0] and "4 quarter turns" in rows[0]
        other = load_spec(tiny_spec(tmp_path / "other", method="kd", blocks=1, epochs=1))
        with pytest.raises(PlanError, match="data.dataset: digits is read by task rotation alone, but this is a "
                                            "classification run"):
            compile_spec(other, allow_missing_weights=True, materialize=False)
    finally:
        DATASET_TASKS.unregister("digits")
        TASK_LOSS_DEFAULTS.unregister("rotation")
