"""kdgraph.spec.loader: reading a spec file or mapping, ``--set`` overrides and the bounds on
what is read; each input checked against the spec it must give, or refused with a SpecError
whose path and words are written out here (and no caller's dict modified)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kdgraph.errors import SpecError
from kdgraph.spec import load_spec

MINIMAL = "name: tiny\nstudent: {model: 'timm:resnet18'}\n"


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# (id, YAML text, overrides, expected SpecError.path, fragments that must be in the message)
BROKEN_READS = [
    ("bad-set", MINIMAL, ["schedule.epochs"], "--set", ["dotted.path=value"]),
    ("bad-set-empty-part", MINIMAL, ["schedule..epochs=3"], "--set", ["dotted.path=value"]),
    ("bad-set-through-scalar", MINIMAL, ["name.x=1"], "--set", ["not a mapping"]),
    ("set-past-a-list", MINIMAL + "data: {input_size: [1, 8, 8]}\n", ["data.input_size.3=2"], "--set",
     ["data.input_size.3 is not an index of a list of 3"]),
    ("set-bad-yaml", MINIMAL, ["schedule.epochs=[1,"], "--set", ["value of override 'schedule.epochs' is not valid YAML"]),
    ("set-too-deep", MINIMAL, [".".join(["a"] * 40) + "=1"], "--set", ["more than 32 levels deep"]),
    ("yaml-syntax", "name: t\nstudent: {model: 'timm:resnet18'\ndata: [\n", [], "", ["YAML syntax error", "spec.yaml:"]),
    ("top-level-list", "- name: t\n", [], "", ["mapping", "list"]),
    ("empty-file", "", [], "", ["empty"]),
    ("timestamp", MINIMAL + "seed: 2024-01-01\n", [], "seed", ["spec.yaml, at seed: a !!timestamp value is not accepted"]),
    ("number-key", MINIMAL + "data: {1: x}\n", [], "data", ["key 1 is not a string"]),
    ("a-set", MINIMAL + "data: !!set {a, b}\n", [], "data", ["a !!set value is not accepted"]),
]


@pytest.mark.parametrize("text,overrides,path,fragments", [b[1:] for b in BROKEN_READS],
                         ids=[b[0] for b in BROKEN_READS])
def test_broken_reads(tmp_path, text, overrides, path, fragments):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides)
    assert info.value.path == path
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


def test_a_folder_a_huge_file_and_non_utf8_are_named(tmp_path):
    with pytest.raises(SpecError, match=r"spec .* is a folder; give the YAML file, e.g. .*spec.yaml"):
        load_spec(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_text(MINIMAL + "#" * 1_000_001)
    with pytest.raises(SpecError, match=r"big.yaml is 1,000,0\d\d bytes; a spec is a few KB \(at most 1,000,000\)"):
        load_spec(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(SpecError, match=r"latin.yaml is not UTF-8 text \(byte \d+\)"):
        load_spec(latin)
    with pytest.raises(SpecError, match="spec path .* has a name of 300 bytes"):
        load_spec(tmp_path / ("x" * 300))


def test_an_empty_override_value_is_null_and_the_source_dir_is_the_files(tmp_path):
    path = write(tmp_path, MINIMAL + "data: {input_size: [1, 8, 8]}\n")
    spec = load_spec(path, ["data.input_size="])
    assert spec.data.input_size is None and spec.source_dir == tmp_path.resolve()
    elsewhere = tmp_path / "models"
    assert load_spec({"name": "t", "student": {"model": "timm:resnet18"}}, source_dir=elsewhere).source_dir == elsewhere


def test_overrides_int_list_null(tmp_path):
    source = {"name": "t", "teacher": {"model": "timm:resnet34"}, "student": {"model": "timm:resnet18"}}
    spec = load_spec(source, ["schedule.epochs=3", "data.input_size=[3,32,32]", "teacher=null",
                              "schedule.method=supervised", "optim.lr=0.05", "runtime.num_threads=2"])
    assert spec.schedule.epochs == 3
    assert spec.data.input_size == (3, 32, 32)
    assert spec.teacher is None and spec.schedule.method == "supervised"
    assert spec.optim.lr == 0.05 and spec.runtime.num_threads == 2
    assert source["teacher"] == {"model": "timm:resnet34"}  # the caller's dict is left alone


def test_override_creates_teacher_and_indexes_lists():
    cuts = [{"teacher": "a", "student": "b"}] * 4
    spec = load_spec({"name": "t", "student": {"model": "timm:resnet18"}, "schedule": {"method": "kd"}},
                     ["teacher.model=timm:resnet34", "decompose.cuts=" + repr(cuts), "decompose.cuts.2.student=c"])
    assert spec.teacher.model == "timm:resnet34"
    assert [c.student for c in spec.decompose.cuts] == ["b", "b", "c", "b"]


def test_yaml_error_names_line(tmp_path):
    path = write(tmp_path, "name: t\nstudent:\n  model: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in info.value.message and ":4:" in info.value.message


def test_missing_file_named(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.path == "" and "nope.yaml" in info.value.message


@pytest.mark.parametrize("where", ["file", "set", "dict"])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, where):
    deep = "[" * 900 + "]" * 900
    base = {"name": "deep", "student": {"model": "timm:resnet18"}}
    with pytest.raises(SpecError, match="nested more than 32 levels deep"):
        if where == "file":
            path = tmp_path / "deep.yaml"
            path.write_text(f"name: deep\nstudent: {{model: 'timm:resnet18', kwargs: {{a: {deep}}}}}\n")
            load_spec(path)
        elif where == "set":
            load_spec(base, [f"student.kwargs.a={deep}"])
        else:
            base["student"]["kwargs"] = {"self": base}  # contains itself
            load_spec(base)
