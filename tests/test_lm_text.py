"""Text for a causal LM (kdgraph/lm/text.py): UTF-8 folders and JSONL read, tokenised once into
a memory-mapped token file keyed by the tokenizer and the text, packed windows drawn from
(seed, epoch, index), a held-out split.

Independent truth: the bytes of the files written here (Python's own UTF-8 encoding), and
every window checked against the token array sliced by hand.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdgraph.errors import DataError
from kdgraph.lm.text import ByteTokenizer, Windows, read_documents, text_key, token_file, tokenizer_key


class _Words:
    """A word-level tokenizer written here: one id per distinct whitespace word, in first-seen order."""

    eos_token_id = 0

    def __init__(self, words: list[str]):
        self.vocab = {"<eos>": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}

    def encode(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def _folder(tmp_path):
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("Shall I compare thee ", encoding="utf-8")
    (root / "b" / "c.txt").write_text("to a summer’s day?", encoding="utf-8")
    (root / "notes.md").write_text("not read")
    return root


def test_a_folder_is_its_txt_files_in_path_order_and_bytes_are_utf8(tmp_path):
    root = _folder(tmp_path)
    assert read_documents(root) == ["Shall I compare thee ", "to a summer’s day?"]
    tokens = token_file(root, ByteTokenizer(), tmp_path / "cache")
    assert bytes(tokens.astype(np.uint8)) == "Shall I compare thee to a summer’s day?".encode("utf-8")
    assert tokens.dtype == np.dtype("<u2") and isinstance(tokens, np.memmap)


def test_jsonl_reads_the_text_field_and_each_document_ends_with_eos(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "a b a", "id": 1}, {"text": "c"}]) + "\n\n")
    tok = _Words("a b c".split())
    assert list(token_file(path, tok, tmp_path / "cache")) == [1, 2, 1, 0, 3, 0]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:1: no text field 'text'"):
        read_documents(path)
    assert read_documents(path, field="body") == ["x"]


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"x.txt: not UTF-8 text \(byte 3"):
        read_documents(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt file"):
        read_documents(tmp_path / "empty")
    (tmp_path / "j.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"j.jsonl:1: not JSON"):
        read_documents(tmp_path / "j.jsonl")


def test_the_token_file_is_written_once_and_keyed_by_tokenizer_and_text(tmp_path):
    root, cache = _folder(tmp_path), tmp_path / "cache"
    token_file(root, ByteTokenizer(), cache)
    first = sorted(cache.iterdir())
    stamp = first[0].stat().st_mtime_ns
    token_file(root, ByteTokenizer(), cache)
    assert sorted(cache.iterdir()) == first and first[0].stat().st_mtime_ns == stamp  # read, not rewritten
    words = _Words("Shall I compare thee to a summer’s day?".split())
    assert list(token_file(root, words, cache)) == [1, 2, 3, 4, 0, 5, 6, 7, 8, 0]
    assert len(list(cache.iterdir())) == 2 and tokenizer_key(words) != tokenizer_key(ByteTokenizer())
    (root / "a.txt").write_text("Shall I compare thee to ", encoding="utf-8")
    os.utime(root / "a.txt", ns=(stamp + 10**9, stamp + 10**9))
    assert bytes(token_file(root, ByteTokenizer(), cache).astype(np.uint8)).startswith(b"Shall I compare thee to to")
    assert len(list(cache.iterdir())) == 3 and not [p for p in cache.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00garbage", b"<f8     ", b"", b"<u2", b"<u2     \x01"],
                         ids=["not-ascii", "not-a-token-dtype", "empty", "short-header", "odd-length"])
def test_a_damaged_token_file_is_a_one_line_data_error(tmp_path, damage):
    root, cache = _folder(tmp_path), tmp_path / "cache"
    token_file(root, ByteTokenizer(), cache)
    (path,) = cache.iterdir()
    path.write_bytes(damage)
    with pytest.raises(DataError, match="is damaged .* not a kdgraph token file") as info:
        token_file(root, ByteTokenizer(), cache)
    assert "\n" not in str(info.value) and path.read_bytes() == damage  # said, and left as it was


def test_without_write_nothing_is_written_and_an_existing_token_file_is_read(tmp_path):
    root, cache = _folder(tmp_path), tmp_path / "out" / "tokens"
    fresh = token_file(root, ByteTokenizer(), cache, write=False)
    assert not (tmp_path / "out").exists()
    written = token_file(root, ByteTokenizer(), tmp_path / "elsewhere")
    assert np.array_equal(fresh, written)
    cache.mkdir(parents=True)
    (path,) = (tmp_path / "elsewhere").iterdir()
    reused = cache / path.name
    reused.write_bytes(path.read_bytes()[:8] + np.array([7, 8, 9], "<u2").tobytes())  # a file told apart from the text
    stamp = reused.stat().st_mtime_ns
    assert list(token_file(root, ByteTokenizer(), cache, write=False)) == [7, 8, 9]
    assert [p.name for p in cache.iterdir()] == [reused.name] and reused.stat().st_mtime_ns == stamp


def test_windows_are_a_function_of_seed_epoch_index_and_the_held_out_tail_is_apart():
    tokens = np.arange(1000, dtype=np.uint16)
    w = Windows(tokens, seq_len=16, holdout=0.1)
    cut = 1000 - 100
    assert w.count("train") == (cut - 1) // 16 and w.count("heldout") == (100 - 1) // 16
    starts = set()
    for i in range(w.count("train")):
        win = w.window("train", i, seed=3, epoch=1)
        assert len(win) == 17 and np.array_equal(win, np.arange(win[0], win[0] + 17)) and win[-1] < cut
        assert win[0] % 16 == 0
        starts.add(int(win[0]))
    assert len(starts) == w.count("train")  # every window once per epoch
    again = Windows(np.arange(1000, dtype=np.uint16), seq_len=16, holdout=0.1)
    assert np.array_equal(again.window("train", 7, seed=3, epoch=1), w.window("train", 7, seed=3, epoch=1))
    order = [int(w.window("train", i, seed=3, epoch=1)[0]) for i in range(5)]
    assert order != [int(w.window("train", i, seed=3, epoch=2)[0]) for i in range(5)]
    assert order != [int(w.window("train", i, seed=4, epoch=1)[0]) for i in range(5)]
    assert [int(w.window("heldout", i)[0]) for i in range(3)] == [cut, cut + 16, cut + 32]


def test_the_validation_split_is_the_stretch_before_the_held_out_end():
    """[train | val | heldout]: the held-out end as without a validation split, the validation
    stretch the last ``val`` of the rest, in order; training windows never reach into it."""
    tokens = np.arange(1000, dtype=np.uint16)
    w = Windows(tokens, seq_len=16, holdout=0.1, val=0.2)
    cut, vcut = 900, 900 - int(900 * 0.2)  # 720
    assert (w.count("train"), w.count("val"), w.count("heldout")) == ((vcut - 1) // 16, (cut - vcut - 1) // 16,
                                                                    (100 - 1) // 16)
    assert [int(w.window("val", i)[0]) for i in range(w.count("val"))] == list(range(vcut, cut - 16, 16))
    assert all(w.window("val", i)[-1] < cut for i in range(w.count("val")))
    assert max(int(w.window("train", i, seed=1)[-1]) for i in range(w.count("train"))) < vcut
    plain = Windows(tokens, seq_len=16, holdout=0.1)
    assert np.array_equal(plain.window("heldout", 2), w.window("heldout", 2))  # the test text is unchanged
    assert plain.count("val") == 0
    with pytest.raises(DataError, match="validation share must lie in"):
        Windows(tokens, seq_len=16, val=1.0)
    with pytest.raises(DataError, match="no window of 16 tokens in each of the train, heldout, val splits"):
        Windows(tokens, seq_len=16, holdout=0.1, val=0.01)  # 9 tokens of validation


def test_too_little_text_for_a_window_is_refused():
    with pytest.raises(DataError, match="no window of 64 tokens"):
        Windows(np.arange(100, dtype=np.uint16), seq_len=64, holdout=0.1)
    with pytest.raises(IndexError):
        Windows(np.arange(1000, dtype=np.uint16), seq_len=16).window("train", 10**6)


def test_the_text_key_changes_with_the_sources_and_the_tokenizer(tmp_path, monkeypatch):
    """A teacher cache's key of the text (kdgraph.teacher_cache.data_files): the sources' stat and
    the tokenizer's fingerprint; None where data.root is not there."""
    from types import SimpleNamespace

    root = _folder(tmp_path)
    data = SimpleNamespace(root=str(root))
    first = text_key(data)
    assert first == {"sources": first["sources"], "tokenizer": tokenizer_key(ByteTokenizer())}
    assert text_key(SimpleNamespace(root=str(tmp_path / "absent"))) is None
    (root / "notes.md").write_text("still not read, longer now")
    assert text_key(data) == first
    (root / "a.txt").write_text("Shall I compare thee, ", encoding="utf-8")
    second = text_key(data)
    assert second["sources"] != first["sources"] and second["tokenizer"] == first["tokenizer"]
    monkeypatch.setattr("kdgraph.lm.text.tokenizer_of", lambda d: _Words(["a"]))
    assert text_key(data)["tokenizer"] == tokenizer_key(_Words(["a"])) != first["tokenizer"]


def test_a_splits_sha256_is_its_tokens_and_the_window_length():
    import hashlib

    tokens = np.arange(400, dtype=np.uint16)
    w = Windows(tokens, 8, holdout=0.1)
    train = tokens[:400 - 40]
    want = hashlib.sha256(f"<u2:{len(train)}:8".encode() + train.tobytes()).hexdigest()
    assert w.sha256("train") == want
    changed = tokens.copy()
    changed[5] += 1
    assert Windows(changed, 8, holdout=0.1).sha256("train") != want
    assert Windows(tokens, 8, holdout=0.1).sha256("heldout") != want
    held = tokens.copy()
    held[-1] += 1  # a held-out token: the training split is the same
    assert Windows(held, 8, holdout=0.1).sha256("train") == want


_SENTENCES = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate.",
              "Rough winds do shake the darling buds of May."]


def test_a_tokenizer_folder_tokenises_as_transformers_does_and_keys_the_token_file(tmp_path):
    """data.tokenizer: a BPE tokenizer trained and saved here; the token file holds exactly what
    the tokenizer object itself gives each document (no BOS), each followed by its <eos> id."""
    from types import SimpleNamespace

    from _runtime_helpers import tiny_tokenizer
    from kdgraph.lm.text import load_tokenizer, tokenizer_of, vocabulary_size

    made = tiny_tokenizer(tmp_path / "tok", _SENTENCES * 4)
    root = tmp_path / "sonnet"
    root.mkdir()
    for i, line in enumerate(_SENTENCES):
        (root / f"{i}.txt").write_text(line + "\n", encoding="utf-8")
    tok = tokenizer_of(SimpleNamespace(root=str(root), tokenizer=str(tmp_path / "tok")))
    assert tokenizer_key(tok) == tokenizer_key(made) != tokenizer_key(ByteTokenizer())
    assert vocabulary_size(tok) == len(made.get_vocab()) == max(made.get_vocab().values()) + 1
    eos = made.convert_tokens_to_ids("<eos>")
    want = []
    for doc in read_documents(root):
        want += made(doc, add_special_tokens=False)["input_ids"] + [eos]
    tokens = token_file(root, tok, tmp_path / "cache")
    assert tokens.tolist() == want and len(want) < sum(len(d.encode()) for d in read_documents(root))
    assert made.decode(want[:-1]).startswith(read_documents(root)[0].rstrip())
    # a changed tokenizer (its normaliser alone, same training text) is another key, another token file
    other = tiny_tokenizer(tmp_path / "tok2", _SENTENCES * 4, lowercase=True)
    assert tokenizer_key(load_tokenizer(tmp_path / "tok2")) == tokenizer_key(other) != tokenizer_key(tok)
    token_file(root, load_tokenizer(tmp_path / "tok2"), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.tokens"))) == 2
    # its vocabulary alone (more merges) also changes the key
    assert tokenizer_key(tiny_tokenizer(tmp_path / "tok3", _SENTENCES * 4, vocab_size=320)) != tokenizer_key(tok)


def test_the_text_key_follows_the_tokenizer_folder(tmp_path):
    """The teacher cache's key of the text changes when data.tokenizer's folder holds another tokenizer."""
    from types import SimpleNamespace

    from _runtime_helpers import tiny_tokenizer

    root = _folder(tmp_path)
    data = SimpleNamespace(root=str(root), tokenizer=str(tmp_path / "tok"))
    tiny_tokenizer(tmp_path / "tok", _SENTENCES)
    first = text_key(data)
    assert first["tokenizer"] != text_key(SimpleNamespace(root=str(root), tokenizer=None))["tokenizer"]
    tiny_tokenizer(tmp_path / "tok", _SENTENCES, lowercase=True)  # the folder rewritten with another normaliser
    second = text_key(data)
    assert second["sources"] == first["sources"] and second["tokenizer"] != first["tokenizer"]


def test_a_bad_tokenizer_folder_is_a_one_line_error(tmp_path):
    from kdgraph.lm.text import load_tokenizer

    with pytest.raises(DataError, match=r"not a local folder$") as missing:
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(DataError, match=r"hub id\? .*downloads nothing.*huggingface-cli download "
                                        r"meta-llama/Llama-3\.2-1B") as hub:
        load_tokenizer("meta-llama/Llama-3.2-1B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a tokenizer folder") as empty:
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer transformers can read") as broken:
        load_tokenizer(tmp_path / "broken")
    for exc in (missing, hub, empty, broken):
        assert "\n" not in str(exc.value)


def test_the_byte_tokenizers_key_is_its_class_vocabulary_and_eos_as_before(tmp_path):
    """Bytes keep the key they had before data.tokenizer (earlier token files and teacher caches stay valid)."""
    import hashlib

    vocab = [[f"<0x{i:02X}>", i] for i in range(256)]
    want = hashlib.sha256(json.dumps(["ByteTokenizer", vocab, None]).encode("utf-8")).hexdigest()[:16]
    assert tokenizer_key(ByteTokenizer()) == want
