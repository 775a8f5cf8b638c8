"""The frozen teacher (kdgraph/runtime/teacher.py): eval mode, no gradients, outside the
student's module tree; its block segments compute what its own eager forward does.

Independent truth: a second teacher built separately from the same weights file
(``kdgraph.zoo`` + safetensors, in eval mode, never seen by kdgraph's runtime), and the
teacher's own buffers snapshotted before training.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdgraph import zoo
from kdgraph.compiler import compile_spec
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.loop import Trainer
from kdgraph.spec import load_spec

from _runtime_helpers import KW, tiny_spec, train_here


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A teacher whose BatchNorm running statistics are far from what batch statistics give,
    so that a train-mode teacher and an eval-mode one produce visibly different features."""
    torch.manual_seed(7)
    model = zoo.resnet_tiny_teacher(**KW)
    g = torch.Generator().manual_seed(8)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0, generator=g)
            m.running_var.uniform_(0.25, 4.0, generator=g)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _reference(teacher_file, **kw) -> torch.nn.Module:
    ref = zoo.resnet_tiny_teacher(**KW, **kw)
    ref.load_state_dict(load_file(str(teacher_file)))
    return ref.eval()


def _batch(n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _capture(module: torch.nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    outs, hooks = {}, []
    for name in names:
        hooks.append(module.get_submodule(name).register_forward_hook(
            lambda _m, _i, o, name=name: outs.__setitem__(name, o.detach().clone())))
    with torch.no_grad():
        logits = module(x)
    for h in hooks:
        h.remove()
    return outs, logits


def test_step_consumes_the_eval_mode_teacher(tmp_path, teacher_file):
    spec = load_spec(tiny_spec(tmp_path, "kd+mse", teacher_checkpoint=teacher_file))
    compiled = compile_spec(spec)
    d = Distiller(compiled)
    d.train()  # every epoch does this: it must not reach the teacher
    consumed = {}
    features = d.teacher.features

    def record(x, needed):
        out = features(x, needed)
        consumed.update({i: t.clone() for i, t in out.items()})
        return out

    d.teacher.features = record
    x, y = _batch()
    d(x, y)
    labels = [b.cut.label for b in compiled.teacher.boundaries]
    ref = _reference(teacher_file)
    outs, logits = _capture(ref, labels, x)
    assert sorted(consumed) == [1, 2, 3, 4]
    for i, label in enumerate(labels, start=1):
        torch.testing.assert_close(consumed[i], outs[label], rtol=0, atol=1e-6)
    torch.testing.assert_close(consumed[4], logits, rtol=0, atol=1e-5)
    # the check can fail: the same teacher in train mode (batch statistics) differs
    train_outs, train_logits = _capture(_reference(teacher_file).train(), labels, x)
    assert not torch.allclose(train_logits, logits, atol=1e-3)


def test_the_split_teachers_blocks_equal_its_eager_forward(tmp_path, teacher_file):
    """FrozenTeacher on its own: block ends by segments (any set), logits by the model's forward
    (kd's shortcut) or by the segments, and ``block`` steps chained from block 1's output, all
    equal a separately built eval-mode teacher's module outputs (forward hooks); ``block`` keeps
    autograd on its input and gives the teacher's parameters no gradient."""
    from kdgraph.runtime.distiller import frozen_teacher

    compiled = compile_spec(load_spec(tiny_spec(tmp_path, "kd+mse", teacher_checkpoint=teacher_file)))
    teacher = frozen_teacher(compiled)
    labels = [b.cut.label for b in compiled.teacher.boundaries]
    x, _ = _batch(seed=5)
    outs, logits = _capture(_reference(teacher_file), labels, x)
    feats = teacher.features(x, {1, 2, 3, 4})
    for i, label in enumerate(labels, start=1):
        torch.testing.assert_close(feats[i], outs[label], rtol=0, atol=1e-6)
    assert sorted(teacher.features(x, {2})) == [2]  # runs no further than asked
    torch.testing.assert_close(teacher.features(x, {4})[4], logits, rtol=0, atol=1e-5)  # the whole forward
    torch.testing.assert_close(teacher(x), logits, rtol=0, atol=1e-5)
    h0 = feats[1].clone().requires_grad_(True)
    h = h0
    for i in (2, 3, 4):
        h = teacher.block(i, h)
    torch.testing.assert_close(h, logits, rtol=0, atol=1e-5)
    h.sum().backward()
    assert h0.grad is not None and h0.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_teacher_is_outside_the_module_tree(tmp_path, teacher_file):
    d = Distiller(compile_spec(load_spec(tiny_spec(tmp_path, "stablekd", teacher_checkpoint=teacher_file))))
    teacher = d.teacher.model
    t_tensors = {id(t) for t in [*teacher.parameters(), *teacher.buffers()]}
    assert not t_tensors & {id(t) for t in [*d.parameters(), *d.buffers()]}
    assert all(m is not teacher for m in d.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    own = {k for k in d.state_dict()}
    # the student, and what StableKD trains or fits beside it: adapters (in_path) or the frozen
    # projections of the teacher's features (projected, the default), never the teacher
    assert own and all(k.startswith(("student.", "adapters.", "projections.")) for k in own), sorted(own)[:5]


def test_training_and_bn_recalibration_leave_the_teacher_bit_identical(tmp_path, teacher_file):
    spec = load_spec(tiny_spec(tmp_path, "stablekd", teacher_checkpoint=teacher_file,
                               runtime={"bn_recalibrate": True}))
    run = Trainer.from_spec(spec)
    before = {k: v.clone() for k, v in run.distiller.teacher.model.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    for stage in run.compiled.plan.stages:
        run.distiller.set_stage(stage)
        run.distiller.train()
        for _, (xb, yb) in zip(range(2), run.data.train.epoch(stage.index)):
            run.train_step(xb, yb)
        run.evaluator.recalibrate_bn(run.global_step + stage.index + 1)  # a step it has not re-estimated at
        run.evaluator.evaluate(run.global_step)
    after = run.distiller.teacher.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in run.distiller.teacher.model.parameters())
    assert not run.distiller.teacher.model.training
    # the student's own statistics did move (from their zero init): the check is not vacuous
    means = [m.running_mean for m in run.distiller.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(m.abs().sum() > 0 for m in means)


def test_drop_path_teacher_gives_the_same_features_twice(tmp_path):
    spec = load_spec(tiny_spec(tmp_path, "kd+mse", teacher=True))
    raw = spec.to_dict()
    raw["teacher"]["kwargs"]["drop_path_rate"] = 0.5
    spec = load_spec(raw)
    d = Distiller(compile_spec(spec))
    d.train()
    x, _ = _batch()
    first = d.teacher_features(x)
    second = d.teacher_features(x)
    assert sorted(first) == [1, 2, 3, 4]
    for i in first:
        assert torch.equal(first[i], second[i]), i
    # drop path is live in train mode, so the equality above is eval mode's doing
    live = copy.deepcopy(d.teacher.model).train()
    with torch.no_grad():
        assert not torch.equal(live(x), live(x))
    # a user's .train() on the teacher is undone when the loop sets the next stage
    d.teacher.model.train()
    d.set_stage(compile_spec(spec).plan.stages[0])
    assert not any(m.training for m in d.teacher.model.modules())
    assert torch.equal(d.teacher_features(x)[4], first[4])


def test_checkpoints_hold_no_teacher_tensors(tmp_path, teacher_file):
    raw = tiny_spec(tmp_path / "run", "stablekd", epochs=3, teacher_checkpoint=teacher_file,
                    runtime={"checkpoint_every": 2})
    train_here(load_spec(raw))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    keys = set(state["model"])
    student = {f"student.{k}" for k in zoo.resnet_tiny_student(**KW).state_dict()}
    beside = {k for k in keys if k.startswith(("adapters.", "projections."))}  # in_path or projected
    assert beside and keys == student | beside
    # no teacher tensor under any name: the teacher's 128-wide 3x3 convs (the student is
    # at most 64 wide) are nowhere
    teacher_convs = {tuple(v.shape) for v in load_file(str(teacher_file)).values() if v.dim() == 4
                     and v.shape[0] == 128 and v.shape[-1] == 3}
    assert teacher_convs and not teacher_convs & {tuple(v.shape) for v in state["model"].values()}
