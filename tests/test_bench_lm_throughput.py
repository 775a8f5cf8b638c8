"""bench/lm_throughput.py's counts (``--count-ops``), which pin kdgraph's causal-LM step to the
hand-written transformers KD loop beside it: on the same pair and batch, one forward of the
teacher and one of the student, no host read (a device sync on a GPU) the loop does not make,
no pass over a vocabulary-wide tensor the loop does not make (its loss's included, in chunks or
whole), and outside the token loss not one aten op more than the loop. The independent truth
is the hand loop's own count, taken in the same run; the counter itself is checked on ops
whose counts are known (an ``.item()``, a view, a scatter)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import lm_throughput  # noqa: E402  (bench/ is not a package)

VOCAB, BATCH, SEQ = 512, 4, 16


def _runners(tmp_path: Path, chunk: int):
    from kdgraph.runtime.loop import Trainer

    args = argparse.Namespace(device="cpu", family="llama", teacher_layers=2, width=64, vocab=VOCAB, seq=SEQ,
                              batch=BATCH, ce_weight=0.5, chunk=chunk)
    root = tmp_path / "text"
    root.mkdir()
    (root / "random.txt").write_bytes(bytes(np.random.default_rng(0).integers(97, 123, size=4000).astype(np.uint8)))
    torch.manual_seed(0)
    run = Trainer.from_spec(lm_throughput.make_spec(args, root, tmp_path / "run"))
    run.distiller.set_stage(run.compiled.plan.stages[0])
    run.distiller.train()
    x, y = next(iter(run.data.train.epoch(0)))
    loop = lm_throughput.HandLoop(run.compiled.teacher.model, run.compiled.student.model, "cpu", args.ce_weight)
    return run, loop, x, y


@pytest.mark.parametrize("chunk", [BATCH * SEQ, 16])  # the loss in one chunk, and in four
def test_kdgraphs_step_does_no_more_than_the_hand_loop(tmp_path, chunk):
    run, loop, x, y = _runners(tmp_path, chunk)
    assert run.distiller.losses["head_loss"].chunk == chunk
    counts = lm_throughput.compare_counts(run, loop, x, y, VOCAB)
    kd, hand = counts["kdgraph"], counts["loop"]
    assert (kd["teacher_forwards"], kd["student_forwards"]) == (hand["teacher_forwards"], hand["student_forwards"]) \
        == (1, 1)
    assert kd["host_reads"] <= hand["host_reads"] and kd["loss"]["host_reads"] == 0
    assert kd["vocab_elements"] <= hand["vocab_elements"]
    assert 0 < kd["loss"]["vocab_elements"] <= hand["loss"]["vocab_elements"]
    assert kd["aten_ops"] - kd["loss"]["aten_ops"] <= hand["aten_ops"] - hand["loss"]["aten_ops"]
    # the counts are of the step: the loss alone is a part of it, and the models' passes the rest
    assert kd["loss"]["vocab_elements"] < kd["vocab_elements"] and hand["loss"]["aten_ops"] < hand["aten_ops"]


def test_the_counter_counts_host_reads_elements_and_vocabulary_passes():
    s = torch.randn(6, VOCAB)
    idx = torch.zeros(6, 1, dtype=torch.long)
    with lm_throughput.StepCounter(VOCAB) as c:
        v = s.view(3, 2, VOCAB)  # a view: no element written
        e = s.exp()  # one pass over a vocabulary-wide tensor
        e.scatter_add_(1, idx, torch.ones(6, 1))  # six elements, no pass
        m = s.sum(-1)  # six elements, not vocabulary-wide
        float(m[0])  # a host read
    assert v.shape == (3, 2, VOCAB)
    assert c.reads == 1
    assert c.vocab_elements == 6 * VOCAB
    assert c.elements == 6 * VOCAB + 6 + 6 + 6  # exp, the ones, the scatter, the sum (a read gives a number)
    with lm_throughput.StepCounter(VOCAB, skip=frozenset({m.data_ptr()})) as c:
        m.sum().item()
        m[0].item()  # m's storage: a skipped tensor's read (the optimizer's step counters)
    assert c.reads == 1
