"""Step options against independent truths: micro-batch accumulation equals the whole batch,
gradient clipping scales the unclipped update by c/||g||, fp16 with a gradient scaler
tracks fp32 and skips overflowing steps, channels_last changes no value (Swin included)."""

from __future__ import annotations

import pytest
import torch

from kdgraph.runtime.loop import NonFiniteLoss, Trainer, train
from kdgraph.spec import load_spec

from _runtime_helpers import tiny_spec


def _run(tmp_path, name, method="stablekd", **sections):
    torch.manual_seed(0)
    optim = {"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "constant",
             **sections.pop("optim", {})}
    return Trainer.from_spec(load_spec(tiny_spec(tmp_path / name, method, batch_size=24, optim=optim, **sections)))


def _batch(run):
    return next(iter(run.data.train.epoch(0)))


def _params(run):
    return {k: v.detach().clone() for k, v in run.distiller.named_parameters()}


@pytest.mark.parametrize("method", ["stablekd", "kd+mse"])
def test_micro_batches_equal_the_whole_batch_without_batch_statistics(tmp_path, method):
    whole = _run(tmp_path, "whole", method)
    split = _run(tmp_path, "split", method, runtime={"micro_batches": 5})  # 24 = 5+5+5+5+4: unequal parts
    for run in (whole, split):
        run.distiller.eval()  # BatchNorm on running statistics: each sample's loss is independent
    xb, yb = _batch(whole)
    before = _params(whole)
    assert all(torch.equal(before[k], v) for k, v in _params(split).items())
    t_whole, l_whole = whole.train_step(xb, yb)
    t_split, l_split = split.train_step(xb, yb)
    torch.testing.assert_close(l_split, l_whole, rtol=1e-5, atol=1e-6)
    assert t_split.keys() == t_whole.keys()
    for k in t_whole:
        torch.testing.assert_close(t_split[k], t_whole[k], rtol=1e-5, atol=1e-6)
    after_w, after_s = _params(whole), _params(split)
    moved = [k for k in before if not torch.equal(before[k], after_w[k])]
    assert moved
    for k in before:
        torch.testing.assert_close(after_s[k], after_w[k], rtol=1e-4, atol=1e-6)


def test_micro_batches_differ_with_batch_statistics(tmp_path):
    """The check above can fail: in train mode BatchNorm sees each part's own statistics."""
    whole, split = _run(tmp_path, "whole"), _run(tmp_path, "split", runtime={"micro_batches": 3})
    whole.distiller.train(), split.distiller.train()
    xb, yb = _batch(whole)
    _, l_whole = whole.train_step(xb, yb)
    _, l_split = split.train_step(xb, yb)
    assert not torch.allclose(l_whole, l_split, rtol=1e-4)


def test_clip_grad_norm_scales_the_update_by_c_over_the_norm(tmp_path):
    lr, clip = 0.05, 0.01
    free = _run(tmp_path, "free")
    clipped = _run(tmp_path, "clipped", optim={"clip_grad_norm": clip})
    xb, yb = _batch(free)
    before = _params(free)
    free.train_step(xb, yb)
    clipped.train_step(xb, yb)
    grads = {k: (before[k] - v) / lr for k, v in _params(free).items()}  # plain SGD: theta - lr g
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    assert norm > clip  # clipping is active
    for k, v in _params(clipped).items():
        expected = before[k] - lr * grads[k] * (clip / norm)
        torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-7)


def test_fp16_with_gradient_scaler_tracks_fp32_and_skips_overflow(tmp_path):
    fp32 = _run(tmp_path, "fp32", runtime={"precision": "fp32"})
    fp16 = _run(tmp_path, "fp16", runtime={"precision": "fp16"})
    assert fp16.stepper.scaler.is_enabled() and not fp32.stepper.scaler.is_enabled()
    xb, yb = _batch(fp32)
    before = _params(fp16)
    t32, l32 = fp32.train_step(xb, yb)
    t16, l16 = fp16.train_step(xb, yb)
    torch.testing.assert_close(l16.float(), l32, rtol=2e-2, atol=2e-2)
    d32 = torch.cat([(v - before[k]).flatten() for k, v in _params(fp32).items()])
    d16 = torch.cat([(v - before[k]).flatten() for k, v in _params(fp16).items()])
    assert torch.cosine_similarity(d16, d32, dim=0) > 0.99  # the same update, to fp16's precision
    # an overflowing gradient: the scaler skips the step and halves its scale
    scale = fp16.stepper.scaler.get_scale()
    now = _params(fp16)
    p = next(p for p in fp16.distiller.parameters() if p.requires_grad)
    hook = p.register_hook(lambda g: g * float("inf"))
    fp16.train_step(xb, yb)
    hook.remove()
    assert all(torch.equal(now[k], v) for k, v in _params(fp16).items())
    assert fp16.stepper.scaler.get_scale() == scale / 2


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    spec = load_spec(tiny_spec(tmp_path / "nan", "kd", epochs=2))
    spec.optim.lr = 1e30  # past the spec's bound (10), set after validation: a sure way to a non-finite loss
    with pytest.raises(NonFiniteLoss, match=r"the loss became (nan|inf).*optim\.lr"):
        train(spec)
    metrics = (tmp_path / "nan" / "metrics.jsonl").read_text()
    assert "NaN" not in metrics and "Infinity" not in metrics


def test_a_loss_not_finite_before_any_update_does_not_blame_the_learning_rate(tmp_path):
    """A teacher whose weights hold NaN (a corrupt checkpoint, a corrupt cache) gives a NaN loss at the
    first step: the advice was to lower the lr."""
    from safetensors.torch import save_file

    from kdgraph.zoo import resnet_tiny_teacher

    teacher = resnet_tiny_teacher(num_classes=10, in_chans=1)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["fc.weight"][:] = float("nan")
    save_file(state, str(tmp_path / "teacher.safetensors"))
    spec = load_spec(tiny_spec(tmp_path / "nan", "kd", epochs=1, teacher_checkpoint=tmp_path / "teacher.safetensors"))
    with pytest.raises(NonFiniteLoss, match=r"not finite before any update, so the learning rate is not the "
                                            r"cause: check the data, the teacher's weights") as info:
        train(spec)
    assert "Lower optim.lr" not in str(info.value)


def test_non_finite_numbers_are_refused_in_the_spec(tmp_path):
    from kdgraph.errors import SpecError

    with pytest.raises(SpecError, match=r"optim\.lr"):
        load_spec(tiny_spec(tmp_path, "kd"), ["optim.lr=.inf"])
    with pytest.raises(SpecError, match=r"loss\.temperature"):
        load_spec(tiny_spec(tmp_path, "kd"), ["loss.temperature=.nan"])


SWIN = {"model": "timm:swin_tiny_patch4_window7_224",
        "kwargs": {"num_classes": 10, "img_size": 32, "window_size": 2, "embed_dim": 24, "num_heads": [1, 1, 1, 1]}}


@pytest.mark.parametrize("method", ["stablekd", "kd"])
def test_channels_last_changes_no_value_on_swin(tmp_path, method):
    """Swin keeps rank-5 buffers, which nn.Module.to(memory_format=channels_last) refuses."""
    runs = {}
    for cl in (False, True):
        raw = tiny_spec(tmp_path / f"cl{cl}", method, blocks=3, recompositions=1, batch_size=4,
                        runtime={"channels_last": cl}, optim={"lr": 0.01, "lr_schedule": "constant"})
        raw["teacher"] = SWIN
        raw["student"] = {**SWIN, "kwargs": {**SWIN["kwargs"], "depths": [1, 1, 1, 1]}}
        raw["data"] = {"dataset": "synthetic", "input_size": [3, 32, 32], "num_classes": 10, "samples": 8,
                       "batch_size": 4}
        torch.manual_seed(0)
        runs[cl] = Trainer.from_spec(load_spec(raw))
    assert runs[True].config.channels_last and not runs[False].config.channels_last
    xb, yb = _batch(runs[False])
    out = {}
    for cl, run in runs.items():
        torch.manual_seed(5)  # the same drop-path draws (timm's swin_tiny default: 0.1) for both
        out[cl] = run.train_step(xb, yb)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(_params(runs[True]).items(), _params(runs[False]).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt_out", [False, True])
def test_weight_decay_spares_norms_biases_and_tokens_as_timm_does(tmp_path, opt_out):
    """One SGD step on a zero loss: decayed parameters shrink by lr*wd*p exactly; norms,
    biases and the ViT student's no_weight_decay() tokens stay put (unless opted out)."""
    from kdgraph.runtime.steps import optimizer_params
    from kdgraph.runtime.techniques import build_optimizer

    spec = load_spec(tiny_spec(tmp_path / "run", "supervised", blocks=1, student="timm:vit_tiny_patch16_224",
                               data={"input_size": [1, 16, 16]},
                               optim={"lr": 0.5, "momentum": 0.0, "weight_decay": 0.1, "lr_schedule": "constant",
                                      "decay_norms_and_biases": opt_out})
                     | {"student": {"model": "timm:vit_tiny_patch16_224",
                                    "kwargs": {"num_classes": 10, "in_chans": 1, "img_size": 16, "patch_size": 4,
                                               "depth": 2}}})
    run = Trainer.from_spec(spec)
    tokens = run.distiller.student.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= tokens
    before = _params(run)
    opt = build_optimizer(spec.optim, optimizer_params(spec.optim, run.distiller), torch.device("cpu"))
    for p in run.distiller.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = _params(run)
    spared = {k for k, v in before.items() if not opt_out and (v.ndim <= 1 or k.split(".", 1)[1] in tokens)}
    assert {"student.pos_embed", "student.cls_token", "student.blocks.0.norm1.weight", "student.head.bias"} <= spared \
        or opt_out
    for k, v in before.items():
        expected = v if k in spared else v * (1 - 0.5 * 0.1)
        assert torch.allclose(after[k], expected, atol=1e-7), k
