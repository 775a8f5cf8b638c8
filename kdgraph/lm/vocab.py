"""The vocabulary a teacher and a student share: token-level distillation compares their
distributions id by id, so the ids must mean the same tokens.

A teacher's output layer may be padded past its tokenizer (Qwen2.5-7B: 152064 rows, 0.5B:
151936, one tokenizer of 151665 tokens): the loss then reads the teacher's logits over the
student's ids alone (``token_losses.trim_vocabulary``). Where the tokenizers disagree on an id
the two models speak different languages, and the pair is refused in one line naming the first
id where they differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdgraph.errors import ModelError

__all__ = ["shared_vocabulary"]


def _ids(tokenizer: Any) -> dict[int, str]:
    """id -> token of a tokenizer (its ``get_vocab()``, added tokens included) or of a mapping token -> id."""
    vocab = tokenizer if isinstance(tokenizer, Mapping) else tokenizer.get_vocab()
    return {int(i): str(token) for token, i in vocab.items()}


def shared_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any, teacher_logits: int, student_logits: int) -> int:
    """The number of ids whose logits the token losses compare: the student's output width, once
    every id below it that either tokenizer names means the same token in both, and the
    teacher's output is at least as wide. Otherwise a ModelError naming the first differing id."""
    if teacher_logits < student_logits:
        raise ModelError(f"the teacher's output has {teacher_logits} ids, the student's {student_logits}: the "
                         "teacher gives no distribution over the student's last ids")
    t, s = _ids(teacher_tokenizer), _ids(student_tokenizer)
    for i in sorted(i for i in set(t) | set(s) if i < student_logits):
        if t.get(i) != s.get(i):
            raise ModelError(f"the teacher's and the student's tokenizers differ at id {i}: teacher "
                             f"{t.get(i, '<none>')!r}, student {s.get(i, '<none>')!r}; token-level distillation "
                             "needs one tokenizer (or ids that mean the same tokens)")
    beyond = sorted(i for i in s if i >= student_logits)
    if beyond:
        raise ModelError(f"the student's tokenizer names id {beyond[0]} ({s[beyond[0]]!r}), past its "
                         f"{student_logits} output logits")
    return student_logits
