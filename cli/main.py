"""The kdgraph command line: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from kdgraph.errors import KDGraphError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kdgraph: compile a teacher-student YAML spec into a staged distillation plan and run it.")
out = Console()
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="YAML spec file.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a spec value: dotted.path=value (YAML value). Repeatable.")]
CodeOpt = Annotated[bool, typer.Option(
    "--allow-code", help="Let --set introduce a module: model reference (it imports and runs Python code).")]


class PlanFormat(str, Enum):
    table = "table"
    json = "json"
    dot = "dot"
    mermaid = "mermaid"


class EvalFormat(str, Enum):
    table = "table"
    json = "json"


def _fail(exc: KDGraphError) -> None:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(spec: Path, overrides: list[str] | None, allow_code: bool = False):
    from kdgraph.spec import load_spec

    return load_spec(spec, overrides or [], allow_code=allow_code)


@app.command()
def plan(spec: SpecArg, set_: SetOpt = None, allow_code: CodeOpt = False,
         format: Annotated[PlanFormat, typer.Option("--format", "-f", help="Output format.")] = PlanFormat.table,
         png: Annotated[Optional[Path], typer.Option(help="Also draw the block graph to this PNG.")] = None):
    """Show how kdgraph decomposes the pair: cuts, stages, block pairing, adapters, schedule."""
    from kdgraph import blockgraph
    from kdgraph.compiler import compile_spec
    from kdgraph.render import draw_block_graph, plan_view

    try:
        compiled = compile_spec(_load(spec, set_, allow_code))
    except KDGraphError as exc:
        _fail(exc)
    if format is PlanFormat.json:
        sys.stdout.write(json.dumps(compiled.to_dict(), indent=2) + "\n")
    elif format is PlanFormat.dot:
        sys.stdout.write(blockgraph.to_dot(compiled.graph, compiled.spec.name))
    elif format is PlanFormat.mermaid:
        sys.stdout.write(blockgraph.to_mermaid(compiled.graph))
    else:
        out.print(plan_view(compiled))
    if png is not None:
        try:
            drawn = draw_block_graph(compiled.graph, png, compiled.spec.name)
        except KDGraphError as exc:
            _fail(exc)
        err.print(f"block graph drawn to {drawn}")


@app.command()
def train(spec: SpecArg, set_: SetOpt = None, allow_code: CodeOpt = False,
          resume: Annotated[bool, typer.Option(
              help="Continue from OUTPUT/checkpoints/last.pt, with the spec and --set overrides stored in the run.")] = False,
          force: Annotated[bool, typer.Option(help="Start over: delete an earlier run's files in OUTPUT first.")] = False,
          quiet: Annotated[bool, typer.Option(help="Plain log lines instead of progress bars.")] = False):
    """Compile the plan and run it: train, evaluate, checkpoint, export the student."""
    from kdgraph.runtime.loop import TrainingInterrupted
    from kdgraph.runtime.loop import train as run_training
    from kdgraph.runtime.runs import stored_run

    overrides = list(set_ or [])
    try:
        loaded = _load(spec, overrides, allow_code)
        stored = stored_run(loaded.output_dir) if resume else None
        if stored and stored.get("overrides"):  # --resume alone reuses the run's own overrides
            overrides = list(stored["overrides"]) + overrides
            loaded = _load(spec, overrides, allow_code)
        source = {"spec_file": str(spec.resolve()), "overrides": overrides}
        summary = run_training(loaded, resume=resume, quiet=quiet or not sys.stdout.isatty(), force=force,
                               source=source)
    except TrainingInterrupted as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    except KDGraphError as exc:
        _fail(exc)
    if summary["student_top1"] is None:  # a non-main rank of a distributed run: rank 0 reports
        return
    if summary.get("already_finished"):
        out.print(f"{summary['output']} already finished (student top-1 {summary['student_top1']:.2f}%); "
                  "nothing was changed")
        return
    out.print(f"student top-1 {summary['student_top1']:.2f}%"
              + (f", teacher top-1 {summary['teacher_top1']:.2f}%" if summary.get("teacher_top1") is not None else "")
              + f"  ({summary['wall_time_s']:.0f} s, outputs in {summary['output']})")


@app.command("eval")
def eval_(spec: SpecArg, set_: SetOpt = None, allow_code: CodeOpt = False,
          checkpoint: Annotated[Optional[Path], typer.Option(
              help="student.safetensors or a training checkpoint (default: OUTPUT/student.safetensors).")] = None,
          format: Annotated[EvalFormat, typer.Option("--format", "-f")] = EvalFormat.table):
    """Top-1 accuracy of the trained student (and the teacher) on the test split."""
    from kdgraph.runtime.export import evaluate_spec

    try:
        result = evaluate_spec(_load(spec, set_, allow_code), checkpoint)
    except KDGraphError as exc:
        _fail(exc)
    if format is EvalFormat.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for key, value in result.items():
            out.print(f"{key}: {value:.2f}%" if isinstance(value, float) else f"{key}: {value}")


@app.command()
def export(spec: SpecArg, to: Annotated[Path, typer.Option("--to", help="Where to write the student (.safetensors).")],
           set_: SetOpt = None, allow_code: CodeOpt = False,
           checkpoint: Annotated[Optional[Path], typer.Option(help="Training checkpoint (default: OUTPUT/checkpoints/last.pt).")] = None):
    """Write the trained student: a plain state_dict, or with its adapters (1x1 pairs folded into one conv)."""
    from kdgraph.runtime.export import export_spec

    try:
        path = export_spec(_load(spec, set_, allow_code), to, checkpoint)
    except KDGraphError as exc:
        _fail(exc)
    out.print(f"student written to {path}")


if __name__ == "__main__":
    app()
