import pytest
import torch

from kdgraph.schedules import ONECYCLE_PCT_START, LRSchedule, build_lr_scheduler, stage_at, stage_starts


def _lrs(kind, stage_epochs, spe, peak, min_ratio=0.0):
    s = LRSchedule(kind, peak, tuple(stage_epochs), spe, min_ratio)
    return [s.lr_at(k) for k in range(s.total_steps)]


def test_stage_cyclic_hand_table():
    # stages [2, 1] epochs x 2 steps: stage 0 has 4 steps (peak 0.4), stage 1 has 2 (peak 0.2).
    # Triangle sampled at step centres u = (k + .5) / n: stage 0 u = 1/8, 3/8, 5/8, 7/8 ->
    # height 1/4, 3/4, 3/4, 1/4; stage 1 u = 1/4, 3/4 -> height 1/2, 1/2.
    want = [0.1, 0.3, 0.3, 0.1, 0.1, 0.1]
    assert _lrs("stage_cyclic", [2, 1], 2, 0.4) == pytest.approx(want)


def test_stage_cyclic_hand_table_with_min():
    # min = 0.2; amplitude 0.2 in stage 0, 0.1 in stage 1 (triangular2 halves the amplitude).
    want = [0.25, 0.35, 0.35, 0.25, 0.25, 0.25]
    assert _lrs("stage_cyclic", [2, 1], 2, 0.4, min_ratio=0.5) == pytest.approx(want)


def test_stage_cyclic_single_step_stage_trains_at_peak():
    assert _lrs("stage_cyclic", [1, 1, 1], 1, 0.8) == pytest.approx([0.8, 0.4, 0.2])


def test_stage_cyclic_shape_and_stage_of():
    s = LRSchedule("stage_cyclic", 1.0, (3, 3, 4), 10)
    lrs = [s.lr_at(k) for k in range(s.total_steps)]
    for stage, (start, e) in enumerate(zip(s.stage_starts, s.stage_epochs)):
        seg = lrs[start : start + e * 10]
        half = len(seg) // 2
        assert all(a < b for a, b in zip(seg[:half], seg[1:half]))
        assert all(a > b for a, b in zip(seg[half:], seg[half + 1 :]))
        assert max(seg) <= 1.0 / 2**stage + 1e-12
        assert max(seg) > 0.9 / 2**stage
        assert s.stage_of(start) == stage and s.stage_of(start + e * 10 - 1) == stage


def test_stage_cyclic_skips_empty_stages():
    assert _lrs("stage_cyclic", [1, 0, 1], 1, 0.8) == pytest.approx([0.8, 0.2])


def test_cosine_boundaries_and_monotone():
    s = LRSchedule("cosine", 0.5, (5,), 4, 0.1)
    lrs = [s.lr_at(k) for k in range(s.total_steps)]
    assert lrs[0] == pytest.approx(0.5)
    assert s.lr_at(s.total_steps) == pytest.approx(0.05)
    assert s.lr_at(s.total_steps // 2) == pytest.approx((0.5 + 0.05) / 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert min(lrs) > 0.05


def test_onecycle_boundaries():
    s = LRSchedule("onecycle", 1.0, (4, 6), 10)
    lrs = [s.lr_at(k) for k in range(s.total_steps)]
    peak_step = lrs.index(max(lrs))
    assert abs(peak_step - ONECYCLE_PCT_START * s.total_steps) <= 1
    assert all(a < b for a, b in zip(lrs[:peak_step], lrs[1 : peak_step + 1]))
    assert all(a > b for a, b in zip(lrs[peak_step:], lrs[peak_step + 1 :]))
    assert 0 < lrs[0] < 0.05 and 0 < lrs[-1] < 0.01
    assert max(lrs) <= 1.0


def test_constant():
    assert _lrs("constant", [2, 3], 3, 0.3) == pytest.approx([0.3] * 15)


def test_bad_kind_lists_valid():
    with pytest.raises(ValueError, match="stage_cyclic"):
        LRSchedule("linear", 0.1, (1,), 1)


def test_lambda_lr_follows_schedule_and_resumes():
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.4)
        return opt, build_lr_scheduler(opt, "stage_cyclic", 0.4, [2, 1], 2)

    opt, sched = make()
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if len(seen) == 3:
            state = sched.state_dict()
    assert seen == pytest.approx([0.1, 0.3, 0.3, 0.1, 0.1, 0.1])

    opt2, sched2 = make()
    sched2.load_state_dict(state)
    # LambdaLR sets the lr on step(); after loading, recompute it for the restored step
    for g, lr in zip(opt2.param_groups, sched2.get_last_lr()):
        g["lr"] = lr
    resumed = []
    for _ in range(3):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(seen[3:])


def test_epoch_to_stage():
    """Stages of 2, 3 and 1 epochs: epochs 0-1 are stage 0, 2-4 stage 1, 5 stage 2; past the
    end, the last stage; a stage of no epochs holds none."""
    assert stage_starts([2, 3, 1]) == (0, 2, 5)
    assert [stage_at([2, 3, 1], e) for e in range(8)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [stage_at([2, 0, 1], e) for e in range(3)] == [0, 0, 2]
