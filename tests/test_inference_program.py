"""For every shipped spec: the plan's inference program (what evaluation, BatchNorm
recalibration and export run) computes what the exported student computes, through
``student.safetensors`` and back (``export_student`` / ``load_student``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdgraph.compiler import compile_spec
from kdgraph.compiler.program import inference_program
from kdgraph.runtime.distiller import Distiller
from kdgraph.runtime.export import export_student, load_student
from kdgraph.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
QUICK = {"quickstart", "quickstart-teacher", "fashion-unet", "fashion-unet-teacher", "custom-module", "fashion-ddpm",
         "fashion-ddpm-teacher"}


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=() if p.stem in QUICK else pytest.mark.slow)
                                  for p in SPECS])
def test_inference_program_equals_the_exported_student(path, tmp_path):
    torch.manual_seed(0)
    c = compile_spec(load_spec(path), allow_missing_weights=True)  # random weights: nothing fetched
    d = Distiller(c)
    with torch.no_grad():  # adapters with statistics of their own, so that folding has something to fold
        for m in d.adapters.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    d.eval()
    x = torch.randn(2, *c.input_size)
    if c.task == "causal_lm":  # token ids
        x = torch.randint(0, 256, (2, c.input_size[-1]))
    side = tuple(torch.randint(0, s.high, (2,)) for s in c.student.traced.side)  # a denoiser's t (and y)
    with torch.no_grad():
        ref = d.inference(x, side)
        exported = load_student(c, export_student(d, c, tmp_path / "student.safetensors")).eval()
        got = exported(x, *side)
    # the program evaluation ran: the plan's, rebuilt here from the block graph (equal, not the
    # same object), running every student block once, in order, up to its output
    rebuilt = inference_program(c.graph, c.plan.chains_adapters)
    assert d.inference_program == rebuilt and d.inference_program is not rebuilt
    assert [op.block for op in rebuilt.ops if op.kind == "student"] == list(range(1, c.plan.k + 1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
