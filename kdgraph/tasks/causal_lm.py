"""Causal language modelling (``task: causal_lm``, inferred from ``data.dataset: text``).

- **Batches**: packed windows of ``data.seq_len`` + 1 tokens (``kdgraph.lm.text.Windows``),
  inputs (B, T) and next-token targets (B, T); training window ``index`` of ``epoch`` is drawn
  from (seed, epoch, index) alone, so a resumed run reads the same batches. The last
  ``HOLDOUT`` of the tokens is the held-out (test) split, read in order. With
  ``data.val_fraction`` > 0 the last share of the rest is a validation split: evaluation during
  training and the best epoch read it, the held-out split is scored once, at the end (as the
  image tasks' test split); without one every evaluation reads the held-out split.
- **Tokens**: UTF-8 bytes (``ByteTokenizer``, ids 0..255: the models need 256 ids or more),
  or ``data.tokenizer``'s Hugging Face tokenizer (its ids must fit the student's and the
  teacher's ``vocab_size``), tokenised once into ``OUTPUT/tokens/``
  (``kdgraph.lm.text.token_file``). Bits per byte count each target row's decoded UTF-8 bytes.
- **Head loss**: ``loss.token``'s per-token divergence (forward_kl by default; reverse_kl,
  skew_kl, jsd) plus ``ce_weight`` · CE with a teacher; next-token CE (``token_ce``) without.
- **Metrics** of the held-out split: ``loss`` (mean next-token CE, nats), ``ppl`` = e^loss and
  ``bpb`` = Σ CE / ln 2 / Σ bytes of the targets (comparable across tokenizers); best = the
  lowest bits per byte. The teacher is scored beside the student.
- **Report**: greedy continuations of the first held-out windows' openings, by the student and
  the teacher, in ``OUTPUT/samples.txt``.
- **Export**: a Hugging Face folder (``kdgraph.lm.hf_export``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdgraph.errors import DataError, KDGraphError
from kdgraph.registry import causal_lm_head
from kdgraph.runtime.runs import RunFolder
from kdgraph.tasks import register_task
from kdgraph.tasks.base import Task

__all__ = ["CausalLMTask", "TextData", "WindowLoader"]

HOLDOUT = 0.05  # the held-out share of the tokens (the end of the text)
PROMPT_TOKENS = 32  # the opening of a held-out window a sample continues
SAMPLES = 3
BYTES_PER_ID = 1  # the byte tokenizer's: each id is one UTF-8 byte


class WindowLoader:
    """Batches (x, y) of one split's windows: (B, T) int64 inputs and next-token targets.
    Training: the first ``fraction`` of each epoch's drawn order (``data.fraction``) in full
    batches (the last partial one dropped), rank ``rank`` of ``world_size`` reading its share of
    each step's windows. Held-out: every window, in order."""

    def __init__(self, windows, split: str, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, fraction: float = 1.0):
        self.windows, self.split, self.batch_size, self.seed = windows, split, int(batch_size), int(seed)
        self.device, self.rank, self.world_size = device, rank, world_size
        self.count = windows.count(split) if split != "train" else int(windows.count(split) * fraction)
        if split == "train" and self.count < self.batch_size * world_size:
            raise DataError(f"data.batch_size {self.batch_size} × {world_size} rank(s) is more than the "
                            f"{self.count} training windows of {windows.seq_len} tokens; lower data.batch_size")

    def __len__(self) -> int:
        if self.split == "train":
            return self.count // (self.batch_size * self.world_size)
        return math.ceil(self.count / self.batch_size)

    @property
    def samples_per_rank(self) -> int:
        """Training windows this rank reads per epoch (full batches)."""
        return len(self) * self.batch_size

    def data_sha256(self) -> str:
        """SHA-256 of the split's tokens: what the teacher cache's replay checks against its build."""
        return self.windows.sha256(self.split)

    def indices(self, step: int) -> range:
        """The window indices of ``step`` read by this rank."""
        if self.split == "train":
            start = (step * self.world_size + self.rank) * self.batch_size
            return range(start, start + self.batch_size)
        return range(step * self.batch_size, min((step + 1) * self.batch_size, self.count))

    def epoch(self, epoch: int, start_step: int = 0):
        """(x, y) of ``epoch`` from step ``start_step``."""
        for step in range(start_step, len(self)):
            rows = np.stack([self.windows.window(self.split, i, self.seed, epoch) for i in self.indices(step)])
            batch = torch.from_numpy(rows).to(self.device)
            yield batch[:, :-1], batch[:, 1:]

    def state_dict(self, epoch: int, step: int) -> dict[str, Any]:
        return {"loader": "text", "epoch": epoch, "step": step, "seed": self.seed, "num_samples": self.count,
                "batch_size": self.batch_size, "world_size": self.world_size}


@dataclass
class TextData:
    """A causal LM run's data, read as ``kdgraph.data.Data`` is: ``train``, ``test`` (the
    held-out windows) and ``val`` (the validation windows, or None) loaders; ``tokens`` names
    the token file (tokenizer and text keyed)."""

    plan: Any
    train: WindowLoader
    test: WindowLoader
    tokens: str
    num_classes: int = 256  # the tokenizer's ids
    val: WindowLoader | None = None
    mean: tuple = ()
    std: tuple = ()
    stats: str = "token ids (no normalisation)"

    @property
    def eval_split(self) -> str:
        """What evaluation during training (and the best epoch) reads: "val" or "heldout"."""
        return "heldout" if self.val is None else "val"

    @property
    def eval_loader(self) -> WindowLoader:
        return self.test if self.val is None else self.val

    def bad_images(self) -> dict[str, str]:
        return {}

    def test_samples(self) -> int:
        return self.test.count

    def state_dict(self, epoch: int, step: int) -> dict[str, Any]:
        return {**self.train.state_dict(epoch, step), "tokens": self.tokens}

    def check_resume(self, state: dict[str, Any] | None, where: str) -> None:
        """Refuse a checkpoint written for other windows (text, tokenizer, seq_len, seed, batch, ranks)."""
        now = self.state_dict(state["epoch"], state["step"]) if state else {}
        keys = ("loader", "tokens", "num_samples", "seed", "batch_size", "world_size")
        diff = [f"{k} {state.get(k)} then, {now[k]} now" for k in keys if state and state.get(k) != now[k]]
        if diff:
            raise DataError(f"{where} was written for other training data ({'; '.join(diff)}); resume with the "
                            "data it was trained on, or start over with --force")

    def record(self) -> dict[str, Any]:
        w = self.train.windows
        return {"loader": "text", "tokens": len(w.tokens), "token_file": self.tokens, "seq_len": w.seq_len,
                "train_windows": self.train.count, "val_windows": 0 if self.val is None else self.val.count,
                "heldout_windows": self.test.count, "holdout": w.holdout, "val_fraction": w.val}


def _vocab_size(model) -> int | None:
    return getattr(model, "vocab_size", None)


@register_task
class CausalLMTask(Task):
    """Next-token prediction on packed text windows (see the module's docstring)."""

    name = "causal_lm"
    head_loss = staticmethod(causal_lm_head)
    metrics = ("loss", "ppl", "bpb")
    best_metric = "bpb"
    higher_is_better = False

    def __init__(self, spec, compiled):
        super().__init__(spec, compiled)
        self.vocab = _vocab_size(compiled.student.model)
        self.teacher_vocab = _vocab_size(compiled.teacher.model) if compiled.teacher is not None else None
        self.tokenizer = None  # build_data's: the ids' byte counts (bpb) and the samples' text
        self.output_dir = Path(spec.output_dir)
        self.samples: dict[str, list[str]] = {}

    def build_data(self, spec, plan, device, dist_info, channels_last: bool = False) -> TextData:
        from kdgraph.lm.text import Windows, token_file, tokenizer_of, vocabulary_size  # at call time: import order

        d = spec.data
        if d.root is None:
            raise DataError("data.root: text needs a folder of UTF-8 .txt files or a .jsonl file")
        if not Path(d.root).exists():
            raise DataError(f"data.root: {d.root} does not exist" + (
                " (run `make shakespeare` to fetch it)" if "shakespeare" in str(d.root) else ""))
        tokenizer = self.tokenizer = tokenizer_of(d)
        tokens = token_file(d.root, tokenizer, RunFolder(self.output_dir).tokens, write=self.writes_output)
        windows = Windows(tokens, int(d.seq_len), HOLDOUT, float(d.val_fraction))
        train = WindowLoader(windows, "train", d.batch_size, spec.seed, device, dist_info.rank, dist_info.world_size,
                             d.fraction)
        test, val = (WindowLoader(windows, split, d.test_batch_size or d.batch_size, spec.seed, device)
                     for split in ("heldout", "val"))
        return TextData(plan, train, test, tokens=Path(tokens.filename).name, val=val if d.val_fraction > 0 else None,
                        num_classes=vocabulary_size(tokenizer))

    def check_data(self, data, dataset: str) -> None:
        which = "the byte tokenizer" if self.tokenizer is None or not hasattr(self.tokenizer, "backend_tokenizer") \
            else "data.tokenizer"
        for who, vocab in (("student", self.vocab), ("teacher", self.teacher_vocab)):
            if vocab is not None and vocab < data.num_classes:
                raise KDGraphError(f"{dataset}: {which} has {data.num_classes} ids but the {who}'s vocabulary holds "
                                   f"{vocab}: set {who}.kwargs.vocab_size: {data.num_classes} (or use a tokenizer "
                                   "that fits it)")

    def batches(self, loader, epoch: int, start: int = 0):
        return ((x, y, None) for x, y in loader.epoch(epoch, start))

    def prepare(self, xb, yb, idx, epoch, step, mix):
        return xb, yb, ()  # no mixing of token ids

    def score(self, forward, loader, device, precision="fp32", channels_last=False) -> dict[str, float]:
        """Held-out mean CE (nats per token), its perplexity, and bits per byte."""
        nats, tokens, nbytes = 0.0, 0, 0
        with torch.no_grad():
            for x, y in loader.epoch(0):
                logits = forward(x).float()
                nats += float(F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="sum"))
                tokens += y.numel()
                nbytes += self._bytes(y)
        loss = nats / max(tokens, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nats / math.log(2) / max(nbytes, 1)}

    def _bytes(self, y: torch.Tensor) -> int:
        """UTF-8 bytes of the target rows: one per id (bytes), else each row decoded by the tokenizer."""
        if self.tokenizer is None or not hasattr(self.tokenizer, "backend_tokenizer"):
            return y.numel() * BYTES_PER_ID
        return sum(len(self.tokenizer.decode(row.tolist()).encode("utf-8")) for row in y.cpu())

    def describe(self, score: dict[str, float]) -> str:
        return (f"held-out loss {score['loss']:.4f} nats/token, perplexity {score['ppl']:.2f}, "
                f"{score['bpb']:.4f} bits per byte")

    @classmethod
    def headline(cls, summary: dict, teacher: bool = False) -> str | None:
        if summary.get("student_bpb") is None:
            return None
        out = f"student {summary['student_bpb']:.4f} bits per byte"
        return out + (f", teacher {summary['teacher_bpb']:.4f}" if teacher and summary.get("teacher_bpb") is not None
                      else "")

    def reports(self, run) -> dict:
        """Greedy continuations by the student (and teacher) of held-out openings: samples.txt."""
        prompts = self._generate(run)
        path = RunFolder(self.output_dir).text_samples
        path.write_text(_samples_text(prompts, self.samples, self.tokenizer), encoding="utf-8")
        return {"samples": str(path)}

    def reports_elsewhere(self, run) -> dict:
        """Another rank's share of the main one's reports: where the student or the teacher is
        sharded, its forward gathers from every rank, so every rank generates the same samples."""
        teacher = run.distiller.teacher
        if run.config.shard_student or (teacher is not None and teacher.sharded):
            self._generate(run)
        return {}

    def _generate(self, run) -> list:
        """``self.samples``: the greedy continuations of the held-out openings (returned)."""
        loader = run.data.test
        opening = min(PROMPT_TOKENS, loader.windows.seq_len // 2)
        prompts = [loader.windows.window("heldout", i)[:opening] for i in range(min(SAMPLES, loader.count))]
        was = run.distiller.training
        run.distiller.eval()
        try:
            models = {"student": lambda x: run.distiller.inference(x, ())}
            if run.distiller.teacher is not None:
                models["teacher"] = run.distiller.teacher
            self.samples = {who: [greedy(f, p, loader.windows.seq_len, loader.device) for p in prompts]
                            for who, f in models.items()}
        finally:
            run.distiller.train(was)
        return prompts

    @classmethod
    def check_export(cls, spec) -> None:
        from kdgraph.lm.hf_export import check_exportable

        check_exportable(spec)

    def ship(self, spec, compiled, maps, path, to, command) -> dict:
        from kdgraph.lm.hf_export import ship_causal_lm
        from kdgraph.runtime.ship import INCOMPLETE, _begin_export, check_destination, clear_earlier_export

        to = _begin_export(check_destination(Path(to)))  # new, empty, or an earlier (or killed) kdgraph export
        clear_earlier_export(to)  # an earlier timm-layout export's weights, program and card
        shipped = ship_causal_lm(compiled, maps, path, to, command, getattr(spec.data, "tokenizer", None))
        (to / INCOMPLETE).unlink()  # last: until here a rerun writes over the folder
        return shipped


@torch.no_grad()
def greedy(forward, prompt: np.ndarray, seq_len: int, device) -> list[int]:
    """``prompt`` continued greedily to ``seq_len`` tokens by ``forward`` ((1, T) ids -> logits
    (1, T, V)). The input is always ``seq_len`` long (a traced student's length), zero-filled
    after the text: a causal model's logits at position i read tokens 0..i only."""
    ids = [int(t) for t in prompt]
    while len(ids) < seq_len:
        x = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        x[0, :len(ids)] = torch.tensor(ids, device=device)
        ids.append(int(forward(x)[0, len(ids) - 1].argmax()))
    return ids


def _decode(ids, tokenizer=None) -> str:
    if tokenizer is not None and hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.decode([int(i) for i in ids])
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _samples_text(prompts, samples: dict[str, list[list[int]]], tokenizer=None) -> str:
    parts = []
    for i, prompt in enumerate(prompts):
        parts.append(f"=== sample {i + 1}: prompt ===\n{_decode(prompt, tokenizer)}\n")
        for who, runs in samples.items():
            parts.append(f"--- {who} continues ---\n{_decode(runs[i][len(prompt):], tokenizer)}\n")
    return "\n".join(parts)

