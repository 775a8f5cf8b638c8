"""Consistent teaching (Beyer et al. 2022): data.mixup mixes the one batch that the teacher and
the student both see, the CE term gets the mixed labels, and a run resumed mid-epoch is bit
for bit the uninterrupted one. DKD's warm-up reads the training progress the loop passes.

Independent truth: the tensors themselves (identity of the teacher's and the student's input
at every step; ``MixupCutmix`` on the loader's batch recomputed here), and run A, never
interrupted, against run B, stopped and resumed."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from _runtime_helpers import tiny_spec, train_here
from safetensors.torch import load_file

from kdgraph.runtime import loop
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.teacher import FrozenTeacher
from kdgraph.spec import load_spec
from kdgraph.transforms import MixupCutmix

MIXUP = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}


def _spec(out, **loss):
    return load_spec(tiny_spec(out, "kd", epochs=2, batch_size=16, fraction=0.25,
                               data={"mixup": MIXUP, "augment": "crop+flip"},
                               loss={"ce_weight": 0.0, **loss}, runtime={"checkpoint_every": 0, "log_every": 1}))


def test_teacher_and_student_see_the_same_mixed_batch_at_every_step(tmp_path, monkeypatch):
    seen = []
    real_forward, real_features = Distiller.forward, FrozenTeacher.features

    def forward(self, x, y, progress=None):
        seen.append({"student": x, "labels": y})
        return real_forward(self, x, y, progress)

    def features(self, x, needed):
        seen[-1]["teacher"] = x
        return real_features(self, x, needed)

    monkeypatch.setattr(Distiller, "forward", forward)
    monkeypatch.setattr(FrozenTeacher, "features", features)
    batches = []
    real_mix = MixupCutmix.__call__

    def mix(self, x, y, *args, **kwargs):
        batches.append((x.clone(), y.clone(), args))
        return real_mix(self, x, y, *args, **kwargs)

    monkeypatch.setattr(MixupCutmix, "__call__", mix)
    train_here(_spec(tmp_path / "run"))
    assert len(seen) == len(batches) > 4
    for step, (raw, labels, args) in zip(seen, batches):
        assert step["teacher"] is step["student"]  # one tensor, not two equal ones
        assert step["labels"].dtype == torch.float32 and step["labels"].shape == (len(labels), 10)
        want_x, want_y = real_mix(MixupCutmix(**MIXUP, label_smoothing=0.0), raw, labels, *args)
        assert torch.equal(step["student"], want_x) and torch.equal(step["labels"], want_y)
    assert any(not torch.equal(s["student"], raw) for s, (raw, _, _) in zip(seen, batches))  # it does mix


@pytest.mark.parametrize("loss", [{}, {"logit": "dist"}], ids=["kl", "dist"])
def test_resume_mid_epoch_with_mixup_is_bit_identical(tmp_path, monkeypatch, loss):
    summary_a = train_here(_spec(tmp_path / "a", **loss))
    real_step, calls = loop.Trainer.train_step, {"n": 0}

    def stopping_step(trainer, xb, yb):
        out = real_step(trainer, xb, yb)
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the loop saves and stops
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", stopping_step)
    with pytest.raises(loop.TrainingInterrupted):
        train_here(_spec(tmp_path / "b", **loss))
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    summary_b = loop.train(_spec(tmp_path / "b", **loss), resume=True)
    a, b = load_file(str(tmp_path / "a" / "student.safetensors")), load_file(str(tmp_path / "b" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda out: [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                         if r["kind"] == "step"]
    keep = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_share", "time")}  # noqa: E731
    assert [keep(r) for r in steps(tmp_path / "a")] == [keep(r) for r in steps(tmp_path / "b")]
    assert summary_a["student_top1"] == summary_b["student_top1"]


def test_dkd_reads_the_progress_of_each_step(tmp_path, monkeypatch):
    """The loop passes the epochs done by the end of each step, e + (i + 1) / n, to the DKD
    head (its warm-up factor is min(that / dkd_warmup_epochs, 1), tested in test_logit_losses)."""
    from kdgraph.losses import DecoupledKDHead

    seen, real = [], DecoupledKDHead.forward

    def forward(self, s, y, t, progress=None):
        seen.append(float(progress))
        return real(self, s, y, t, progress)

    monkeypatch.setattr(DecoupledKDHead, "forward", forward)
    spec = load_spec(tiny_spec(tmp_path / "run", "kd", epochs=2, batch_size=16, fraction=0.25,
                               loss={"logit": "dkd", "dkd_warmup_epochs": 2.0}, runtime={"log_every": 1}))
    train_here(spec)
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    n = max(r["step"] for r in steps)
    assert seen == pytest.approx([r["epoch"] + r["step"] / n for r in steps])
    assert all({"ce", "tckd", "nckd"} <= set(r) for r in steps)


def test_streamed_resume_with_mixup_is_bit_identical(tmp_path, monkeypatch):
    """The streamed path (an image folder decoded by workers) mixes the same way: run B,
    stopped mid-epoch and resumed, ends with run A's student and per-step losses."""
    from test_stream import folder_spec, write_folder

    root = write_folder(tmp_path / "images")

    def spec(name):
        s = folder_spec(root, tmp_path / name, workers=0)
        s["data"]["mixup"] = MIXUP
        return load_spec(s)

    train_here(spec("a"))
    real_step, calls = loop.Trainer.train_step, {"n": 0}

    def stopping_step(trainer, xb, yb):
        out = real_step(trainer, xb, yb)
        calls["n"] += 1
        if calls["n"] == 8:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", stopping_step)
    with pytest.raises(loop.TrainingInterrupted):
        train_here(spec("b"))
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    loop.train(spec("b"), resume=True)
    a, b = load_file(str(tmp_path / "a" / "student.safetensors")), load_file(str(tmp_path / "b" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
