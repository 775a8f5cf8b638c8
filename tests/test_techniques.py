"""Runtime techniques that decide from the device and the spec, checked on the CPU: cuDNN
autotuning's decision (a fake CUDA device: the decision reads only ``device.type``) and the
recompile watch (a real recompile-limit hit, with Dynamo's cheap ``eager`` backend)."""

from __future__ import annotations

import pytest
import torch

from kdgraph.runtime.techniques import (
    RecompileWatch,
    apply_cudnn_benchmark,
    reset_compile_caches,
    use_cudnn_benchmark,
)

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture
def cudnn_flag():
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


def test_cudnn_benchmark_on_for_cuda_unless_determinism_is_asked_for():
    assert use_cudnn_benchmark(CUDA, deterministic=False) is True
    assert use_cudnn_benchmark(CUDA, deterministic=True) is False
    assert use_cudnn_benchmark(CPU, deterministic=False) is False


def test_deterministic_algorithms_switched_on_in_torch_turn_autotuning_off():
    torch.use_deterministic_algorithms(True)
    try:
        assert use_cudnn_benchmark(CUDA, deterministic=False) is False
    finally:
        torch.use_deterministic_algorithms(False)


def test_apply_sets_the_flag_on_cuda_and_leaves_it_alone_on_cpu(cudnn_flag):
    torch.backends.cudnn.benchmark = False
    assert apply_cudnn_benchmark(CUDA, deterministic=False) is True
    assert torch.backends.cudnn.benchmark is True
    assert apply_cudnn_benchmark(CUDA, deterministic=True) is False
    assert torch.backends.cudnn.benchmark is False
    torch.backends.cudnn.benchmark = True  # a caller's own choice on the CPU stays
    assert apply_cudnn_benchmark(CPU, deterministic=False) is False
    assert torch.backends.cudnn.benchmark is True


def _recompiling():
    """A compiled function that recompiles for every new string constant (Dynamo specialises
    on strings), with the ``eager`` backend: no code generation, milliseconds per compile."""

    def f(x, tag: str):
        return x * len(tag)

    return torch.compile(f, backend="eager")


def test_recompile_watch_counts_a_limit_hit_and_the_function_still_answers():
    reset_compile_caches()
    f, x = _recompiling(), torch.ones(3)
    with torch._dynamo.config.patch(recompile_limit=2), RecompileWatch() as watch:
        out = [f(x, "a" * n) for n in range(1, 5)]  # the third string is over the limit
    assert watch.hits == 1, watch.functions
    assert "f" in watch.functions[0]
    assert [o[0].item() for o in out] == [1.0, 2.0, 3.0, 4.0]  # eager from then on, still right
    reset_compile_caches()


def test_recompile_watch_sees_nothing_within_the_limit_or_after_a_reset():
    reset_compile_caches()
    x = torch.ones(3)
    with torch._dynamo.config.patch(recompile_limit=2), RecompileWatch() as watch:
        f = _recompiling()
        f(x, "a"), f(x, "aa")
        reset_compile_caches()  # a fresh cache: the same two strings compile again within the limit
        f = _recompiling()
        f(x, "aaa"), f(x, "aaaa")
    assert watch.hits == 0
    reset_compile_caches()


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"),
                    reason="this torch has no fail_on_recompile_limit_hit")
def test_strict_recompile_watch_raises_at_the_limit():
    reset_compile_caches()
    f, x = _recompiling(), torch.ones(3)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.raises(Exception, match="recompile limit|fail_on_recompile"):
        with RecompileWatch(strict=True):
            for n in range(1, 5):
                f(x, "a" * n)
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # restored on the way out
    reset_compile_caches()


# --- the Trainer applies them: determinism, autotuning, the recompile count in the summary --------


def _spec(tmp_path, **runtime):
    from kdgraph.spec import load_spec

    from _runtime_helpers import tiny_spec

    return load_spec(tiny_spec(tmp_path / "run", "kd", epochs=1, runtime={"log_every": 50, **runtime}))


def test_a_deterministic_spec_turns_on_deterministic_algorithms_and_no_autotuning(tmp_path):
    from kdgraph.runtime.loop import Trainer

    try:
        trainer = Trainer.from_spec(_spec(tmp_path, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert trainer.config.deterministic and not trainer.config.cudnn_benchmark
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_run_counts_recompile_limit_hits_in_its_summary_and_warns_at_the_end(tmp_path, capfd, monkeypatch):
    """A hit is what Dynamo logs (a real one is tested above with the eager backend): here the
    step logs that record itself, so the run stays an eager CPU run of seconds."""
    import logging

    from kdgraph.runtime.loop import Trainer, train

    step = Trainer.train_step

    def step_that_hits_the_limit(self, xb, yb):
        if self.global_step == 1:
            logging.getLogger(RecompileWatch.LOGGER).warning(
                "torch._dynamo hit config.%s (%s)\n   function: %s", "recompile_limit", 8, "'forward' (distiller.py:1)")
        return step(self, xb, yb)

    monkeypatch.setattr(Trainer, "train_step", step_that_hits_the_limit)
    summary = train(_spec(tmp_path))
    assert summary["compile"]["recompile_limit_hits"] == 1
    assert summary["compile"]["functions_gone_eager"] == ["'forward' (distiller.py:1)"]
    assert summary["compile"]["enabled"] is False and summary["compile"]["cudnn_benchmark"] is False
    assert "recompile limit 1 time(s)" in capfd.readouterr().out


def test_a_run_without_hits_says_zero_and_no_warning(tmp_path, capfd):
    from kdgraph.runtime.loop import train

    summary = train(_spec(tmp_path))
    assert summary["compile"]["recompile_limit_hits"] == 0
    assert "recompile limit" not in capfd.readouterr().out


def _counting(trainer):
    """Wrap the training loader's epoch() to count the batches it yields."""
    read = []
    epoch = trainer.data.train.epoch

    def counted(e, start=0):
        for batch in epoch(e, start):
            read.append(e)
            yield batch

    trainer.data.train.epoch = counted
    return read


@pytest.mark.parametrize("bound, expected", [(3, 3), (None, "epoch"), (10**6, "epoch")])
def test_bn_recalibration_reads_at_most_its_bound_of_batches_once_per_step(tmp_path, bound, expected):
    from kdgraph.runtime.loop import Trainer

    trainer = Trainer.from_spec(_spec(tmp_path, bn_recalibrate=True, bn_recalibrate_batches=bound))
    read = _counting(trainer)
    trainer.evaluator.evaluate(trainer.global_step)
    assert len(read) == (len(trainer.data.train) if expected == "epoch" else expected)
    trainer.evaluator.evaluate(trainer.global_step)  # nothing trained since: the statistics are those of the last pass
    assert len(read) == (len(trainer.data.train) if expected == "epoch" else expected)
    trainer.global_step += 1
    trainer.evaluator.evaluate(trainer.global_step)
    assert len(read) == 2 * (len(trainer.data.train) if expected == "epoch" else expected)


def test_a_bounded_recalibration_estimates_what_its_batches_hold(tmp_path):
    """Independent truth: one BatchNorm's statistics after a bound of 2 batches are the mean and
    the (unbiased) variance of its input over exactly those two batches."""
    from kdgraph.runtime.loop import Trainer

    trainer = Trainer.from_spec(_spec(tmp_path, bn_recalibrate=True, bn_recalibrate_batches=2))
    bn = next(m for m in trainer.distiller.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    trainer.evaluator.recalibrate_bn(trainer.global_step)
    hook.remove()
    x = torch.cat(seen).transpose(0, 1).flatten(1)
    assert len(seen) == 2
    torch.testing.assert_close(bn.running_mean, x.mean(1), rtol=1e-4, atol=1e-5)
    # a cumulative average of per-batch unbiased variances, as torch's BatchNorm keeps with momentum None
    per_batch = torch.stack([s.transpose(0, 1).flatten(1).var(1) for s in seen]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch, rtol=1e-4, atol=1e-5)
