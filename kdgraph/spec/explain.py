"""Rendering validation errors: one SpecError that names the dotted YAML path of each
wrong value, what was given and what is allowed."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ValidationError

from kdgraph.errors import SpecError
from kdgraph.spec.schema import OneOf, Spec

__all__ = ["short", "spec_error_from"]

MAX_SHOWN = 200  # characters of a value shown in an error message
MAX_PROBLEMS = 10  # problems listed in one error


def spec_error_from(exc: ValidationError, root: type[BaseModel] = Spec) -> SpecError:
    """One SpecError listing every problem of ``exc`` as '<path>: <problem> (got X); allowed: ...'."""
    problems: list[tuple[tuple[str | int, ...], str, tuple[str | int, ...] | None, Any]] = []
    for err in exc.errors(include_url=False):
        path, union_at = _clean_loc(err["loc"], root)
        at = (err.get("ctx") or {}).get("at")
        if at:
            path = path + tuple(at.split("."))
        problems.append((path, _describe(err, path, root), union_at, err.get("input")))
    # A union (cuts: 'auto' | list) reports one error per alternative: where one
    # alternative got further into the value, the others' complaints are noise.
    deeper = {u for p, _, u, _ in problems if u is not None and len(p) > len(u)}
    kept: list[tuple[tuple[str | int, ...], str]] = []
    seen_union: set[tuple[str | int, ...]] = set()
    for path, text, union_at, value in problems:
        if union_at is not None and path == union_at:
            if union_at in deeper or union_at in seen_union:
                continue
            seen_union.add(union_at)
            allowed = _allowed_at(path, root)
            text = f"matches none of the allowed forms (got {_got(value)}); allowed: {allowed}"
        kept.append((path, text))
    # A misspelt key usually also leaves a required key missing: name the typo first.
    kept.sort(key=lambda item: 0 if "unknown key" in item[1] else 1)
    lines = [f"{_dotted(path)}: {text}" for path, text in kept[:MAX_PROBLEMS]]
    if len(kept) > MAX_PROBLEMS:
        lines.append(f"... and {len(kept) - MAX_PROBLEMS} more problems")
    return SpecError(_dotted(kept[0][0]), "\n".join(lines))


def short(value: Any) -> str:
    """``repr(value)`` (a string as it is), cut to MAX_SHOWN characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} characters)"


def _got(value: Any) -> str:
    return short(repr(value))


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return args[0] if len(args) == 1 else tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _annotation_at(path: tuple[str | int, ...], root: type[BaseModel]) -> Any:
    """The declared type at ``path`` below ``root`` (None where it cannot be followed)."""
    tp: Any = root
    for part in path:
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif isinstance(part, int):
            tp = _sequence_item(tp, part)
            if tp is None:
                return None
        else:
            return None
    return tp


def _sequence_item(tp: Any, index: int) -> Any:
    options = typing.get_args(tp) if _is_union(tp) else (tp,)
    for option in options:
        origin = typing.get_origin(option)
        args = typing.get_args(option)
        if origin is list and args:
            return args[0]
        if origin is tuple and args:
            return args[0] if args[-1] is Ellipsis else (args[index] if index < len(args) else None)
    return None


def _clean_loc(loc: tuple[str | int, ...], root: type[BaseModel]) -> tuple[tuple[str | int, ...], tuple[str | int, ...] | None]:
    """Drop pydantic's union-member tags ('list[CutPair]') from ``loc``.

    Returns the YAML path and, when the error went through a union of
    alternatives, the path of that union.
    """
    path: list[str | int] = []
    union_at: tuple[str | int, ...] | None = None
    for i, part in enumerate(loc):
        tp = _annotation_at(tuple(path), root)
        model = _strip_optional(tp)
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        if isinstance(part, int) or (is_model and (part in model.model_fields or i == len(loc) - 1)):
            path.append(part)
        elif isinstance(part, str) and tp is not None and _is_union(tp):
            union_at = tuple(path)  # a member tag of a union with several alternatives
        elif tp is None or not is_model:
            path.append(part)  # inside a free-form mapping (kwargs)
    return tuple(path), union_at


def _allowed_at(path: tuple[str | int, ...], root: type[BaseModel]) -> str:
    """What the field at ``path`` accepts: the names of its OneOf, else what its type accepts."""
    for declared in _metadata_at(path, root):
        if isinstance(declared, OneOf):
            return declared.allowed()
    return _allowed_for(_annotation_at(path, root))


def _unannotated(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _allowed_for(tp: Any) -> str:
    """A short human rendering of the values a type accepts."""
    if tp is None:
        return ""
    if _is_union(tp):
        parts = [_allowed_for(a) for a in typing.get_args(tp)]
        return " or ".join(p for p in parts if p)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ", ".join(str(v) for v in typing.get_args(tp))
    if origin is Annotated:
        return _range_text(tp, []) or _allowed_for(typing.get_args(tp)[0])
    if origin is dict or tp is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_allowed_for(_unannotated(typing.get_args(tp)[0]))}"
    if origin is tuple:
        args = typing.get_args(tp)
        item = _allowed_for(_unannotated(args[0]))
        if args[-1] is Ellipsis:  # tuple[X, ...]: any length
            return f"a list of {item}s"
        return f"a list of {len(args)} {item}s"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "{" + ", ".join(tp.model_fields) + "} mapping"
    names = {int: "integer", float: "number", bool: "true/false", str: "string", Path: "path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(err: dict[str, Any], path: tuple[str | int, ...], root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        owner = _strip_optional(_annotation_at(path[:-1], root))
        fields = list(owner.model_fields) if isinstance(owner, type) and issubclass(owner, BaseModel) else []
        close = difflib.get_close_matches(str(path[-1]), fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {path[-1]!r}; {hint}allowed: {', '.join(fields)}"
    if kind == "missing" and path and isinstance(path[-1], int):
        allowed = _allowed_at(path[:-1], root)
        return f"too few items, item {path[-1]} is missing; allowed: {allowed}"
    if kind == "missing":
        allowed = _allowed_at(path, root)
        return f"required key is missing; allowed: {allowed}" if allowed else "required key is missing"
    numeric = _numeric_range(path, root)
    if kind == "spec_value":
        got = _got(ctx["got"] if "got" in ctx else value)
        allowed = ctx.get("allowed") or numeric
        return f"{err['msg']} (got {got})" + (f"; allowed: {allowed}" if allowed else "")
    message = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    message = message.replace("Input is not a valid path for <class 'pathlib.Path'>", "must be a path")
    message = message[0].lower() + message[1:] if message else message
    # A number's error names its whole range; a wrong type names the allowed form; other bounds
    # (too_short, ...) already say what is allowed.
    is_type_error = kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "enum", "path_type")
    allowed = numeric or (_allowed_at(path, root) if is_type_error else "")
    return f"{message} (got {_got(value)})" + (f"; allowed: {allowed}" if allowed else "")


def _numeric_range(path: tuple[str | int, ...], root: type[BaseModel]) -> str:
    """'an integer from 1 to 100000' for a bounded number field at ``path``, else ''."""
    return _range_text(_strip_optional(_annotation_at(path, root)), list(_metadata_at(path, root)))


def _range_text(tp: Any, metadata: list[Any]) -> str:
    """'an integer from 0 to 1024' for int or float ``tp`` (Annotated or not) bounded by its own
    or the given ``metadata``, else ''."""
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata += extra
    if tp not in (int, float):
        return ""
    bounds: dict[str, Any] = {}
    for declared in metadata:
        for item in [declared, *getattr(declared, "metadata", ())]:  # a Field() in Annotated holds its own
            for name in ("gt", "ge", "lt", "le"):
                if getattr(item, name, None) is not None:
                    bounds[name] = getattr(item, name)
    if not bounds:
        return ""
    low = f">= {bounds['ge']:g}" if "ge" in bounds else f"> {bounds['gt']:g}" if "gt" in bounds else ""
    high = f"<= {bounds['le']:g}" if "le" in bounds else f"< {bounds['lt']:g}" if "lt" in bounds else ""
    kind = "an integer" if tp is int else "a number"
    if tp is int and "ge" in bounds and "le" in bounds:
        return f"{kind} from {bounds['ge']} to {bounds['le']}"
    return f"{kind} " + " and ".join(b for b in (low, high) if b)


def _metadata_at(path: tuple[str | int, ...], root: type[BaseModel]) -> list[Any]:
    """The constraints (Ge, Le, ...) declared on the field at ``path``; [] for list items,
    whose constraints live in their Annotated type."""
    if not path or not isinstance(path[-1], str):
        return []
    owner = _strip_optional(_annotation_at(path[:-1], root))
    if isinstance(owner, type) and issubclass(owner, BaseModel) and path[-1] in owner.model_fields:
        return list(owner.model_fields[path[-1]].metadata)
    return []
