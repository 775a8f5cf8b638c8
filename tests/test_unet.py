"""Non-sequential networks: the zoo's U-Net, cut at multi-tensor boundaries end to end.

Independent truth: the skip tensors of ``kdgraph.zoo.UNetTiny`` listed by hand from its
forward (enc1 and enc2 cross to the decoder, the bottleneck feeds it), the model's own eager
forward, the teacher segments and adapters composed by hand, and the per-pixel losses
written out with log-softmax sums.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from kdgraph.compiler import compile_spec
from kdgraph.compiler import blockgraph
from kdgraph.compiler.boundaries import choose_boundaries
from kdgraph.compiler.cuts import find_cuts
from kdgraph.compiler.split import split_segments
from kdgraph.compiler.stages import find_stages
from kdgraph.compiler.trace import trace
from kdgraph.losses import HeadLoss
from kdgraph.render import plan_view
from kdgraph.runtime.chain import StudentChain, call_segment
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.evaluate import accuracy
from kdgraph.runtime.export import export_student, folded_maps, load_student
from kdgraph.spec import load_spec
from kdgraph.zoo import resnet_tiny_student, unet_tiny, unet_tiny_student, unet_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "fashion-unet.yaml"
FASHION = Path("/usr/share/datasets/fashion-mnist")
TEMP = 2.0

# By hand, from UNetTiny.forward: what is live after each encoder level and the bottleneck.
# (fx names the last layer of the Sequential enc1 "enc1_5", and so on.)
SKIPS = {
    "enc1_5": ("enc1_5",),  # enc1's output alone: a single-tensor cut
    "enc2_5": ("enc1_5", "enc2_5"),  # enc1 waits for dec1, enc2 is the next level's input
    "bottleneck_5": ("enc1_5", "enc2_5", "bottleneck_5"),
    "dec2_5": ("enc1_5", "dec2_5"),  # on the way up, enc2 has been used
}


def _traced(model, size=28):
    return trace(model, (1, size, size), "student")


def _bounds(traced, blocks):
    bounds = choose_boundaries(find_stages(find_cuts(traced), traced), blocks, traced)
    return [b.cut.nodes if b.cut.multi else b.cut.node for b in bounds]


def test_unet_cuts_carry_the_skip_tensors():
    traced = _traced(unet_tiny_teacher())
    cuts = {c.node: c for c in find_cuts(traced)}
    for node, tensors in SKIPS.items():
        assert cuts[node].nodes == tensors
        assert cuts[node].multi == (len(tensors) > 1)
    assert cuts["bottleneck_5"].description == "bottleneck (3 tensors: enc1, enc2, bottleneck)"
    assert [list(m.shape) for m in cuts["bottleneck_5"].members] == [[16, 28, 28], [32, 14, 14], [64, 7, 7]]
    # no single tensor crosses at 14x14 or 7x7: the skips stay live there
    assert not [c for c in cuts.values() if not c.multi and c.reduction in (2, 4)]


def test_unet_block_ends_go_down_then_up():
    traced = _traced(unet_tiny_student())
    assert _bounds(traced, 4) == [SKIPS["enc1_5"][0], SKIPS["enc2_5"], SKIPS["bottleneck_5"]]
    assert _bounds(traced, 3) == [SKIPS["enc2_5"], SKIPS["bottleneck_5"]]
    assert _bounds(traced, 5)[-1] == SKIPS["dec2_5"]


def test_sequential_models_get_no_multi_tensor_cut():
    traced = trace(resnet_tiny_student(), (1, 8, 8))
    assert find_cuts(traced) == find_cuts(traced, multi=False)
    assert not any(c.tensors for c in find_cuts(traced))


def _composed(chain: StudentChain, x: torch.Tensor):
    """Every block of ``chain`` in order (a multi-tensor cut's tuple passed on as it is)."""
    for i in range(1, len(chain.segments) + 1):
        x = chain.block(i, x)
    return x


@pytest.mark.parametrize("blocks", [2, 3, 4, 5, 6])
def test_split_and_recomposed_forward_equals_eager(blocks):
    torch.manual_seed(0)
    model = unet_tiny_teacher(drop_rate=0.3)  # dropout: train mode must draw the same masks
    traced = _traced(model)
    segments = split_segments(traced, _bounds(traced, blocks))
    assert len(segments) == blocks
    chain = StudentChain(segments)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_composed(chain, x), model(x), rtol=0, atol=0)
    # train mode, same RNG and same BatchNorm state: batch statistics and dropout agree
    twin = copy.deepcopy(model).train()
    model.train()
    torch.manual_seed(7)
    eager = twin(x)
    torch.manual_seed(7)
    split = _composed(chain, x)
    torch.testing.assert_close(split, eager, rtol=0, atol=0)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)  # running statistics moved the same way


def test_segment_takes_and_returns_every_tensor_of_its_cuts():
    traced = _traced(unet_tiny_student())
    segments = split_segments(traced, _bounds(traced, 4))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        h1 = segments[0](x)
        h2 = call_segment(segments[1], h1)
        h3 = call_segment(segments[2], h2)
    assert isinstance(h1, torch.Tensor) and len(h2) == 2 and len(h3) == 3
    assert [tuple(t.shape[1:]) for t in h3] == [(8, 28, 28), (16, 14, 14), (32, 7, 7)]
    assert h3[0] is h2[0] is h1  # enc1 crosses both cuts unchanged


@pytest.fixture(scope="module")
def compiled():
    return compile_spec(load_spec(SPEC), allow_missing_weights=True)


@pytest.fixture(scope="module")
def distiller(compiled):
    torch.manual_seed(0)
    d = Distiller(compiled)
    g = torch.Generator().manual_seed(1)
    for pairs in d.adapters.values():  # non-trivial BN state in every adapter
        for pair in pairs.pairs.values() if hasattr(pairs, "pairs") else [pairs]:
            for cm in (pair.lift, pair.lower):
                cm.bn.weight.data.uniform_(0.5, 1.5, generator=g)
                cm.bn.bias.data.uniform_(-0.5, 0.5, generator=g)
                cm.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
                cm.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return d


def _batch(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n, 28, 28), generator=g)


def test_plan_shows_multi_tensor_boundaries(compiled):
    blocks = compiled.to_dict()["blocks"]
    assert blocks[2]["student_tensors"] == list(SKIPS["bottleneck_5"])
    assert blocks[2]["teacher_tensors"] == list(SKIPS["bottleneck_5"])
    assert blocks[1]["adapter"]["kind"] == "per-tensor"
    assert [t["lift"] for t in blocks[2]["adapter"]["tensors"]] == [[8, 16], [16, 32], [32, 64]]
    assert "student_tensors" not in blocks[0]  # a single-tensor block keeps its keys
    json.dumps(compiled.to_dict())
    out = io.StringIO()
    Console(file=out, width=400).print(plan_view(compiled))
    text = out.getvalue()
    assert "bottleneck (+ enc1, enc2)" in text  # the stages tables name the skips
    assert "3 tensors: 16×28², 32×14², 64×7² / 8×28², 16×14², 32×7²" in text
    assert "conv1x1 per tensor: 8→16→8, 16→32→16, 32→64→32" in text
    assert "2 logits per pixel" in text
    g = compiled.graph
    assert g.edges["T3", "lower3"]["shape"] == [[16, 28, 28], [32, 14, 14], [64, 7, 7]]
    assert g.nodes["S4"]["out_shape"] == [2, 28, 28]
    for drawn in (blockgraph.to_dot(g), blockgraph.to_mermaid(g)):
        assert "bottleneck (3 tensors: enc1, enc2, bottleneck)" in drawn


def _teacher_by_hand(compiled, x):
    feats, h = {}, x
    with torch.no_grad():
        for i, seg in enumerate(compiled.teacher.segments, start=1):
            h = seg(*h) if isinstance(h, tuple) else seg(h)
            feats[i] = h
    return feats


def test_decomposed_block_receives_every_teacher_tensor(compiled, distiller):
    """Stage 0 trains each block alone: S4 (the decoder and head) is fed the teacher's three
    tensors at the bottleneck cut, each through its own lower; mse3 is the mean of the three
    per-tensor MSEs of lift(S3) against the teacher."""
    d = distiller
    d.set_stage(compiled.plan.stages[0])
    d.eval()  # adapters' BN in eval mode: lift/lower are fixed affine maps
    x, y = _batch()
    seen = {}
    block = d.chain.block

    def spy(i, h):
        seen[i] = h
        return block(i, h)

    d.chain.block = spy
    try:
        terms = d(x, y)
    finally:
        del d.chain.block
    t = _teacher_by_hand(compiled, x)
    pairs = d.adapters["3"].pairs
    expected = tuple(pairs[str(j)].lower(t[3][j]) for j in range(3))
    assert isinstance(seen[4], tuple) and len(seen[4]) == 3
    for got, want in zip(seen[4], expected):
        torch.testing.assert_close(got, want)
    # block 3 itself is fed the teacher's two tensors at enc2, lowered
    pairs2 = d.adapters["2"].pairs
    for j, got in enumerate(seen[3]):
        torch.testing.assert_close(got, pairs2[str(j)].lower(t[2][j]))
    s3 = d.chain.segments[2](*seen[3])
    mse3 = torch.stack([F.mse_loss(pairs[str(j)].lift(s3[j]), t[3][j]) for j in range(3)]).mean()
    torch.testing.assert_close(terms["mse3"], compiled.run.loss.feature_weight * mse3)
    # the head loss: per-pixel CE and KL of S4's logits against the teacher's
    logits = d.chain.segments[3](*seen[4])
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, y))


def test_per_pixel_head_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    y = torch.randint(0, 4, (3, 5, 6), generator=g)
    out = HeadLoss(kl_weight=0.5, temperature=TEMP)(s, y, t)
    log_p = s - torch.logsumexp(s, dim=1, keepdim=True)
    ce = -log_p.gather(1, y[:, None]).mean()  # mean over every pixel of the batch
    log_ps = s / TEMP - torch.logsumexp(s / TEMP, dim=1, keepdim=True)
    log_pt = t / TEMP - torch.logsumexp(t / TEMP, dim=1, keepdim=True)
    kl = TEMP ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()  # sum over classes, mean over pixels
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kl"], 0.5 * kl)


def test_export_recomposes_the_student_exactly(compiled, distiller, tmp_path):
    d = distiller.eval()
    d.set_stage(compiled.plan.stages[-1])
    x, _ = _batch()
    with torch.no_grad():
        ref = d.inference(x)
    path = export_student(d, compiled, tmp_path / "student.safetensors")
    fresh = compile_spec(load_spec(SPEC), allow_missing_weights=True)
    loaded = load_student(fresh, path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
    assert set(folded_maps(d)) == {1, 2, 3}


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed")
def test_fashion_masks_are_thresholded_images():
    from kdgraph.data import FOREGROUND_THRESHOLD, read_idx, create_dataset

    spec = load_spec(SPEC)
    ds = create_dataset(spec.data, 0)
    assert ds.num_classes == 2 and ds.train_y.shape[1:] == (28, 28) and ds.default_augment == "none"
    raw = torch.from_numpy(read_idx(str(next(FASHION.rglob("t10k-images-idx3-ubyte*")))).copy())
    assert torch.equal(ds.test_y, (raw > FOREGROUND_THRESHOLD).long())
    assert len(ds.train_y) == 3000  # fraction 0.05, drawn at random (no class per sample)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed")
def test_short_distillation_beats_the_untrained_student(tmp_path):
    """One epoch of a teacher, then StableKD-4/2 over three epochs: the student's pixel
    accuracy beats the untrained student's."""
    from kdgraph.data import build_loaders
    from kdgraph.runtime.loop import train

    common = ["data.fraction=0.05"]
    teacher = load_spec(ROOT / "specs" / "fashion-unet-teacher.yaml",
                        [*common, f"output={tmp_path / 't'}", "schedule.epochs=1"])
    train(teacher)
    student = load_spec(SPEC, [*common, f"output={tmp_path / 's'}",
                               f"teacher.checkpoint={tmp_path / 't' / 'student.safetensors'}"])
    summary = train(student)
    _, test, _ = build_loaders(student.data, 0, "cpu")
    torch.manual_seed(0)
    untrained = accuracy(unet_tiny(widths=(8, 16, 32)).eval(), test, torch.device("cpu"), per_pixel=True)
    assert summary["student_top1"] > untrained["top1"] + 5
    assert summary["student_miou"] > untrained["miou"]
    # `kdgraph eval` scores the same student on the same split as training's last evaluation
    from kdgraph.runtime.commands import evaluate_spec

    scores = evaluate_spec(student)
    assert scores["student_top1"] == pytest.approx(summary["student_top1"])
    assert scores["student_miou"] == pytest.approx(summary["student_miou"])


def test_ship_names_the_multi_tensor_cut_it_cannot_fold(compiled, distiller):
    from kdgraph.runtime.ship import fold_into_student

    maps = folded_maps(distiller.eval())
    folded = fold_into_student(compiled, {2: maps[2]})
    assert folded.model is None and "cut 2 carries 2 tensors" in folded.reason
