"""The layout shows the pipeline: no import cycles, at most six floors of imports, the CLI
inside the kdgraph namespace.

Independent truth: the import statements themselves, read with ``ast`` from the source files
(not from ``sys.modules``). A floor is 1 + the highest floor a module imports at module level
(imports under ``if TYPE_CHECKING:`` run for type checkers only and do not count); a cycle
counts imports anywhere, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "kdgraph").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "cli":  # installed as kdgraph.cli (pyproject: package-dir)
            parts = ["kdgraph", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(path: Path, name: str, module_level: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))] if module_level else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _graph(module_level: bool) -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for target in _imports(path, name, module_level):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                g.add_edge(name, target)
    return g


def test_no_import_cycles():
    assert list(nx.simple_cycles(_graph(module_level=False))) == []


def test_at_most_six_floors_of_imports():
    g = _graph(module_level=True)
    floors: dict[str, int] = {}
    for name in reversed(list(nx.topological_sort(g))):
        floors[name] = 1 + max((floors[t] for t in g.successors(name)), default=0)
    top = max(floors.values())
    assert top <= 6, sorted((f, n) for n, f in floors.items() if f > 6)


def test_one_pass_per_compiler_module_in_run_order():
    from kdgraph.compiler import PASSES

    files = [Path(fn.__code__.co_filename).stem for fn in PASSES]
    assert files == ["build", "data", "trace", "cuts", "stages", "boundaries", "pair", "split", "blockgraph",
                     "plan"]
    for number, fn in enumerate(PASSES, start=1):
        module_doc = ast.get_docstring(ast.parse(Path(fn.__code__.co_filename).read_text())) or ""
        assert module_doc.startswith(f"Pass {number}: "), (fn.__module__, module_doc[:40])


def test_the_cli_installs_inside_the_kdgraph_namespace(tmp_path):
    """Outside the checkout (so that the source folder is not on sys.path), kdgraph.cli imports
    and no top-level ``cli`` module is installed."""
    import subprocess
    import sys

    probe = "import importlib.util, kdgraph.cli.main; print(importlib.util.find_spec('cli') is None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_readme_pipeline_picture_is_drawn_from_the_code():
    from kdgraph.compiler import pipeline_mermaid

    assert "```mermaid\n" + pipeline_mermaid() + "```" in (ROOT / "README.md").read_text()
