"""kdgraph.archive.open_archive: every zip kdgraph checks before torch loads it (a .pt
checkpoint, a model.pt2 program) must look the same to zipfile and to torch's reader, so
each way they could disagree is refused; what torch writes is accepted."""

from __future__ import annotations

import struct
import warnings
import zipfile

import pytest
import torch

from kdgraph.archive import open_archive
from kdgraph.errors import KDGraphError, ModelError
from kdgraph.weights import read_state_dict


def _entries(path):
    with zipfile.ZipFile(path) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _write(path, entries, comment=b""):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a name given twice, and writes it
        with zipfile.ZipFile(path, "w") as z:
            for name, data in entries:
                z.writestr(name, data)
            z.comment = comment
    return path


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    return path


def test_what_torch_writes_and_a_plain_zip_rewrite_are_accepted(checkpoint, tmp_path):
    with open_archive(checkpoint) as z:  # torch's own layout: data descriptors, utf-8 flag
        assert any(name.endswith("data.pkl") for name in z.namelist())
    rewritten = _write(tmp_path / "rewritten.pt", _entries(checkpoint))
    open_archive(rewritten).close()
    assert torch.equal(read_state_dict(rewritten)["w"], torch.arange(6.0).reshape(2, 3))


def _renamed(entries, pick, new):
    return [(new(name) if pick(name) else name, data) for name, data in entries]


# Each way two readers of one file could see different entries.
_NAME_CRAFTS = {
    "a name given twice": lambda e: e + [e[0]],
    "names equal but for case": lambda e: e + [(e[0][0].upper(), e[0][1])],
    "a leading slash": lambda e: _renamed(e, lambda n: n.endswith("data.pkl"), lambda n: "/" + n),
    "a leading ./": lambda e: _renamed(e, lambda n: n.endswith("data.pkl"), lambda n: "./" + n),
    "a doubled slash": lambda e: _renamed(e, lambda n: n.endswith("data.pkl"), lambda n: n.replace("/", "//")),
    "a .. component": lambda e: _renamed(e, lambda n: n.endswith("data.pkl"), lambda n: "x/../" + n),
    "a backslash": lambda e: _renamed(e, lambda n: n.endswith("data.pkl"), lambda n: n.replace("/", "\\")),
}


@pytest.mark.parametrize("craft", list(_NAME_CRAFTS))
def test_names_two_readers_could_resolve_differently_are_refused(checkpoint, tmp_path, craft):
    evil = _write(tmp_path / "evil.pt", _NAME_CRAFTS[craft](_entries(checkpoint)))
    with pytest.raises(KDGraphError, match=r"refusing to load .*evil\.pt: entry .* readers could disagree"):
        open_archive(evil)
    with pytest.raises(ModelError, match="refusing to load"):  # the checkpoint reader refuses it too
        read_state_dict(evil)


def _patch(path, at, data):
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


def _local_name_differs(path):
    info = zipfile.ZipFile(path).infolist()[0]
    _patch(path, info.header_offset + 30, info.filename.upper().encode())


def _bytes_before_the_archive(path):
    path.write_bytes(b"\0" * 64 + path.read_bytes())  # zipfile shifts its offsets to tolerate this


def _hidden_bytes_between_entries(path):
    """A copy of the first entry, listed in no directory, spliced in before the second one;
    the offsets after it are moved so that zipfile still reads every listed entry."""
    second = zipfile.ZipFile(path).infolist()[1].header_offset
    raw = path.read_bytes()
    path.write_bytes(raw[:second] + raw[:second] + raw[second:])
    _shift_directory(path, second, after=second)


def _shift_directory(path, by, after):
    """Add ``by`` to every central-directory offset past ``after`` and to the directory's start."""
    raw = bytearray(path.read_bytes())
    end = len(raw) - 22
    size, start = struct.unpack("<II", raw[end + 12:end + 20])
    start += by
    struct.pack_into("<I", raw, end + 16, start)
    at = start
    while at < start + size:
        n, m, k = struct.unpack("<HHH", raw[at + 28:at + 34])
        (offset,) = struct.unpack("<I", raw[at + 42:at + 46])
        if offset >= after:
            struct.pack_into("<I", raw, at + 42, offset + by)
        at += 46 + n + m + k
    path.write_bytes(bytes(raw))


def _comment_with_an_end_record(path):
    entries = _entries(path)
    _write(path, entries, comment=b"PK\x05\x06" + b"\0" * 18)


def _end_record_counts_fewer(path):
    raw = bytearray(path.read_bytes())
    count = struct.unpack("<H", raw[-12:-10])[0]
    struct.pack_into("<HH", raw, len(raw) - 22 + 8, count - 1, count - 1)
    path.write_bytes(bytes(raw))


_LAYOUT_CRAFTS = {"a local header naming another file": (_local_name_differs, "disagrees with the central"),
                  "bytes before the archive": (_bytes_before_the_archive, "outside any entry"),
                  "a hidden entry between two listed ones": (_hidden_bytes_between_entries, "outside any entry"),
                  "a comment holding an end record": (_comment_with_an_end_record,
                                                      "(comment|end record|outside any entry)"),
                  "an end record counting fewer entries": (_end_record_counts_fewer, "counts")}


@pytest.mark.parametrize("craft", list(_LAYOUT_CRAFTS))
def test_a_directory_and_headers_that_disagree_are_refused(checkpoint, tmp_path, craft):
    edit, fragment = _LAYOUT_CRAFTS[craft]
    evil = _write(tmp_path / "evil.pt", _entries(checkpoint))
    edit(evil)
    with pytest.raises(KDGraphError, match=f"refusing to load .*{fragment}"):
        open_archive(evil)
