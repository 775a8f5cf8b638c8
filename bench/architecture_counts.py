"""Issue 35's figures, counted from the source (AST), at HEAD or at a git revision:
task special cases in runtime/{loop,commands,export,ship,cache}.py and cli/ (the counter of
tests/test_architecture.py), the Trainer's lines, and attribute reads of a spec in kdgraph/runtime/.

    python bench/architecture_counts.py            # the working tree
    python bench/architecture_counts.py ef3a39c    # before the task seam
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_architecture import spec_reads, task_special_cases  # noqa: E402

SEAM = [f"kdgraph/runtime/{m}.py" for m in ("loop", "commands", "export", "ship", "cache")] + ["cli/main.py"]


def source(path: str, rev: str | None) -> str:
    if rev is None:
        return (ROOT / path).read_text()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True).stdout


def runtime_files(rev: str | None) -> list[str]:
    if rev is None:
        return [str(p.relative_to(ROOT)) for p in (ROOT / "kdgraph" / "runtime").glob("*.py")]
    out = subprocess.run(["git", "ls-tree", "--name-only", rev, "kdgraph/runtime/"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return [line for line in out.split() if line.endswith(".py")]


def main(rev: str | None) -> None:
    special = sum(len(task_special_cases(source(f, rev))) for f in SEAM)
    loop = ast.parse(source("kdgraph/runtime/loop.py", rev))
    trainer = [n.end_lineno - n.lineno + 1 for n in loop.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    reads = sum(len(spec_reads(source(f, rev))) for f in runtime_files(rev))
    print(f"{rev or 'working tree'}: task special cases {special}, Trainer lines {trainer[0]}, "
          f"spec attribute reads in kdgraph/runtime/ {reads}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
