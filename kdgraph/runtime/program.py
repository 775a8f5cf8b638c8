"""Reading a ``torch.export`` program (model.pt2) that may come from anyone, without running it.

``torch.export.load`` trusts its archive: it unpickles any weight or constant marked
``use_pickle`` (``weights_only=False``), unpickles custom and opaque objects, falls back
to ``weights_only=False`` for sample inputs, ``sympify``s (``eval``s) every symbolic
expression, resolves node targets by walking ``getattr`` from ``torch`` (``torch.os.system``
resolves) and compiles the program's ``guards_code`` strings as Python. So before loading,
``check_program`` reads the archive itself and accepts only what ``torch.export.save``
writes for a plain inference program like the ones ``kdgraph export`` writes: raw tensor
weights and constants, sample inputs that load with ``weights_only=True``, ATen/prims
operators and a few ``operator``/``torch.sym_*`` functions as node targets, symbolic
expressions over shape symbols only, no guard code.
"""

from __future__ import annotations

import io
import json
import re
import tokenize
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdgraph.archive import open_archive
from kdgraph.errors import KDGraphError

__all__ = ["UnsafeProgramError", "check_program"]

MAX_PROGRAM_JSON = 256 * 1024 * 1024  # a program's graph, as JSON (ResNet-50's is ~2 MB)

# Entries of an archive written by torch.export.save, below its root folder.
_ENTRY = re.compile(r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                    r"|models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                    r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+"
                    r"|data/sample_inputs/\w+\.pt)$")
_PAYLOAD = {"weights": re.compile(r"^weight_\d+$"), "constants": re.compile(r"^tensor_\d+$")}
_OP_TARGET = re.compile(r"^torch\.ops\.[a-z][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
# Python functions torch.export puts in a graph for shape arithmetic (dynamic batch sizes).
_FUNCTION_TARGETS = frozenset(
    [f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow",
                                      "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")]
    + [f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{name}" for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
                                    "sym_sqrt")])
# Names a symbolic expression may use: sympy's numbers and relations, the functions the
# deserializer itself provides (torch.utils._sympy.functions), symbol assumptions, and
# shape symbols (s0, u3).
_EXPR_NAMES = frozenset({
    "Symbol", "Integer", "Float", "Rational", "true", "false", "True", "False", "oo", "zoo", "nan",
    "positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite", "zero", "nonzero",
    "Add", "Mul", "Pow", "Min", "Max", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "BooleanTrue", "BooleanFalse", "Piecewise", "floor", "ceiling",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "Identity", "IntTrueDiv", "FloatTrueDiv",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt",
})
_SYMBOL = re.compile(r"^[a-z]+\d+$")
_EXPR_OPS = frozenset({"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "=", "<", ">", "<=", ">=", "==", "!=",
                       "&", "|", "~"})


class UnsafeProgramError(KDGraphError):
    """A model.pt2 holds something that loading it would run, or is not a torch.export archive."""


def check_program(path: Path) -> None:
    """Refuse ``path`` unless ``torch.export.load`` can read it without running code it holds.

    Reads the zip's directory, its JSON and its sample inputs (``weights_only=True``); no
    tensor data is read. Raises UnsafeProgramError naming the first entry refused."""
    path = Path(path)
    # one entry per name, the same for torch's reader
    with open_archive(path, UnsafeProgramError, "torch.export program") as archive:
        names = archive.namelist()
        roots = {name.split("/", 1)[0] for name in names}
        if len(roots) != 1 or any("/" not in name for name in names):
            raise UnsafeProgramError(f"cannot read {path}: not a torch.export archive (entries outside one folder)")
        root = roots.pop() + "/"
        entries = {name[len(root):]: name for name in names}
        for entry in entries:
            if not _ENTRY.match(entry):
                raise _refused(path, entry, "an entry torch.export.save does not write for a plain program "
                               "(pickled objects, legacy pickled weights, compiled code)")
        if not any(entry.startswith("models/") for entry in entries):
            raise UnsafeProgramError(f"cannot read {path}: not a torch.export archive (no models/*.json)")
        for entry, full in entries.items():
            if entry.endswith("_config.json"):
                _check_payload_config(path, entry, _read_json(archive, full, path, entry))
            elif entry.startswith("models/"):
                _check_graph(path, entry, _read_json(archive, full, path, entry))
            elif entry.startswith("data/sample_inputs/"):
                _check_sample_inputs(path, entry, archive.read(full))


def _refused(path: Path, entry: str, why: str) -> UnsafeProgramError:
    return UnsafeProgramError(f"refusing to load {path}: {entry}: {why}; loading it could run code it holds "
                              "(kdgraph exports hold none)")


def _read_json(archive: zipfile.ZipFile, name: str, path: Path, entry: str) -> Any:
    if archive.getinfo(name).file_size > MAX_PROGRAM_JSON:
        raise _refused(path, entry, f"more than {MAX_PROGRAM_JSON:,} bytes of JSON")
    try:
        return json.loads(archive.read(name))
    except (ValueError, RecursionError) as exc:
        raise UnsafeProgramError(f"cannot read {path}: {entry} is not valid JSON ({exc})") from None


def _check_payload_config(path: Path, entry: str, config: Any) -> None:
    """Every weight and constant is raw tensor bytes (``use_pickle`` false, a weight_N/tensor_N file)."""
    kind = "weights" if entry.startswith("data/weights/") else "constants"
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise _refused(path, entry, "not a payload config")
    for fqn, meta in items.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refused(path, entry, f"{fqn!r} is stored pickled")
        if not isinstance(meta.get("path_name"), str) or not _PAYLOAD[kind].match(meta["path_name"]):
            raise _refused(path, entry, f"{fqn!r} is stored as {meta.get('path_name')!r}, not raw tensor data")


def _check_sample_inputs(path: Path, entry: str, data: bytes) -> None:
    """torch.export.load tries ``weights_only=True`` and falls back to False: only the first may succeed."""
    if not data:
        return
    # a zip inside the zip: torch reads it with its own reader, so it must read alike too
    open_archive(data, UnsafeProgramError, "sample inputs", name=f"{path}: {entry}").close()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - any failure here and torch retries with weights_only=False
        raise _refused(path, entry, "holds more than tensors (pickled classes or functions)") from None


def _check_graph(path: Path, entry: str, program: Any) -> None:
    if not isinstance(program, dict):
        raise _refused(path, entry, "not an exported program")
    if program.get("guards_code"):
        raise _refused(path, entry, "guards_code holds Python source that loading compiles and runs")
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if "target" in node and "inputs" in node and "outputs" in node:  # a graph node
            _check_target(path, entry, node["target"])
        if "expr_str" in node:
            _check_expr(path, entry, node["expr_str"])
        stack.extend(node.values())


def _check_target(path: Path, entry: str, target: Any) -> None:
    if isinstance(target, str) and target in _FUNCTION_TARGETS:
        return
    if isinstance(target, str) and _OP_TARGET.match(target) and "__" not in target:
        resolved: Any = torch
        for name in target.split(".")[1:]:
            resolved = getattr(resolved, name, None)
        if isinstance(resolved, torch._ops.OpOverload):
            return
    raise _refused(path, entry, f"node target {str(target)[:200]!r} is not an ATen/prims operator")


def _check_expr(path: Path, entry: str, expr: Any) -> None:
    """A symbolic expression that ``sympy.sympify`` may evaluate: names, numbers and operators
    from short allowlists, string literals only as symbol names."""
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise _refused(path, entry, "a symbolic expression that is not a short string")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        raise _refused(path, entry, f"symbolic expression {expr[:200]!r} does not parse") from None
    for tok in tokens:
        ok = (tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER)
              or (tok.type == tokenize.NAME and (tok.string in _EXPR_NAMES or _SYMBOL.match(tok.string)))
              or (tok.type == tokenize.OP and tok.string in _EXPR_OPS)
              or (tok.type == tokenize.STRING and re.fullmatch(r"'[a-z]+\d+'", tok.string)))
        if not ok:
            raise _refused(path, entry, f"symbolic expression {expr[:200]!r} uses {tok.string[:50]!r}, which is "
                           "neither a shape symbol nor a sympy function")
