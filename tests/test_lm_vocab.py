"""The shared vocabulary of a teacher and a student (kdgraph/lm/vocab.py): a padded teacher
output is allowed, tokenizers that disagree are refused naming the first differing id.

Independent truth: vocabularies written out here, and transformers' own GPT-2-style BPE
tokenizer built from a vocabulary file in a temporary folder (no download)."""

from __future__ import annotations

import json

import pytest

from kdgraph.errors import ModelError
from kdgraph.lm.vocab import shared_vocabulary

BASE = {"<pad>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4}


def test_a_padded_teacher_shares_the_students_ids():
    assert shared_vocabulary(BASE, BASE, teacher_logits=8, student_logits=5) == 5
    assert shared_vocabulary(BASE, dict(BASE), teacher_logits=5, student_logits=5) == 5


def test_tokenizers_that_differ_are_refused_at_the_first_differing_id():
    other = {**BASE, "ab": 4, "ba": 3}
    with pytest.raises(ModelError) as err:
        shared_vocabulary(BASE, other, 6, 5)
    text = str(err.value)
    assert "differ at id 3: teacher 'ab', student 'ba'" in text and "\n" not in text
    with pytest.raises(ModelError, match="differ at id 5: teacher 'x', student '<none>'"):
        shared_vocabulary({**BASE, "x": 5}, BASE, 8, 6)


def test_a_narrower_teacher_or_a_token_past_the_students_logits_is_refused():
    with pytest.raises(ModelError, match="teacher's output has 4 ids"):
        shared_vocabulary(BASE, BASE, 4, 5)
    with pytest.raises(ModelError, match="names id 4 .'ba'., past its 4 output logits"):
        shared_vocabulary(BASE, BASE, 4, 4)


def test_transformers_tokenizers_are_read_through_get_vocab(tmp_path):
    transformers = pytest.importorskip("transformers")
    merges = "#version: 0.2\na b\n"
    for name, vocab in (("t", BASE), ("s", {**BASE, "ab": 4, "ba": 3})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.json").write_text(json.dumps(vocab))
        (tmp_path / name / "merges.txt").write_text(merges)
    t = transformers.GPT2Tokenizer(str(tmp_path / "t" / "vocab.json"), str(tmp_path / "t" / "merges.txt"))
    s = transformers.GPT2Tokenizer(str(tmp_path / "s" / "vocab.json"), str(tmp_path / "s" / "merges.txt"))
    n = len(t.get_vocab())
    assert shared_vocabulary(t, t, n + 3, n) == n
    with pytest.raises(ModelError, match="differ at id 3"):
        shared_vocabulary(t, s, n, n)
