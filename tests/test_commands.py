"""kdgraph.runtime.commands: `kdgraph eval` on a run's student.safetensors against the same student
run by hand over the test split (its size from scikit-learn's own split), the splits, the
teacher's scores only where its weights are at hand, and the refusals said before anything is built.
(export's refusal of a user's folder: tests/test_hostile_inputs.py, through the CLI.)"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.runtime.commands import evaluate_spec
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec

FRACTION = 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A kd run's folder holding the untrained student's student.safetensors (written by
    export_student, as the loop writes it) and the in-memory student it came from."""
    from kdgraph.compiler import compile_spec
    from kdgraph.runtime.distiller import Distiller
    from kdgraph.runtime.export import export_student

    out = tmp_path_factory.mktemp("commands") / "run"
    spec = load_spec(tiny_spec(out, "kd", epochs=1, fraction=FRACTION))
    torch.manual_seed(0)
    compiled = compile_spec(spec)
    distiller = Distiller(compiled).eval()
    export_student(distiller, compiled, out / "student.safetensors")
    return spec, compiled, out


def _digits_split_sizes() -> tuple[int, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(d.target, test_size=0.2, random_state=0, stratify=d.target)
    return len(tr), len(te)


def test_eval_scores_the_runs_student_as_run_by_hand(run):
    from kdgraph.runtime.techniques import DistInfo
    from kdgraph.tasks.create import create_task

    spec, compiled, out = run
    got = evaluate_spec(spec)
    assert got["split"] == "test" and got["samples"] == _digits_split_sizes()[1]
    data = create_task(compiled.run, compiled).build_data(compiled.run, compiled.data, torch.device("cpu"), DistInfo())
    student = compiled.student.model.eval()
    hits, hits5 = [], []
    with torch.no_grad():
        for x, y in data.test.epoch(0):
            logits = student(x).numpy()
            order = np.argsort(-logits, axis=1)
            hits += list(order[:, 0] == y.numpy())
            hits5 += list((order[:, :5] == y.numpy()[:, None]).any(axis=1))
    assert len(hits) == got["samples"]
    assert got["student_top1"] == pytest.approx(100 * np.mean(hits)) and got["student_top5"] == pytest.approx(
        100 * np.mean(hits5))
    # the teacher has no checkpoint and is not pretrained: its weights are not at hand, it is not scored
    assert not any(k.startswith("teacher") for k in got)
    assert evaluate_spec(spec, out / "student.safetensors") == got  # --checkpoint: the same file, the same scores


def test_the_training_split_is_the_one_the_fraction_selects(run):
    """Its size from data.fraction, scored unaugmented: the student run by hand over the
    training split's samples, each normalised (x - mean) / std with the run's statistics."""
    from kdgraph.runtime.techniques import DistInfo
    from kdgraph.tasks.create import create_task

    spec, compiled, _ = run
    got = evaluate_spec(spec, split="train")
    assert got["split"] == "train" and got["samples"] == round(FRACTION * _digits_split_sizes()[0])
    train = create_task(compiled.run, compiled).build_data(compiled.run, compiled.data, torch.device("cpu"),
                                                           DistInfo()).train
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in train.norm)
    x, y = (train.x.float() - mean) / std, train.y.numpy()
    assert len(y) == got["samples"]
    with torch.no_grad():
        order = np.argsort(-compiled.student.model.eval()(x).numpy(), axis=1)
    assert got["student_top1"] == pytest.approx(100 * np.mean(order[:, 0] == y))
    assert got["student_top5"] == pytest.approx(100 * np.mean((order[:, :5] == y[:, None]).any(axis=1)))


def test_eval_refuses_an_unknown_split_and_a_missing_checkpoint(run, tmp_path):
    spec, _, _ = run
    with pytest.raises(KDGraphError, match="unknown split 'val'; splits: test, train"):
        evaluate_spec(spec, split="val")
    missing = tmp_path / "nothing.pt"
    with pytest.raises(KDGraphError, match=rf"^no trained student at {re.escape(str(missing))}$") as err:
        evaluate_spec(spec, missing)
    assert "\n" not in str(err.value)
