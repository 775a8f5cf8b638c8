"""The teacher cache (issue 25): built from the run's own training views, replayed through
the plan's ``cache`` op, exact with full logits, FKD's loss with top-k, refused where it does
not match the spec or does not cover the epochs the plan replays."""

from __future__ import annotations

import json
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
from kdgraph.runtime.builder import TRAIN, build_run
from kdgraph.runtime.loop import Trainer
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
    trainer = Trainer.from_spec(_spec(tmp_path, "t", cache=None))
    teacher = trainer.distiller.teacher
    for epoch in range(2):
        rows = np.load(shard_path(tmp_path / "cache", epoch, 0))
        xb, _ = next(iter(trainer.data.train.epoch(epoch, 3)))
        live = teacher.features(xb, {trainer.plan.k})[trainer.plan.k]
        assert torch.equal(torch.from_numpy(rows[3 * 16: 4 * 16]), live)


# -- training from it ---------------------------------------------------------------------------------

def test_full_cache_replays_bit_for_bit_and_the_teacher_is_not_built(tmp_path):
    build_cache(_spec(tmp_path, "b"), 2, full=True, quiet=True)
    trainer = Trainer.from_spec(_spec(tmp_path, "c"))
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
    trainer = Trainer.from_spec(_spec(tmp_path, "t", cache=None, **mix))
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
        inits.append(build_run(spec, TRAIN).student.model.state_dict())
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


# -- the key: every field, changed, is refused naming it (issue 39) -----------------------------------

def _data_changes() -> dict[str, object]:
    """A new value for every DataSpec field the key holds (none is checked against data here:
    the key is compared before any is read)."""
    return {"dataset": "synthetic", "root": "/elsewhere", "input_size": [1, 12, 12], "batch_size": 8,
            "fraction": 0.5, "samples": 100, "num_classes": 11, "resize": "crop", "loader": "stream",
            "memory_budget_mb": 1, "on_bad_image": "error", "mean": [0.5], "std": [0.25], "crop_pct": 0.9,
            "crop_scale": (0.5, 1.0), "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 0.0},
            "val_fraction": 0.1, "seq_len": 64, "tokenizer": "/elsewhere/tokenizer"}


def _leaf_paths(value, prefix: str) -> set[str]:
    if isinstance(value, dict) and prefix != "teacher.kwargs":  # the factory's own: compared whole
        return {p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}.{k}")} or {prefix}
    return {prefix}


def test_every_leaf_of_the_key_is_one_a_test_changes():
    """The key's leaves are exactly those the tests below change (a new field needs its test)."""
    from kdgraph.spec.schema import DataSpec
    from kdgraph.teacher_cache import KEY_FIELDS, cache_key

    spec = _spec(__import__("pathlib").Path("/tmp/unused"), "p")
    key = cache_key(spec, "topk", 3, 1)
    assert tuple(key) == KEY_FIELDS
    leaves = set().union(*(_leaf_paths(f["value"], name) for name, f in key.items()))
    tested = ({f"data.{f}" for f in _data_changes()} | {f"teacher.{f}" for f in _TEACHER_LEAVES}
              | {f"runtime.{f}" for f in ("precision", "micro_batches", "channels_last")}
              | {f"normalisation.{f}" for f in ("mean", "std", "teacher_mean", "teacher_std")}
              | {"data_files", "augmentation", "seed", "ranks", "mode.mode", "mode.k", "mode.temperature"})
    assert leaves == tested
    assert set(DataSpec.model_fields) == set(_data_changes()) | {"augment", "test_batch_size"}


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
@pytest.mark.parametrize("field", sorted(_data_changes()))
def test_each_data_field_changed_is_named(field):
    """``differences`` names data.<field> with both values whole (the key compares leaf by leaf)."""
    from kdgraph.teacher_cache import cache_key, differences

    spec = _spec(__import__("pathlib").Path("/tmp/unused"), "p")
    other = spec.model_copy(update={"data": spec.data.model_copy(update={field: _data_changes()[field]})})
    diff = differences(cache_key(spec, "full", None, 1), cache_key(other, "full", None, 1))
    new = json.dumps(_data_changes()[field], sort_keys=True)
    assert diff == [f"data.{field} ({json.dumps(getattr(spec.data, field), sort_keys=True, default=str)} then, "
                    f"{new} now)"]


@pytest.mark.parametrize("field", ["mean", "std", "teacher_mean", "teacher_std"])
def test_each_normalisation_field_changed_is_named(field):
    """The resolved normalisation (the batch's, the teacher's own) from the compiled data plan."""
    from types import SimpleNamespace

    from kdgraph.teacher_cache import cache_key, differences

    spec = _spec(__import__("pathlib").Path("/tmp/unused"), "p")
    plan = {"mean": (0.5,), "std": (0.2,), "teacher_mean": None, "teacher_std": None}
    a = cache_key(spec, "full", None, 1, SimpleNamespace(**plan))
    b = cache_key(spec, "full", None, 1, SimpleNamespace(**{**plan, field: (0.25,)}))
    then = json.dumps(list(plan[field]) if plan[field] else None)
    assert differences(a, b) == [f"normalisation.{field} ({then} then, [0.25] now)"]


def test_the_test_batch_size_is_not_in_the_key():
    from kdgraph.teacher_cache import cache_key, differences

    spec = _spec(__import__("pathlib").Path("/tmp/unused"), "p")
    other = spec.model_copy(update={"data": spec.data.model_copy(update={"test_batch_size": 7})})
    assert differences(cache_key(spec, "full", None, 1), cache_key(other, "full", None, 1)) == []


_TEACHER_LEAVES = ("model", "kwargs", "pretrained", "checkpoint_sha256", "dtype", "code_sha256")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full cache and one top-k (k = 3) cache of the tiny run, with a teacher checkpoint."""
    from safetensors.torch import save_file

    from kdgraph.zoo import resnet_tiny_teacher

    tmp = tmp_path_factory.mktemp("built")
    torch.manual_seed(1)
    save_file(resnet_tiny_teacher(num_classes=10, in_chans=1).state_dict(), str(tmp / "t.safetensors"))
    torch.manual_seed(2)
    save_file(resnet_tiny_teacher(num_classes=10, in_chans=1).state_dict(), str(tmp / "t2.safetensors"))
    for name, kw in (("full", {"full": True}), ("topk", {"top_k": 3})):
        build_cache(_ckpt_spec(tmp, "b", name), 1, quiet=True, **kw)
    return tmp


def _ckpt_spec(tmp, out, cache, epochs=1, teacher=None, **kw):
    d = tiny_spec(tmp / out, method="kd", epochs=epochs, **kw)
    d["teacher"] = {**d["teacher"], "checkpoint": str(tmp / "t.safetensors"), "cache": str(tmp / cache),
                    **(teacher or {})}
    return load_spec(d)


@pytest.mark.parametrize(("cache", "change", "named"), [
    ("full", {"teacher": {"kwargs": {"num_classes": 10, "in_chans": 1, "drop_path_rate": 0.1}}},
     "teacher.kwargs.drop_path_rate (absent then, 0.1 now)"),
    ("full", {"teacher": {"checkpoint": "{tmp}/t2.safetensors"}}, "teacher.checkpoint_sha256"),
    ("full", {"teacher": {"dtype": "bfloat16"}}, 'teacher.dtype ("float32" then, "bfloat16" now)'),
    ("full", {"data": {"mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 0.0}}},
     'data.mixup (null then, {"cutmix_alpha": 0.0, "mixup_alpha": 0.4'),
    ("full", {"data": {"augment": "none"}}, "augmentation"),
    ("full", {"seed": 1}, "seed (0 then, 1 now)"),
    ("full", {"runtime": {"precision": "bf16"}}, "runtime.precision"),
    ("full", {"runtime": {"micro_batches": 2}}, "runtime.micro_batches (1 then, 2 now)"),
    ("full", {"runtime": {"channels_last": True}}, "runtime.channels_last"),
    ("topk", {"loss": {"temperature": 2.0}}, "mode.temperature (1.0 then, 2.0 now)"),
])
def test_a_cache_built_for_another_run_is_refused_naming_the_leaf(built, cache, change, named):
    """Planning (and so training) a run that differs from the cache's in one key leaf: refused,
    the leaf named with both values whole, however long the line."""
    change = json.loads(json.dumps(change).replace("{tmp}", str(built)))
    teacher = change.pop("teacher", None)
    runtime = {"runtime": {"device": "cpu", "log_every": 1, "num_threads": 1, **change.pop("runtime", {})}}
    spec = _ckpt_spec(built, "p", cache, teacher=teacher, **runtime, **change)
    with pytest.raises(SpecError) as err:
        compile_spec(spec, materialize=False)
    assert "was built for another run" in str(err.value) and named in str(err.value)
    assert "\n" not in str(err.value) and "..." not in str(err.value)
    compile_spec(_ckpt_spec(built, "p", cache), materialize=False)  # the run itself is accepted


@pytest.mark.parametrize(("field", "value", "named"), [
    ("pretrained", True, "teacher.pretrained (false then, true now)"),
    ("model", "timm:resnet18", 'teacher.model ("module:kdgraph.zoo:resnet_tiny_teacher" then, "timm:resnet18" now)'),
])
def test_the_teachers_name_and_pretrained_are_in_the_key(field, value, named):
    from kdgraph.teacher_cache import cache_key, differences

    spec = _spec(__import__("pathlib").Path("/tmp/unused"), "p")
    other = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={field: value})})
    assert differences(cache_key(spec, "full", None, 1), cache_key(other, "full", None, 1)) == [named]


def test_the_mode_and_k_are_in_the_key(built):
    """A full cache's folder refuses a top-k build, a top-3 one a top-4 build."""
    with pytest.raises(KDGraphError, match=r'mode\.k \(absent then, 3 now\).*mode\.mode \("full" then, "topk" now\)'):
        build_cache(_ckpt_spec(built, "b", "full"), 1, top_k=3, quiet=True)
    with pytest.raises(KDGraphError, match=r"mode\.k \(3 then, 4 now\)"):
        build_cache(_ckpt_spec(built, "b", "topk"), 1, top_k=4, quiet=True)


def test_the_ranks_are_checked_at_replay(built):
    from kdgraph.runtime.replay import TeacherCache

    with pytest.raises(KDGraphError, match="built on 1 rank"):
        TeacherCache(built / "full", 0, 2, 16, torch.device("cpu"))


_ACT = '''
import torch
from torch import nn

from kdgraph.zoo import resnet_tiny_teacher


class Act(nn.Module):
    def forward(self, x):
        return torch.{fn}(x)


def teacher(**kw):
    m = resnet_tiny_teacher(**kw)
    m.act1 = {act}
    return m
'''


@pytest.mark.parametrize("edit", [{"fn": "sigmoid", "act": "Act()"}, {"fn": "relu", "act": "nn.Sigmoid()"}],
                         ids=["functional", "module"])
def test_a_module_teachers_code_changed_with_the_same_checkpoint_is_refused(tmp_path, monkeypatch, edit):
    """ReLU -> Sigmoid in a module teacher's code (in a forward, or a module swapped), the same
    checkpoint: planning and the builder refuse, naming teacher.code_sha256."""
    import sys

    from kdgraph.zoo import resnet_tiny_teacher

    name = "kd_teacher_fn" if edit["act"] == "Act()" else "kd_teacher_mod"
    (tmp_path / f"{name}.py").write_text(_ACT.format(fn="relu", act="Act()"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from safetensors.torch import save_file

    save_file(resnet_tiny_teacher(num_classes=10, in_chans=1).state_dict(), str(tmp_path / "t.safetensors"))
    spec = _ckpt_spec(tmp_path, "b", "cache", teacher={"model": f"module:{name}:teacher"})
    build_cache(spec, 1, full=True, quiet=True)
    compile_spec(spec, materialize=False)  # unchanged: accepted
    (tmp_path / f"{name}.py").write_text(_ACT.format(**edit))
    monkeypatch.delitem(sys.modules, name)  # a new process would import the edited file
    sha = r'"[0-9a-f]{64}"'
    with pytest.raises(SpecError, match=rf"differs: teacher\.code_sha256 \({sha} then, {sha} now\)"):
        compile_spec(spec, materialize=False)
    with pytest.raises(KDGraphError, match=r"teacher\.code_sha256"):
        build_cache(spec, 1, full=True, quiet=True)


def _image_folder(root, classes=("ant", "bee"), n=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((8, 8)) * 255 * (0.3 + 0.7 * c)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / cls / f"{i}.png")


def _folder_spec(tmp_path, out="b"):
    d = tiny_spec(tmp_path / out, method="kd", epochs=1, fraction=1.0, batch_size=4,
                  data={"dataset": "imagefolder", "root": str(tmp_path / "images"), "input_size": [1, 8, 8]})
    d["student"]["kwargs"]["num_classes"] = d["teacher"]["kwargs"]["num_classes"] = 2
    d["teacher"]["cache"] = str(tmp_path / "cache")
    return load_spec(d)


@pytest.mark.parametrize("change", ["swap", "duplicate", "rewrite"])
def test_an_image_folder_changed_after_the_build_is_refused(tmp_path, change):
    """The key holds the training files (path, size, mtime): two class folders swapped, every
    image duplicated, an image rewritten in place: refused, naming data_files."""
    import shutil

    _image_folder(tmp_path / "images")
    build_cache(_folder_spec(tmp_path), 1, full=True, quiet=True)
    compile_spec(_folder_spec(tmp_path, "p"), materialize=False)  # unchanged: accepted
    train = tmp_path / "images" / "train"
    if change == "swap":
        (train / "ant").rename(train / "tmp")
        (train / "bee").rename(train / "ant")
        (train / "tmp").rename(train / "bee")
    elif change == "duplicate":
        for f in list(train.rglob("*.png")):
            shutil.copy(f, f.with_name("copy-" + f.name))
    else:
        f = train / "bee" / "3.png"
        data = bytearray(f.read_bytes())
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
        f.write_bytes(bytes(data))
    with pytest.raises(SpecError, match=r"differs: data_files\.") as err:
        compile_spec(_folder_spec(tmp_path, "p"), materialize=False)
    if change == "duplicate":
        assert "data_files.files (12 then, 24 now)" in str(err.value)


def test_a_damaged_or_foreign_header_is_one_line_in_plan_train_and_cache(tmp_path):
    from cli.main import app

    build_cache(_spec(tmp_path, "b", epochs=1), 1, full=True, quiet=True)
    header = tmp_path / "cache" / "header.json"
    good = header.read_text()
    d = tiny_spec(tmp_path / "p", method="kd", epochs=1)
    d["teacher"]["cache"] = str(tmp_path / "cache")
    path = write_spec(d, tmp_path / "p.yaml")
    cases = {
        "truncated": (good[: len(good) // 2], "is damaged (JSONDecodeError"),
        "key-less": (json.dumps({k: v for k, v in json.loads(good).items() if k != "key"}), "its key does not hold"),
        "no epochs": (json.dumps({k: v for k, v in json.loads(good).items() if k != "epochs"}), "epochs is"),
        "a user's own": (json.dumps({"title": "my notes", "epochs": 3}), "is not a kdgraph teacher cache"),
        "not an object": ("[1, 2]", "is not a kdgraph teacher cache"),
        "huge epochs": (json.dumps({**json.loads(good), "epochs": 10 ** 12}), "epochs is 1000000000000"),
        "bad shard sums": (json.dumps({**json.loads(good), "shards": {"e0000-r0.npy": "x"}}), "shards is not"),
    }
    for name, (text, want) in cases.items():
        header.write_text(text)
        for command in (["plan", str(path)], ["train", str(path)], ["cache", str(path), "--epochs", "1", "--quiet"]):
            result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
            assert result.exit_code == 2, (name, command, result.output)
            assert want in result.output and "Traceback" not in result.output, (name, command, result.output)
    assert header.read_text() == cases["bad shard sums"][0]  # the builder wrote nothing over it


def test_a_cache_that_is_a_file_is_one_line_in_plan_and_train(tmp_path):
    from cli.main import app

    (tmp_path / "afile").write_text("mine")
    d = tiny_spec(tmp_path / "p", method="kd", epochs=1)
    d["teacher"]["cache"] = str(tmp_path / "afile")
    path = write_spec(d, tmp_path / "p.yaml")
    for command in (["plan", str(path)], ["train", str(path)]):
        result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 2 and "a teacher cache is a folder, and this is a file" in result.output, result.output
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_header_larger_than_any_kdgraph_writes_is_refused_unread(tmp_path, monkeypatch):
    import kdgraph.teacher_cache as tc

    build_cache(_spec(tmp_path, "b", epochs=1), 1, full=True, quiet=True)
    size = (tmp_path / "cache" / "header.json").stat().st_size
    monkeypatch.setattr(tc, "MAX_HEADER_BYTES", size - 1)
    monkeypatch.setattr(tc, "_READ", {})
    monkeypatch.setattr(type(tmp_path), "read_bytes", lambda self: pytest.fail("read"))
    with pytest.raises(SpecError, match=rf"header.json: {size:,} bytes, not a header kdgraph wrote"):
        read_header(tmp_path / "cache")


def test_a_cache_of_the_previous_format_is_refused_saying_to_rebuild(tmp_path):
    build_cache(_spec(tmp_path, "b", epochs=1), 1, full=True, quiet=True)
    header = tmp_path / "cache" / "header.json"
    earlier = {k: v for k, v in json.loads(header.read_text()).items() if k not in ("kind", "shards")}
    header.write_text(json.dumps({**earlier, "format": 1}))  # as kdgraph wrote it before issue 39
    with pytest.raises(SpecError, match=r"cache format 1, this kdgraph reads 2; delete it and build it again"):
        compile_spec(_spec(tmp_path, "p", epochs=1), materialize=False)
