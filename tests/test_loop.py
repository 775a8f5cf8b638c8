"""kdgraph.runtime.loop: the Trainer built from the plan (no spec kept), the checkpoint's
records a resume checks (each changed, each refused), the non-finite stop, the epoch meter's
sums and rates, the stop signals and a finished run's resume, against values written out by hand."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from kdgraph.errors import KDGraphError
from kdgraph.runtime.loop import (EpochMeter, NonFiniteLoss, Trainer, check_finite, checkpoint_states, laid_out,
                                  legacy_teacher_scores, stop_signals, train)
from kdgraph.runtime.metrics import WaitTimed
from kdgraph.spec import Spec, load_spec

from _runtime_helpers import tiny_spec


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer.from_spec(load_spec(tiny_spec(tmp_path_factory.mktemp("loop") / "run", "stablekd",
                                                 runtime={"micro_batches": 2})))


def test_the_trainer_keeps_no_spec(trainer):
    assert not any(isinstance(v, Spec) for v in vars(trainer).values())
    assert trainer.config.micro_batches == 2 and trainer.config.device.type == "cpu"
    assert "micro_batches: 2" in str(trainer.config).splitlines()


def test_a_checkpoint_of_another_spec_or_plan_is_refused_naming_what_differs(trainer):
    record = trainer.compiled.run.to_dict()
    states = checkpoint_states(trainer, record)
    states["spec"].load_state_dict(record)  # its own: accepted
    moved = {**record, "name": "renamed", "output": "elsewhere"}
    states["spec"].load_state_dict(moved)  # a moved or renamed run trains the same
    other = {**record, "seed": record["seed"] + 1}
    with pytest.raises(KDGraphError, match=rf"another spec \(differs: seed: {record['seed'] + 1} -> "
                                           rf"{record['seed']}\); it is not this run's checkpoint"):
        states["spec"].load_state_dict(other)
    plan = trainer.plan.to_dict()
    states["plan"].load_state_dict(plan)
    for key, value in (("epochs", plan["epochs"] + 1), ("k", plan["k"] + 1), ("method", "kd")):
        stored = {**plan, key: value}
        with pytest.raises(KDGraphError, match=rf"last\.pt was written for another plan \({stored['method']}, "
                                               rf"{stored['epochs']} epochs\); resume with the spec it was trained "
                                               r"with, or choose another output$"):
            states["plan"].load_state_dict(stored)


def _changed(value):
    """Another value of the same record field (an int or str changed, a list cut, a dict grown)."""
    if isinstance(value, bool) or value is None:
        return 1 if value is None else not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1]
    return {**value, "changed": 1}


@pytest.mark.parametrize("key", ["method", "k", "n", "epochs", "tpp_block", "stages", "projection_fit",
                                 "teacher_shard", "teacher_dtype"])
def test_every_field_of_the_plan_record_guards_the_resume(trainer, key):
    """Each field of the plan a checkpoint records, changed alone, is refused (the list is the
    record's keys plus the two a sharded teacher adds: a new field fails the first assert)."""
    plan = trainer.plan.to_dict()
    assert set(plan) | {"teacher_shard", "teacher_dtype"} == {"method", "k", "n", "epochs", "tpp_block", "stages",
                                                              "projection_fit", "teacher_shard", "teacher_dtype"}
    states = checkpoint_states(trainer, trainer.compiled.run.to_dict())
    with pytest.raises(KDGraphError, match=r"last\.pt was written for another plan \("):
        states["plan"].load_state_dict({**plan, key: _changed(plan.get(key))})


def test_the_position_and_history_a_resume_restores(trainer):
    states = checkpoint_states(trainer, trainer.compiled.run.to_dict())
    before = (trainer.position, trainer.global_step, trainer.history, trainer.wall_before)
    try:
        states["position"].load_state_dict({"epoch": 1, "step": 4, "global_step": 9})
        history = {"wall_s": 12.5, "images": 100, "train_s": 3.0}
        states["history"].load_state_dict(history)
        assert trainer.position["step"] == 4 and trainer.global_step == 9 and trainer.wall_before == 12.5
        assert trainer.history == history and states["history"].state_dict() == history  # the whole record
        trainer.saving_at = (1, 4)
        assert states["position"].state_dict() == {"epoch": 1, "step": 4, "global_step": 9}
    finally:
        trainer.position, trainer.global_step, trainer.history, trainer.wall_before = before
        trainer.saving_at = (0, 0)


def test_laid_out_ignores_the_teachers_sharding_only_with_reshard():
    plan = {"method": "kd", "teacher_shard": True}
    assert laid_out(plan, reshard=False) is plan
    assert laid_out(plan, reshard=True) == {"method": "kd", "teacher_dtype": "float32"}
    assert laid_out({"teacher_shard": False, "teacher_dtype": "bfloat16"}, True) == {"teacher_dtype": "bfloat16"}


def test_a_non_finite_loss_stops_naming_the_step_its_terms_and_the_kept_checkpoint(tmp_path):
    terms = {"ce": torch.tensor(1.5), "kl": torch.tensor(float("inf"))}
    check_finite(torch.tensor(2.0), terms, 0, 3, tmp_path / "last.pt", updates_before=3)  # finite: nothing
    with pytest.raises(NonFiniteLoss, match=r"the loss became inf at epoch 0, step 3 \(ce=1.5, kl=inf\); stopped, "
                                            r"no checkpoint was written\. It was not finite before any update"):
        check_finite(torch.tensor(float("inf")), terms, 0, 3, tmp_path / "last.pt", updates_before=0)
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(NonFiniteLoss, match=r"became nan .*the last good checkpoint .*last.pt is kept\. Lower optim.lr"):
        check_finite(torch.tensor(float("nan")), terms, 2, 0, tmp_path / "last.pt", updates_before=40)


def test_the_epoch_meter_sums_terms_and_measures_its_window():
    def batches():
        for _ in range(2):
            time.sleep(0.02)
            yield None

    timed = WaitTimed(batches())
    meter = EpochMeter(timed, start=5)
    for images, (ce, kl) in zip((8, 4), ((1.0, 0.5), (2.0, 0.25))):
        next(timed)
        meter.add({"ce": torch.tensor(ce, requires_grad=True), "kl": torch.tensor(kl)}, images)
    assert meter.steps == 2 and meter.start == 5
    assert {k: float(v) for k, v in meter.sums.items()} == {"ce": 3.0, "kl": 0.75}
    assert not meter.sums["ce"].requires_grad  # detached: no graph kept across steps
    t0 = meter.t_window
    rate, wait = meter.window()
    span = meter.t_window - t0
    assert rate == pytest.approx(12 / span) and wait == pytest.approx(timed.waited / span) and 0 < wait <= 1
    assert meter.images == 0 and meter.waited_window == timed.waited


def test_legacy_teacher_scores():
    assert legacy_teacher_scores({"teacher_top1": 91.0, "teacher_top5": 99.5}) == {"top1": 91.0, "top5": 99.5}
    assert legacy_teacher_scores({"teacher_top1": 91.0}) == {"top1": 91.0, "top5": None}
    assert legacy_teacher_scores({"teacher_mse": 0.25}) == {"mse": 0.25}
    assert legacy_teacher_scores({"teacher_top1": None}) is None


def test_stop_signals_record_the_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as requested:
        assert requested["signal"] is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert requested["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_reshard_without_resume_and_a_finished_run_resumed(tmp_path):
    spec = load_spec(tiny_spec(tmp_path / "run", "kd", epochs=1))
    with pytest.raises(KDGraphError, match="--reshard continues a run at another number of ranks: use it with --resume"):
        train(spec, reshard=True)
    assert not (tmp_path / "run").exists()
    from kdgraph.runtime.builder import TRAIN, plan_records
    from kdgraph.runtime.runs import RunFolder, claim

    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    claim(folder.root, plan_records(spec, TRAIN).to_dict(), resume=False, force=False)  # what train records
    folder.summary.write_text('{"student_top1": 50.0}')
    summary = train(spec, resume=True)
    assert summary == {"student_top1": 50.0, "task": "classification", "already_finished": True}
    other = load_spec(tiny_spec(tmp_path / "run", "kd", epochs=2))
    with pytest.raises(KDGraphError, match=r"was trained with another spec \(differs: schedule.epochs: 1 -> 2\)"):
        train(other, resume=True)
    assert folder.summary.read_text() == '{"student_top1": 50.0}' and not folder.last_checkpoint.exists()
