"""Text for a causal LM: read once, tokenised once into a memory-mapped token file, cut into
packed windows drawn from (seed, epoch, index).

- **Sources**: a folder of UTF-8 ``*.txt`` files (every one below it, in path order), or a
  JSONL file whose lines are objects with a text field. Each document is followed by the
  tokenizer's end-of-text id where it has one.
- **Tokenizers**: ``ByteTokenizer`` (ids 0..255, the UTF-8 bytes: for models without a
  tokenizer) or any object with ``encode(str) -> list[int]`` and ``get_vocab()``: a Hugging
  Face fast tokenizer saved in a local folder (``data.tokenizer``, ``load_tokenizer``: local
  files only, no remote code). ``tokenizer_key`` fingerprints it from its class, vocabulary,
  end-of-text id and (a fast tokenizer) its whole ``tokenizer.json`` pipeline: normaliser,
  pre-tokeniser, merges, post-processor.
- **Token file** (``token_file``): ``CACHE/<source>-<tokenizer>.tokens``, little-endian
  uint16 where every id fits, else uint32, written once (to a temporary name, then renamed) and
  read memory-mapped after; its name is keyed by the tokenizer and by every source file's
  path, size and modification time, so another tokenizer or changed text makes a new file.
- **Windows** (``Windows``): the last ``holdout`` fraction of the tokens is the held-out split;
  of the rest, the last ``val`` fraction is the validation split (none at 0), the rest the
  training split: three disjoint stretches of the text, in that order. A split of n tokens
  holds (n − 1) // seq_len windows of seq_len + 1 tokens (inputs and next-token targets,
  overlapping by one); training window ``index`` of ``epoch`` is the permutation of
  (seed, epoch) at ``index``, so the same (seed, epoch, index) is the same window on any
  machine, in any batch, after any resume.
  Validation and held-out windows come in order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdgraph.errors import DataError

__all__ = ["ByteTokenizer", "TOKENIZER_FILES", "Windows", "load_tokenizer", "read_documents", "text_key", "token_file",
           "tokenizer_key", "tokenizer_of", "vocabulary_size"]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; no end-of-text id."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def get_vocab(self) -> dict[str, int]:
        return {f"<0x{i:02X}>": i for i in range(256)}


def tokenizer_key(tokenizer: Any) -> str:
    """16 hex digits of its class, vocabulary (token -> id), end-of-text id and, for a
    transformers fast tokenizer, its whole pipeline (``tokenizer.json``: normaliser,
    pre-tokeniser, model with its merges, post-processor, added tokens)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fields = [type(tokenizer).__name__, vocab, getattr(tokenizer, "eos_token_id", None)]
    if backend is not None:  # (bytes and plain objects keep the key they had before)
        fields.append(json.loads(backend.to_str()))
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(folder: Path | str) -> Any:
    """The Hugging Face fast tokenizer saved in the local ``folder`` (its ``tokenizer.json``),
    read with local files only and no remote code; a one-line DataError otherwise."""
    path = Path(folder)
    if not path.exists():
        hub = "/" in str(folder) and not str(folder).startswith((".", "/", "~")) and len(path.parts) == 2
        raise DataError(f"data.tokenizer: {folder} is not a local folder" + (
            " (a hub id? kdgraph reads tokenizers from a local folder only and downloads nothing: fetch it with "
            f"`huggingface-cli download {folder} --local-dir DIR` and name DIR)" if hub else ""))
    if not path.is_dir() or not (path / "tokenizer.json").is_file():
        raise DataError(f"data.tokenizer: {folder} is not a tokenizer folder (no tokenizer.json in it; "
                        "save one with tokenizer.save_pretrained(folder))")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, use_fast=True)
    except ImportError:
        raise DataError("data.tokenizer needs transformers: pip install 'kdgraph[transformers]'") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read the folder is bad input
        raise DataError(f"data.tokenizer: {folder} is not a tokenizer transformers can read "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DataError(f"data.tokenizer: {folder} did not load as a fast tokenizer (tokenizer.json)")
    return tok


def tokenizer_of(data_spec: Any) -> Any:
    """The tokenizer a text run reads ``data_spec``'s text with: ``data.tokenizer``'s folder
    (``load_tokenizer``), else UTF-8 bytes (the causal-LM task and the teacher cache's key both
    ask here)."""
    folder = getattr(data_spec, "tokenizer", None)
    return ByteTokenizer() if folder is None else load_tokenizer(folder)


def vocabulary_size(tokenizer: Any) -> int:
    """How many embedding rows its ids need: 1 + its largest id (added tokens included)."""
    return 1 + max(tokenizer.get_vocab().values())


def text_key(data_spec: Any) -> dict[str, str] | None:
    """What a text run's tokens are a function of, as a key: the source files (path, size,
    mtime) and the tokenizer (``tokenizer_key``); None where data.root is not there yet (the
    run names it)."""
    root = Path(data_spec.root) if data_spec.root is not None else None
    if root is None or not root.exists():
        return None
    try:
        sources = _source_key(root, "text")
    except DataError:
        return None
    return {"sources": sources, "tokenizer": tokenizer_key(tokenizer_of(data_spec))}


def _sources(root: Path) -> list[Path]:
    if root.is_dir():
        files = sorted(p for p in root.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.root: {root} holds no .txt file")
        return files
    if root.is_file() and root.suffix == ".jsonl":
        return [root]
    raise DataError(f"data.root: {root} is neither a folder of .txt files nor a .jsonl file")


def _jsonl(path: Path, field: str) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{number}: no text field {field!r} (a string) in this line")
            out.append(record[field])
    return out


def read_documents(root: Path | str, field: str = "text") -> list[str]:
    """The documents of ``root``: each .txt file of a folder, or each line's ``field`` of a JSONL file."""
    docs = []
    for path in _sources(Path(root)):
        try:
            docs += _jsonl(path, field) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return docs


def _source_key(root: Path, field: str) -> str:
    listing = [(str(p.relative_to(root) if root.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
               for p in _sources(root)]
    return hashlib.sha256(json.dumps([listing, field]).encode("utf-8")).hexdigest()[:16]


def _encode(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` alone: a transformers tokenizer adds no BOS/EOS (each document's end
    gets the end-of-text id once, by the caller)."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def token_file(root: Path | str, tokenizer: Any, cache: Path | str, field: str = "text",
               write: bool = True) -> np.memmap:
    """The tokens of ``root`` under ``tokenizer``, memory-mapped from the token file in ``cache``
    (written by the first call, read by later ones). With ``write=False`` nothing is written in
    ``cache``: its token file is read where it is there, else one in a temporary folder (the map
    outlives the folder)."""
    root, cache = Path(root), Path(cache)
    path = cache / f"{_source_key(root, field)}-{tokenizer_key(tokenizer)}.tokens"
    if not write and not (path.is_file() and not path.is_symlink()):
        with tempfile.TemporaryDirectory(prefix="kdgraph-tokens-") as tmp:
            return token_file(root, tokenizer, tmp, field)
    if not path.exists():
        eos = getattr(tokenizer, "eos_token_id", None)
        ids: list[int] = []
        for doc in read_documents(root, field):
            ids += _encode(tokenizer, doc) + ([eos] if eos is not None else [])
        if not ids:
            raise DataError(f"data.root: {root} holds no text")
        dtype = np.uint16 if max(ids) < 2**16 else np.uint32
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tokens-")
        with os.fdopen(fd, "wb") as f:
            f.write(np.dtype(dtype).str.encode("ascii").ljust(8))  # the header: dtype, 8 bytes
            f.write(np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
        os.replace(tmp, path)
    return _read_token_file(path)


_TOKEN_DTYPES = {np.dtype(t).newbyteorder("<").str: np.dtype(t).newbyteorder("<") for t in (np.uint16, np.uint32)}


def _read_token_file(path: Path) -> np.memmap:
    """The ids of a token file (an 8-byte header naming the dtype, then the ids), memory-mapped."""
    try:
        with open(path, "rb") as f:
            header = f.read(8)
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read the token file {path}: {exc}") from None
    dtype = _TOKEN_DTYPES.get(header.decode("ascii", errors="replace").strip())
    if len(header) < 8 or dtype is None or size == 8 or (size - 8) % dtype.itemsize:
        raise DataError(f"{path} is damaged (header {header!r}, {size} bytes) and is not a kdgraph token file; "
                        "delete it and the next run writes it anew")
    return np.memmap(path, dtype=dtype, mode="r", offset=8)


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training windows' order in ``epoch``: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class Windows:
    """Windows of ``seq_len`` + 1 tokens of a token array: training ones shuffled per
    (seed, epoch); validation ones (the last ``val`` fraction of what the held-out split
    leaves; none at 0) and held-out ones (the last ``holdout`` fraction) in order."""

    tokens: np.ndarray
    seq_len: int
    holdout: float = 0.05
    val: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise DataError(f"holdout must lie in (0, 1), got {self.holdout}")
        if not 0.0 <= self.val < 1.0:
            raise DataError(f"the validation share must lie in [0, 1), got {self.val}")
        splits = ("train", "heldout", "val") if self.val > 0 else ("train", "heldout")
        if min(self.count(s) for s in splits) < 1:
            raise DataError(f"{len(self.tokens):,} tokens give no window of {self.seq_len} tokens in each of the "
                            f"{', '.join(splits)} splits (held out {self.holdout:.0%}, validation {self.val:.0%} "
                            "of the rest); lower data.seq_len or add text")

    def _split(self, split: str) -> np.ndarray:
        cut = len(self.tokens) - int(len(self.tokens) * self.holdout)
        val = cut - int(cut * self.val)
        if split not in ("train", "val", "heldout"):
            raise ValueError(f"split {split!r}: train, val or heldout")
        return {"train": self.tokens[:val], "val": self.tokens[val:cut], "heldout": self.tokens[cut:]}[split]

    def count(self, split: str) -> int:
        """Windows in ``split`` ("train", "val" or "heldout")."""
        return max((len(self._split(split)) - 1) // self.seq_len, 0)

    def window(self, split: str, index: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """Window ``index`` of ``split``: int64 (seq_len + 1,), inputs [:-1], targets [1:]."""
        n = self.count(split)
        if not 0 <= index < n:
            raise IndexError(f"window {index} of {n} in the {split} split")
        if split == "train":
            index = int(_order(n, seed, epoch)[index])
        start = index * self.seq_len
        return np.asarray(self._split(split)[start:start + self.seq_len + 1], dtype=np.int64)

    def sha256(self, split: str) -> str:
        """SHA-256 of ``split``'s tokens (their dtype, count and bytes): what its windows are cut from."""
        tokens = np.ascontiguousarray(self._split(split))
        h = hashlib.sha256(f"{tokens.dtype.str}:{len(tokens)}:{self.seq_len}".encode())
        h.update(memoryview(tokens).cast("B"))
        return h.hexdigest()
