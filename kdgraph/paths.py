"""Paths from users, checked before the OS sees them: a name over NAME_MAX bytes or a path
over PATH_MAX makes every os call raise (ENAMETOOLONG), ``Path.exists()`` included."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["INCOMPLETE", "NAME_MAX", "PATH_MAX", "path_problem"]

NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, apfs, ntfs: 255)
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included (Linux)
# An export writes this file first and removes it last: a folder holding it is a killed export's,
# written over by the rerun (kdgraph.runtime.ship, and a task's own export layouts)
INCOMPLETE = ".kdgraph-export-incomplete"


def path_problem(path: str | os.PathLike) -> str | None:
    """Why the OS would refuse ``path`` for its length (None: it would not)."""
    whole = os.fsencode(path)
    if len(whole) >= PATH_MAX:
        return f"is {len(whole):,} bytes long; a path is at most {PATH_MAX - 1:,}"
    for part in Path(os.fsdecode(whole)).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            return f"has a name of {size:,} bytes ({part[:40]}...); a file or folder name is at most {NAME_MAX}"
    return None
