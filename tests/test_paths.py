"""kdgraph.paths: path_problem against the limits written out (NAME_MAX bytes a component,
PATH_MAX bytes a path with its NUL), in bytes not characters, and against the OS's own refusal."""

from __future__ import annotations

import os

import pytest

from kdgraph.paths import NAME_MAX, PATH_MAX, path_problem


def test_names_up_to_255_bytes_pass_and_256_is_named():
    assert path_problem("a" * 255) is None
    assert path_problem(f"runs/{'a' * 255}/x") is None
    said = path_problem(f"runs/{'b' * 256}/x")
    assert said == f"has a name of 256 bytes ({'b' * 40}...); a file or folder name is at most {NAME_MAX}"


def test_bytes_not_characters_are_counted():
    assert path_problem("é" * 127) is None  # 254 bytes
    assert path_problem("é" * 128) is not None and "of 256 bytes" in path_problem("é" * 128)


def test_a_whole_path_at_path_max_bytes_is_refused_one_less_passes():
    ok = "/".join(["d" * 200] * 21)[: PATH_MAX - 1]
    assert len(ok.encode()) == PATH_MAX - 1 and path_problem(ok) is None
    said = path_problem(ok + "x")
    assert said == f"is {PATH_MAX:,} bytes long; a path is at most {PATH_MAX - 1:,}"


@pytest.mark.parametrize("name", ["c" * 256, "/".join(["e" * 200] * 21)])
def test_what_path_problem_refuses_the_os_refuses_too(tmp_path, name):
    assert path_problem(tmp_path / name) is not None
    with pytest.raises(OSError) as info:
        (tmp_path / name).exists() or os.stat(tmp_path / name)
    assert info.value.errno == 36  # ENAMETOOLONG


def test_a_name_the_os_accepts_is_accepted(tmp_path):
    path = tmp_path / ("f" * NAME_MAX)
    assert path_problem(path) is None
    path.write_text("x")
    assert path.read_text() == "x"


def test_path_like_and_bytes_paths():
    from pathlib import Path

    assert path_problem(Path("a") / ("g" * 256)) is not None
    assert path_problem(os.fsencode("h" * 256)) is not None and path_problem(b"short") is None
