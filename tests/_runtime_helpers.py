"""Helpers of the tests: ``tiny_spec`` (the one tiny digits spec, as a dict: the zoo's tiny
ResNets on the CPU at 1x8x8; ``load_spec(tiny_spec(...))`` validates it) and running the
CLI in a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "module:kdgraph.zoo:resnet_tiny_teacher"
STUDENT = "module:kdgraph.zoo:resnet_tiny_student"
KW = {"num_classes": 10, "in_chans": 1}


def tiny_spec(output="runs/tiny", method: str = "stablekd", *, blocks: int = 4, recompositions: int = 2, epochs: int = 3,
              teacher: bool = True, teacher_checkpoint=None, student: str = STUDENT, fraction: float = 0.25,
              batch_size: int = 16, **sections) -> dict:
    """A spec dict for a tiny digits run; ``sections`` are merged into the top-level sections."""
    spec = {
        "name": f"tiny-{method}",
        "seed": 0,
        "student": {"model": student, "kwargs": dict(KW)},
        "data": {"dataset": "digits", "batch_size": batch_size, "fraction": fraction},
        "decompose": {"blocks": blocks},
        "schedule": {"method": method, "epochs": epochs},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "runtime": {"device": "cpu", "log_every": 1, "num_threads": 1},
        "output": str(output),
    }
    if method == "stablekd":
        spec["schedule"]["recompositions"] = recompositions
    if teacher and method != "supervised":
        spec["teacher"] = {"model": TEACHER, "kwargs": dict(KW)}
        if teacher_checkpoint is not None:
            spec["teacher"]["checkpoint"] = str(teacher_checkpoint)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return copy.deepcopy(spec)


def randomise_bn(module, seed):
    """Non-trivial BatchNorm affine parameters and running statistics (drawn from ``seed``), so
    that folding and export must use the running statistics, not the identity they start at."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


def write_spec(spec: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "200"
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdgraph", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(*args), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def train_here(spec):
    """kdgraph.runtime.loop.train in this process, restoring torch's thread count after
    (the spec's runtime.num_threads would otherwise leak into the tests that follow)."""
    import torch

    from kdgraph.runtime.loop import train

    threads = torch.get_num_threads()
    try:
        return train(spec)
    finally:
        torch.set_num_threads(threads)


def plain_timm_outputs(folder: Path, x, work: Path, timeout: int = 300):
    """The logits of the exported student in ``folder`` on ``x``, computed by plain timm
    (``local-dir:``) in a fresh process that never imports kdgraph (asserted there)."""
    import torch

    torch.save(x, work / "x.pt")
    code = f"""
import sys, warnings, torch, timm
warnings.simplefilter("ignore")
model = timm.create_model("local-dir:{folder}", pretrained=True).eval()
with torch.no_grad():
    torch.save(model(torch.load("{work / 'x.pt'}")), "{work / 'y.pt'}")
assert not any(k.startswith("kdgraph") for k in sys.modules)
"""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=work, env=env, timeout=timeout)
    return torch.load(work / "y.pt")


def tiny_tokenizer(folder, sentences, vocab_size: int = 300, lowercase: bool = False):
    """A BPE tokenizer trained here on ``sentences`` with the ``tokenizers`` library (byte-level
    pre-tokeniser, an <eos> token; optionally a lowercasing normaliser), wrapped in transformers'
    PreTrainedTokenizerFast and saved to ``folder``: no download. Returns the wrapped tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(str(folder))
    return fast
