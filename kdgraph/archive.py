"""Zip archives (torch checkpoints, torch.export programs) read the same way by every reader.

kdgraph checks an archive with Python's ``zipfile``; torch then loads it with its own reader
(miniz). Where the two could see different entries, a check passes on what one reader sees
and the other loads something else: a name given twice (``zipfile`` returns the last copy,
miniz any), names that differ only in case (miniz looks names up case-insensitively), names
that are not in canonical form, a central directory that disagrees with the local headers,
bytes hidden between entries or before the archive, a comment that could hold a second end
record. ``open_archive`` refuses all of these, so that after it every reader sees one entry
per name, with the bytes ``zipfile`` reads.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

from kdgraph.errors import KDGraphError

__all__ = ["open_archive"]

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_END = b"PK\x05\x06"
_END64_LOCATOR = b"PK\x06\x07"
_END64 = b"PK\x06\x06"
_STORED_OR_DEFLATED = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def open_archive(path: Path | bytes, error: type[KDGraphError] = KDGraphError, what: str = "archive",
                 name: str = "") -> zipfile.ZipFile:
    """``path`` (a file, or an archive's bytes called ``name``: a zip inside a zip) opened with
    ``zipfile`` after checking that no reader can see other entries than it does; raises
    ``error`` (one line naming ``what`` and the file, and what is wrong) otherwise. Reads the
    directory and each local header, no entry's data."""
    label = name or str(path)
    def source():
        return io.BytesIO(path) if isinstance(path, bytes) else Path(path).open("rb")

    try:
        archive = zipfile.ZipFile(io.BytesIO(path) if isinstance(path, bytes) else Path(path))
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise error(f"cannot read {what} {label} (truncated or corrupt, or not a zip archive): {exc}") from None
    try:
        with source() as f:
            _check_names(archive.infolist())
            _check_layout(f, archive, f.seek(0, io.SEEK_END))
    except _Ambiguous as exc:
        archive.close()
        raise error(f"refusing to load {label}: {exc}; readers could disagree on what it holds "
                    "(torch writes no such archive)") from None
    except OSError as exc:
        archive.close()
        raise error(f"cannot read {what} {label}: {exc}") from None
    return archive


class _Ambiguous(Exception):
    pass


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _check_names(infos: list[zipfile.ZipInfo]) -> None:
    """One entry per name, names in canonical form, no two equal in ASCII case-folding."""
    seen: dict[bytes, str] = {}
    for info in infos:
        raw = _raw_name(info)
        name = info.orig_filename
        parts = name.split("/")
        if (not name or "\\" in name or "\x00" in name or name.startswith("/")
                or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", "..")):
            raise _Ambiguous(f"entry {name[:200]!r} is not a plain relative name")
        key = raw.lower()  # miniz folds ASCII case when it looks a name up
        if key in seen:
            same = "given twice" if seen[key] == name else f"the same as {seen[key][:200]!r} but for case"
            raise _Ambiguous(f"entry {name[:200]!r} is {same}")
        seen[key] = name


def _check_layout(f, archive: zipfile.ZipFile, size: int) -> None:
    """Entries back to back from byte 0, each local header agreeing with the central
    directory, then the directory, then the end record(s) and no comment."""
    if archive.comment:
        raise _Ambiguous("it has an archive comment")
    infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
    position = 0
    for info in infos:
        if info.header_offset != position:
            raise _Ambiguous(f"{info.header_offset - position:+d} bytes outside any entry before "
                             f"{info.filename[:200]!r}")
        position = _check_entry(f, info)
    if archive.start_dir != position:
        raise _Ambiguous("bytes outside any entry before the central directory")
    _check_end(f, archive, size, len(infos))


def _check_entry(f, info: zipfile.ZipInfo) -> int:
    """The local header of ``info`` names the same file, method and sizes; returns where the
    entry (and its data descriptor) ends."""
    if info.flag_bits & 0x1 or info.compress_type not in _STORED_OR_DEFLATED:
        raise _Ambiguous(f"entry {info.filename[:200]!r} is encrypted or compressed with method {info.compress_type}")
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != _LOCAL:
        raise _Ambiguous(f"the central directory points {info.filename[:200]!r} at no local header")
    flags, method, crc, csize, usize, n, extra = struct.unpack("<2xHH4xIIIHH", head[4:30])
    if f.read(n) != _raw_name(info) or method != info.compress_type or (flags ^ info.flag_bits) & 0x809:
        raise _Ambiguous(f"the local header of {info.filename[:200]!r} disagrees with the central directory")
    if not flags & 0x8 and (crc != info.CRC or (csize != info.compress_size and csize != 0xFFFFFFFF)):
        raise _Ambiguous(f"the local header of {info.filename[:200]!r} gives other sizes than the central directory")
    end = info.header_offset + 30 + n + extra + info.compress_size
    return end + (_descriptor_length(f, info, end) if flags & 0x8 else 0)


def _descriptor_length(f, info: zipfile.ZipInfo, at: int) -> int:
    """The length of the data descriptor at ``at`` that repeats the directory's CRC and sizes."""
    f.seek(at)
    data = f.read(24)
    for sig in (4, 0):
        if sig and data[:4] != _DESCRIPTOR:
            continue
        for width, fmt in ((4, "<III"), (8, "<IQQ")):
            length = sig + 4 + 2 * width
            if len(data) >= length and struct.unpack(fmt, data[sig:length]) == (
                    info.CRC, info.compress_size, info.file_size):
                return length
    raise _Ambiguous(f"the data descriptor of {info.filename[:200]!r} disagrees with the central directory")


def _check_end(f, archive: zipfile.ZipFile, size: int, count: int) -> None:
    """The end record is the file's last 22 bytes and counts the directory's entries."""
    f.seek(size - 22)
    end = f.read(22)
    if end[:4] != _END:
        raise _Ambiguous("the end record is not the file's last bytes")
    _, _, here, total, cd_size, cd_offset, _ = struct.unpack("<HHHHIIH", end[4:22])
    if here != 0xFFFF and (here != count or total != count):
        raise _Ambiguous(f"the end record counts {total} entries, the directory holds {count}")
    if cd_offset != 0xFFFFFFFF and cd_offset + cd_size not in (size - 22, size - 22 - 20 - 56):
        raise _Ambiguous("the central directory does not end where the end record begins")
    if cd_offset == 0xFFFFFFFF or here == 0xFFFF:  # zip64: the locator and record sit before it
        f.seek(size - 22 - 20)
        if f.read(4) != _END64_LOCATOR:
            raise _Ambiguous("a zip64 end record without its locator")
