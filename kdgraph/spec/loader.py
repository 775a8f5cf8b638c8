"""Reading a spec: YAML (or a dict), ``--set`` overrides, validation.

What is read is bounded (file size, nesting depth, values after YAML aliases are
expanded), so that no spec can hang or exhaust the machine before its errors are shown.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdgraph.errors import SpecError
from kdgraph.paths import path_problem
from kdgraph.spec.explain import short, spec_error_from
from kdgraph.spec.schema import Spec

__all__ = ["load_spec"]

# Bounds of what is read: a spec is a few hundred values a few levels deep.
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 32
MAX_SPEC_VALUES = 10_000  # after YAML aliases are expanded (a "billion laughs" expands to 10^9)


def load_spec(source: str | Path | dict[str, Any], overrides: Sequence[str] = (), *,
              allow_code: bool = False, source_dir: Path | None = None) -> Spec:
    """Read, override and validate a spec.

    ``source`` is a YAML file path or an already-parsed mapping (not modified).
    ``overrides`` are ``dotted.path=value`` strings whose value is parsed as YAML.
    A ``module:`` model reference imports and calls Python code, so a spec file is code;
    an override may not introduce one unless ``allow_code`` (the CLI's ``--allow-code``).
    ``source_dir``: where a mapping's ``module:`` references are searched first (a file's
    own directory otherwise).
    Raises SpecError for any problem; returns a fully resolved Spec.
    """
    if isinstance(source, dict):
        _check_bounded(source, "the spec")
        raw = _deep_copy(source)
    else:
        path = Path(source)
        raw = _read_yaml(path)
        source_dir = source_dir or path.resolve().parent
    # The guard is checked on the validated spec (Spec._code_only_from_the_spec_file), where
    # every value has its final type, so that no YAML tag or coercion can turn an override
    # into a module: reference after it was looked at.
    context = None if allow_code else {"code_from_file": _model_references(raw)}
    for override in overrides:
        _apply_override(raw, override)
    _check_bounded(raw, "the spec with its overrides")
    try:
        spec = Spec.model_validate(raw, context=context)
    except ValidationError as exc:
        raise spec_error_from(exc) from None
    return spec.located_at(source_dir)


def _model_references(raw: dict[str, Any]) -> dict[str, str]:
    """{role: model reference} the spec itself gives, before any override."""
    refs = {}
    for role in ("teacher", "student"):
        section = raw.get(role)
        if isinstance(section, dict) and isinstance(section.get("model"), str):
            refs[role] = section["model"]
    return refs


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _check_bounded(value: Any, what: str) -> None:
    """Refuse values nested deeper than MAX_SPEC_DEPTH or holding more than MAX_SPEC_VALUES
    values, counting a shared (YAML alias) or self-containing one each time it is reached.

    Walks with an explicit stack and stops at the first limit, so that a "billion laughs"
    costs MAX_SPEC_VALUES steps; everything after (copying, validating, rendering errors)
    then works on a small value.
    """
    stack = [(value, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_SPEC_VALUES:
            raise SpecError("", f"{what} holds more than {MAX_SPEC_VALUES:,} values (YAML aliases counted "
                            "at their expanded size); a spec is a few hundred")
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        if depth >= MAX_SPEC_DEPTH and children:
            raise SpecError("", f"{what} is nested more than {MAX_SPEC_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in children)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the
    last silently: `epochs: 3` then `epochs: 30` further down). Keys merged in with `<<:`
    may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping (first at line "
                        f"{earlier.start_mark.line + 1}); YAML would keep only the last: remove one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the depth checked on the event stream first: the loader
    recurses once per level and would raise RecursionError around 300 levels."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_SPEC_DEPTH:
                line = f":{event.start_mark.line + 1}" if event.start_mark is not None else ""
                raise SpecError("", f"{where}{line} is nested more than {MAX_SPEC_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    _check_bounded(value, where)
    _check_plain(value, where)
    return value


# What a spec value may be once parsed: JSON's types. YAML's others (!!binary bytes,
# !!timestamp dates, !!set, !!omap pairs) would reach the schema as Python objects that
# pydantic coerces (bytes to str), after any check on the text.
_PLAIN = (str, int, float, bool, type(None))
_TAGS = {bytes: "!!binary", set: "!!set", tuple: "!!omap/!!pairs", datetime.date: "!!timestamp"}


def _check_plain(value: Any, where: str) -> None:
    """Refuse any parsed value that is not a string, number, boolean, null, list or mapping
    with string keys, naming where it is. ``value`` is bounded (``_check_bounded``)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        at = f"{where}, at {path}" if path else where
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise SpecError(path, f"{at}: key {short(repr(key))} is not a string; keys are names")
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(node, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(node))
        elif not isinstance(node, _PLAIN):
            tag = next((t for kind, t in _TAGS.items() if isinstance(node, kind)), f"!!{type(node).__name__}")
            raise SpecError(path, f"{at}: a {tag} value is not accepted; spec values are strings, numbers, "
                            "true/false, null, lists and mappings")


def _read_yaml(path: Path) -> dict[str, Any]:
    if (problem := path_problem(path)) is not None:
        raise SpecError("", f"spec path {short(str(path))} {problem}")
    if path.is_dir():
        raise SpecError("", f"spec {path} is a folder; give the YAML file, e.g. {path / 'spec.yaml'}")
    if not path.is_file():
        raise SpecError("", f"spec file not found: {path}")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError("", f"spec file {path} is {size:,} bytes; a spec is a few KB (at most {MAX_SPEC_BYTES:,})")
    try:
        raw = _parse_yaml(path.read_text(), str(path))
    except UnicodeDecodeError as exc:
        raise SpecError("", f"spec file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise SpecError("", f"{kind} in {where}: {problem}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise SpecError("", f"cannot read {path}: {short(str(exc))}") from None
    if raw is None:
        raise SpecError("", f"spec file {path} is empty; it needs at least name: and student: {{model: ...}}")
    if not isinstance(raw, dict):
        raise SpecError("", f"spec file {path} must be a mapping of keys (name:, student:, ...), got a {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError("--set", f"override {short(override)} must look like dotted.path=value, e.g. schedule.epochs=3")
    try:
        value = _parse_yaml(text, f"--set {key}") if text.strip() else None
    except SpecError as exc:
        raise SpecError("--set", exc.message) from None
    except (yaml.YAMLError, ValueError) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError("--set", f"value of override {key!r} is not valid YAML: {short(problem)}") from None
    parts = key.split(".")
    if len(parts) > MAX_SPEC_DEPTH:
        raise SpecError("--set", f"override key {short(key)} is more than {MAX_SPEC_DEPTH} levels deep")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, parts[: depth + 1], override)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, parts, override)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, walked: list[str], override: str) -> Any:
    """The container under ``node[part]``, made a fresh mapping where it is absent or null."""
    if isinstance(node, list):
        return node[_index(node, part, walked, override)]
    if node.get(part) is None:
        node[part] = {}
    child = node[part]
    if not isinstance(child, (dict, list)):
        raise SpecError("--set", f"cannot apply {short(override)}: {'.'.join(walked)} is {short(child)}, not a mapping")
    return child


def _index(node: list[Any], part: str, walked: list[str], override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SpecError("--set", f"cannot apply {short(override)}: {'.'.join(walked)} is not an index of a list of {len(node)}")
    return int(part)

