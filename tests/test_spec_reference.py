"""kdgraph.spec.reference: the JSON Schema `kdgraph schema` writes and the generated spec reference.

The truth the schema is checked against is independent of kdgraph: the `jsonschema` package
validates the shipped specs (and broken ones) as an editor would, and kdgraph's own loader is
asked the same question, so that where the two disagree it is written down here.
"""

from __future__ import annotations

import copy
import json
import re
import typing

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from kdgraph.errors import SpecError
from kdgraph.spec import load_spec
from kdgraph.spec.reference import MARK, json_schema, reference_markdown, schema_text, validator_rules
from kdgraph.spec.schema import Spec

from _runtime_helpers import ROOT

DOCS = ROOT / "docs"
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../docs/spec.schema.json"
REGENERATE = "regenerate with: .venv/bin/python -m kdgraph.spec.reference docs"
MINIMAL = {"name": "t", "student": {"model": "timm:resnet18"}}


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _with(path: str, value) -> dict:
    """MINIMAL with the dotted ``path`` set to ``value``."""
    spec = copy.deepcopy(MINIMAL)
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return spec


def _kdgraph_accepts(spec: dict) -> bool:
    try:
        load_spec(spec)
    except SpecError:
        return False
    return True


# --- the committed copies are the generated ones ------------------------------------------------

def test_committed_schema_is_the_emitted_one():
    assert (DOCS / "spec.schema.json").read_text(encoding="utf-8") == schema_text(), REGENERATE


def test_committed_reference_is_the_generated_one():
    assert (DOCS / "reference" / "spec.md").read_text(encoding="utf-8") == \
        reference_markdown(ROOT / "specs"), REGENERATE


def test_schema_carries_kdgraphs_mark_and_dialect():
    schema = json_schema()
    assert schema["$comment"] == MARK and schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False


# --- shipped specs: their editor line, and valid for an independent validator -------------------

@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_names_the_schema_and_is_valid(path, validator):
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == SCHEMA_LINE
    target = (path.parent / SCHEMA_LINE.split("$schema=")[1]).resolve()
    assert target == (DOCS / "spec.schema.json").resolve() and target.is_file()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
    assert errors == []


def test_minimal_spec_is_valid_for_both(validator):
    assert validator.is_valid(MINIMAL) and _kdgraph_accepts(MINIMAL)


# --- broken specs fail the schema (and kdgraph) --------------------------------------------------

BROKEN = [
    ("wrong type", _with("schedule.epochs", "ten")),
    ("a bool for a number", _with("seed", True)),
    ("a number for a flag", _with("runtime.compile", 1)),
    ("unknown top-level field", {**MINIMAL, "epochs": 3}),
    ("unknown nested field", _with("data.batchsize", 64)),
    ("below the lower bound", _with("data.batch_size", 0)),
    ("above the upper bound", _with("optim.lr", 11.0)),
    ("an exclusive bound", _with("data.fraction", 0.0)),
    # bounds of a type inside a union / list / tuple: pydantic writes them as ge/le, which JSON
    # Schema ignores; reference.json_schema renames them, or these three would pass the schema
    ("bound inside an optional", _with("data.test_batch_size", 0)),
    ("bound inside a list", _with("schedule.stage_epochs", [0, 60])),
    ("bound inside a tuple", _with("data.input_size", [3, 0, 32])),
    ("a choice not among the choices", _with("data.augment", "rotate")),
    ("missing required field", {"name": "t"}),
    ("a tuple of the wrong length", _with("data.input_size", [3, 32])),
]


@pytest.mark.parametrize("spec", [case[1] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_spec_fails_the_schema_and_kdgraph(spec, validator):
    assert not validator.is_valid(spec)
    assert not _kdgraph_accepts(spec)


# --- where the JSON Schema and kdgraph disagree (documented on the reference page) ---------------

DISAGREE_SCHEMA_ACCEPTS = [  # kdgraph refuses these; an editor cannot know
    ("cross-field: stage_epochs sum", "_stage_epochs_sum_to_epochs",
     _with("schedule", {"epochs": 10, "stage_epochs": [3, 3]})),
    ("cross-field: mean without std", "_mean_and_std_together", _with("data.mean", [0.5, 0.5, 0.5])),
    ("a model reference's form", "_check_reference", {**MINIMAL, "student": {"model": "resnet18"}}),
    ("the filesystem: output is the root", "_output_of_its_own", {**MINIMAL, "output": "/"}),
    ("a device name", "_check_device", _with("runtime.device", "gpu0")),
]


@pytest.mark.parametrize("rule, spec", [c[1:] for c in DISAGREE_SCHEMA_ACCEPTS],
                         ids=[c[0] for c in DISAGREE_SCHEMA_ACCEPTS])
def test_rules_the_schema_cannot_express_are_kdgraphs_and_listed(rule, spec, validator):
    assert validator.is_valid(spec)
    assert not _kdgraph_accepts(spec)
    assert rule in {name for _, name, _ in validator_rules()}
    assert f"`{rule}`" in (DOCS / "reference" / "spec.md").read_text(encoding="utf-8")


def test_a_float_yaml_reads_as_a_string_passes_kdgraph_not_the_schema(validator):
    """PyYAML (YAML 1.1) reads `lr: 1e-3` as the string '1e-3', which kdgraph accepts as a
    number; an editor (YAML 1.2) reads a number there, but a validator fed PyYAML's data does not."""
    spec = {**MINIMAL, **yaml.safe_load("optim: {lr: 1e-3}")}
    assert spec["optim"]["lr"] == "1e-3"
    assert _kdgraph_accepts(spec) and not validator.is_valid(spec)


# --- the reference: every field, with what the schema says ---------------------------------------

def _pydantic_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field's dotted path, read from the pydantic models themselves (not the JSON Schema)."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        stack, nested = [field.annotation], None
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                nested = (tp, "")
                break
            if typing.get_origin(tp) is list and typing.get_args(tp) and isinstance(typing.get_args(tp)[0], type) \
                    and issubclass(typing.get_args(tp)[0], BaseModel):
                nested = (typing.get_args(tp)[0], "[]")
                break
            stack += [a for a in typing.get_args(tp) if a is not type(None)]
        if nested is not None:
            paths += _pydantic_paths(nested[0], f"{prefix}{name}{nested[1]}.")
    return paths


def _headings(page: str) -> list[str]:
    return re.findall(r"^### `([^`]+)`$", page, flags=re.M)


def test_reference_lists_every_field_once():
    page = reference_markdown(ROOT / "specs")
    assert sorted(_headings(page)) == sorted(_pydantic_paths(Spec))
    assert len(_headings(page)) == len(set(_headings(page))) > 100


def _row(page: str, path: str, key: str) -> str:
    block = page.split(f"### `{path}`\n", 1)[1].split("\n### ", 1)[0]
    return re.search(rf"^- {key}: (.*)$", block, flags=re.M).group(1)


def test_reference_rows_say_what_pydantic_says():
    page = reference_markdown(ROOT / "specs")
    data = Spec.model_fields["data"].default_factory()
    assert _row(page, "data.batch_size", "default") == f"`{data.batch_size}`"
    assert _row(page, "data.batch_size", "bounds") == ">= 1, <= 65536"
    assert _row(page, "data.fraction", "bounds") == "> 0.0, <= 1.0"
    assert _row(page, "data.test_batch_size", "bounds") == ">= 1, <= 65536"
    assert _row(page, "student", "default") == "required"
    assert _row(page, "data.augment", "type").startswith("one of: `auto`")
    for path in ("name", "data.batch_size", "optim.lr", "runtime.device", "teacher.model"):
        assert _row(page, path, "type") and _row(page, path, "example").startswith("`")
    assert Spec.model_fields["seed"].description in page
    # default_factory fields: pydantic's schema leaves their default out; the emitted one has it
    assert _row(page, "runtime.report_to", "default") == "`[]`"
    assert _row(page, "student.kwargs", "default") == "`{}`"
    sections = [p for p in _headings(page) if _row(page, p, "default") == "a section of defaults (below)"]
    assert sections == [name for name, f in Spec.model_fields.items()
                        if f.default_factory is not None], "only a section may lack a written default"
    # '<' outside code is escaped, so that runs/<name> is shown, not read as an HTML tag
    assert "outputs go to runs/&lt;name&gt;" not in page and "outputs go to runs/&lt;name>" in page


def test_reference_examples_come_from_shipped_specs():
    page = reference_markdown(ROOT / "specs")
    quickstart = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
    example = _row(page, "decompose.blocks", "example")
    name = re.search(r"\(specs/([^)]+)\)", example).group(1)
    shipped = yaml.safe_load((ROOT / "specs" / name).read_text())
    assert example.startswith(f"`blocks: {json.dumps(shipped['decompose']['blocks'])}`")
    assert "quickstart" in quickstart["name"]
    assert "(specs/" not in reference_markdown(None)  # no shipped specs: schema examples or defaults


def test_validator_rules_cover_every_validator_once():
    from kdgraph.spec import schema as models

    expected = set()
    for name in ["Spec", *json_schema()["$defs"]]:
        decorators = getattr(models, name).__pydantic_decorators__
        for kind in (decorators.field_validators, decorators.model_validators):
            expected |= {d.func.__qualname__ for d in kind.values()}
    listed = [(model, name) for model, name, _ in validator_rules()]
    assert len(listed) == len(set(listed)) == len(expected)
