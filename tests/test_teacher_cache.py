"""The teacher cache (issue 25): built from the run's own training views, replayed through
the plan's ``cache`` op, exact with full logits, FKD's loss with top-k, refused where it does
not match the spec or does not cover the epochs the plan replays."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from _runtime_helpers import tiny_spec, train_here, write_spec
from kdgraph.compiler import compile_spec
from kdgraph.errors import KDGraphError, SpecError
from kdgraph.losses import FKDHeadLoss
from kdgraph.runtime.cache import build_cache
from kdgraph.runtime.loop import Trainer, compile_for_training
from kdgraph.spec import load_spec
from kdgraph.teacher_cache import read_header, shard_path


def _spec(tmp_path, out: str, cache: str | None = "cache", method: str = "kd", epochs: int = 2, **kw):
    d = tiny_spec(tmp_path / out, method=method, epochs=epochs, **kw)
    if cache is not None:
        d["teacher"]["cache"] = str(tmp_path / cache)
    return load_spec(d)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


# -- FKD's loss against the formula, by hand ------------------------------------------------------

def test_fkd_loss_is_marginal_smoothing_written_out():
    """p~ = the top-k probabilities where cached, (1 - their sum) / (C - k) elsewhere;
    kl = λ T^2 mean_b sum_c p~ (log p~ - log softmax(z_s/T)), ce = CE(y, z_s)."""
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0], [0.3, -0.2, 2.5, 1.0, -1.5]])
    y = torch.tensor([1, 2])
    probs = torch.tensor([[0.6, 0.25], [0.7, 0.1]], dtype=torch.float16)
    idx = torch.tensor([[1, 0], [2, 3]])
    T, lam = 2.0, 0.5
    out = FKDHeadLoss(kl_weight=lam, temperature=T)(z, y, (probs, idx))
    kl_rows, ce_rows = [], []
    for b in range(2):
        p = [None] * 5
        top = {int(i): float(v) for i, v in zip(idx[b], probs[b].float())}
        rest = (1 - sum(top.values())) / 3
        p = [top.get(c, rest) for c in range(5)]
        zs = [float(v) / T for v in z[b]]
        lse = math.log(sum(math.exp(v) for v in zs))
        kl_rows.append(sum(pc * (math.log(pc) - (zs[c] - lse)) for c, pc in enumerate(p)))
        lse1 = math.log(sum(math.exp(float(v)) for v in z[b]))
        ce_rows.append(lse1 - float(z[b, y[b]]))
    assert out["kl"].item() == pytest.approx(lam * T * T * sum(kl_rows) / 2, rel=1e-6)
    assert out["ce"].item() == pytest.approx(sum(ce_rows) / 2, rel=1e-6)


def test_fkd_with_every_class_is_kd_on_the_same_probabilities():
    from kdgraph.losses import HeadLoss

    z_s, z_t = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.randint(0, 6, (4,))
    p, i = torch.softmax(z_t / 3, dim=-1).topk(6)
    fkd = FKDHeadLoss(temperature=3)(z_s, y, (p, i))
    kd = HeadLoss(temperature=3)(z_s, y, z_t)
    assert fkd["kl"].item() == pytest.approx(kd["kl"].item(), rel=1e-5)


# -- the plan ---------------------------------------------------------------------------------------

def test_plan_replays_the_cache_where_the_head_is_the_only_teacher_read(tmp_path):
    build_cache(_spec(tmp_path, "b", method="stablekd", epochs=6, blocks=2, recompositions=1), 6, full=True,
                quiet=True)
    c = compile_spec(_spec(tmp_path, "p", method="stablekd", epochs=6, blocks=2, recompositions=1),
                     materialize=False)
    decomposed, merged = c.plan.stages
    assert c.plan.cache_stages == (1,) and c.plan.live_teacher
    assert not decomposed.program.reads_cache and "teacher" in {op.kind for op in decomposed.program.ops}
    assert [op.kind for op in merged.program.ops if op.kind in ("teacher", "cache")] == ["cache"]
    assert next(op for op in merged.program.ops if op.node == "head_loss").inputs == ("S2", "labels", "cache")
    # only the merged stage's epochs were computed
    assert read_header(tmp_path / "cache")["stored_epochs"] == [3, 4, 5]


def test_topk_cache_feeds_fkd_and_plan_names_the_cached_stages(tmp_path):
    build_cache(_spec(tmp_path, "b"), 2, top_k=3, quiet=True)
    header = read_header(tmp_path / "cache")
    assert header["bytes_per_row"] == 12  # 3 fp16 probabilities + 3 uint16 indices
    c = compile_spec(_spec(tmp_path, "p"), materialize=False)
    ops = c.plan.stages[0].program.ops
    assert [op.kind for op in ops] == ["cache", "whole", "loss"] and ops[-1].entry == "fkd"  # the student whole
    assert not c.plan.live_teacher
    path = write_spec(tiny_spec(tmp_path / "p", method="kd", epochs=2,
                                teacher={"model": "module:kdgraph.zoo:resnet_tiny_teacher",
                                         "kwargs": {"num_classes": 10, "in_chans": 1},
                                         "cache": str(tmp_path / "cache")}), tmp_path / "p.yaml")
    from cli.main import app

    result = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "teacher" in result.output and "cache" in result.output


def test_a_cache_of_another_run_is_refused_naming_what_differs(tmp_path):
    build_cache(_spec(tmp_path, "b"), 2, full=True, quiet=True)
    with pytest.raises(SpecError, match=r"differs: seed \(0 then, 1 now\)"):
        compile_spec(_spec(tmp_path, "p", seed=1), materialize=False)
    with pytest.raises(SpecError, match="augmentation"):
        compile_spec(_spec(tmp_path, "p", data={"augment": "none"}), materialize=False)
    # and the builder refuses to mix runs in one folder
    with pytest.raises(KDGraphError, match="seed"):
        build_cache(_spec(tmp_path, "b", seed=1), 2, full=True, quiet=True)


def test_past_the_cached_epochs_the_plan_is_refused(tmp_path):
    build_cache(_spec(tmp_path, "b"), 1, full=True, quiet=True)
    with pytest.raises(SpecError, match=r"holds the first 1 epoch\(s\); stage 0 replays epochs 1-2.*--epochs 2"):
        compile_spec(_spec(tmp_path, "p", epochs=2), materialize=False)


# -- building: resumable, the trainer's own views ----------------------------------------------------

def test_a_stopped_build_resumes_at_the_missing_shard(tmp_path):
    spec = _spec(tmp_path, "b", epochs=3)
    build_cache(spec, 3, full=True, quiet=True)
    root = tmp_path / "cache"
    first = {e: np.load(shard_path(root, e, 0)).copy() for e in range(3)}
    # a build killed during epoch 3: epochs 1-2 whole, epoch 3 a partial temporary file
    shard_path(root, 2, 0).rename(shard_path(root, 2, 0).with_name("e0002-r0.npy.tmp"))
    header = read_header(root)
    with pytest.raises(KDGraphError, match="incomplete"):
        header.pop("format")
        from kdgraph.teacher_cache import write_header

        write_header(root, {**header, "complete": False})
        train_here(_spec(tmp_path, "t", epochs=3))
    again = build_cache(spec, 3, full=True, quiet=True)
    assert again.built == [2]
    for e in range(3):
        assert np.array_equal(np.load(shard_path(root, e, 0)), first[e])
    assert not list(root.glob("*.tmp"))


def test_the_cache_holds_the_trainers_views(tmp_path):
    """Row i of epoch e is the teacher on the Trainer's i-th view of epoch e (crops drawn per (seed, epoch))."""
    build_cache(_spec(tmp_path, "b"), 2, full=True, quiet=True)
    trainer = Trainer(_spec(tmp_path, "t", cache=None))
    teacher = trainer.distiller.teacher
    for epoch in range(2):
        rows = np.load(shard_path(tmp_path / "cache", epoch, 0))
        xb, _ = next(iter(trainer.data.train.epoch(epoch, 3)))
        live = teacher.features(xb, {trainer.plan.k})[trainer.plan.k]
        assert torch.equal(torch.from_numpy(rows[3 * 16: 4 * 16]), live)


# -- training from it ---------------------------------------------------------------------------------

def test_full_cache_replays_bit_for_bit_and_the_teacher_is_not_built(tmp_path):
    build_cache(_spec(tmp_path, "b"), 2, full=True, quiet=True)
    trainer = Trainer(_spec(tmp_path, "c"))
    assert trainer.distiller.teacher is None and trainer.plan.cache_stages == (0,)
    assert all(p.is_meta for p in trainer.compiled.teacher.model.parameters())  # built for its shapes only
    live = train_here(_spec(tmp_path, "live", cache=None))
    cached = train_here(_spec(tmp_path, "cached"))
    a, b = _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert live["student_top1"] == cached["student_top1"]


@pytest.mark.parametrize("recipe", [
    pytest.param({"data": {"mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}}}, id="kd-mixup"),
    pytest.param({"loss": {"logit": "dkd", "standardize": True}}, id="dkd-standardize"),
])
def test_full_cache_replays_a_recipe_bit_for_bit(tmp_path, recipe):
    """With data.mixup the cache holds the teacher on the mixed batch (the same draw as live);
    with dkd and standardize the replayed logits feed the same head loss: the same weights."""
    build_cache(_spec(tmp_path, "b", **recipe), 2, full=True, quiet=True)
    live = train_here(_spec(tmp_path, "live", cache=None, **recipe))
    cached = train_here(_spec(tmp_path, "cached", **recipe))
    a, b = _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert live["student_top1"] == cached["student_top1"]


def test_mixup_cache_holds_the_teacher_on_the_mixed_batch(tmp_path):
    mix = {"data": {"mixup": {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}}}
    build_cache(_spec(tmp_path, "b", **mix), 1, full=True, quiet=True)
    trainer = Trainer(_spec(tmp_path, "t", cache=None, **mix))
    xb, yb = next(iter(trainer.data.train.epoch(0, 2)))
    mixed, _, _ = trainer.prepare(xb, yb, None, 0, 2)  # the classification task: the batch mixed
    assert not torch.equal(mixed, xb)
    rows = torch.from_numpy(np.load(shard_path(tmp_path / "cache", 0, 0))[2 * 16: 3 * 16])
    assert torch.equal(rows, trainer.distiller.teacher.features(mixed, {trainer.plan.k})[trainer.plan.k])


@pytest.mark.parametrize("loss", [{"logit": "dkd"}, {"standardize": True}])
def test_topk_cache_with_a_logit_recipe_is_refused(tmp_path, loss):
    build_cache(_spec(tmp_path, "b", epochs=1), 1, top_k=3, quiet=True)
    with pytest.raises(KDGraphError, match="a top-k teacher cache replays through FKD's soft label.*--full"):
        compile_spec(_spec(tmp_path, "c", epochs=1, loss=loss))


def test_the_students_init_does_not_depend_on_the_teacher(tmp_path):
    """Live teacher, cache (teacher deferred) or no teacher at all: the same initial student."""
    build_cache(_spec(tmp_path, "b", epochs=1), 1, full=True, quiet=True)
    inits = []
    for spec in (_spec(tmp_path, "live", cache=None, epochs=1), _spec(tmp_path, "cached", epochs=1),
                 load_spec(tiny_spec(tmp_path / "sup", method="supervised", epochs=1))):
        torch.manual_seed(spec.seed)
        inits.append(compile_for_training(spec).student.model.state_dict())
    for other in inits[1:]:
        assert all(torch.equal(inits[0][k], other[k]) for k in inits[0])


def test_full_cache_is_exact_with_micro_batches(tmp_path):
    kw = {"runtime": {"device": "cpu", "log_every": 1, "num_threads": 1, "micro_batches": 2}}
    build_cache(_spec(tmp_path, "b", epochs=1, **kw), 1, full=True, quiet=True)
    train_here(_spec(tmp_path, "live", cache=None, epochs=1, **kw))
    train_here(_spec(tmp_path, "cached", epochs=1, **kw))
    a, b = _weights(tmp_path / "live"), _weights(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_topk_cache_trains_and_eval_export_need_no_cache(tmp_path):
    import shutil

    from kdgraph.runtime.commands import evaluate_spec, export_spec

    build_cache(_spec(tmp_path, "b", epochs=1), 1, top_k=3, quiet=True)
    spec = _spec(tmp_path, "cached", epochs=1)
    summary = train_here(spec)
    records = (tmp_path / "cached" / "metrics.jsonl").read_text()
    assert summary["student_top1"] is not None and '"kl"' in records
    shutil.rmtree(tmp_path / "cache")  # the cache is for training: a finished run no longer needs it
    assert evaluate_spec(spec)["student_top1"] == pytest.approx(summary["student_top1"])
    assert export_spec(spec, tmp_path / "export")["format"] == "state_dict"


def test_cli_builds_the_cache(tmp_path):
    d = tiny_spec(tmp_path / "run", method="kd", epochs=1)
    d["teacher"]["cache"] = str(tmp_path / "cache")
    path = write_spec(d, tmp_path / "s.yaml")
    from cli.main import app

    result = CliRunner().invoke(app, ["cache", str(path), "--epochs", "1", "--quiet"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "top-10 fp16 probabilities" in result.output and "40 bytes per image per epoch" in result.output
    assert os.path.exists(shard_path(tmp_path / "cache", 0, 0))
