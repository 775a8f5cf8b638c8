"""The kdgraph command line: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from kdgraph.errors import KDGraphError, disk_full

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kdgraph: compile a teacher-student YAML spec into a staged distillation plan and run it.")
# markup off: user text (paths, --set values, `kdgraph[diffusion]`) prints as it is
out = Console(markup=False)
err = Console(stderr=True, markup=False)


def _table_width() -> int | None:
    """Tables' width: the terminal's (or COLUMNS); piped without COLUMNS, unwrapped (not rich's 80)."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 10_000

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


class EvalSplit(str, Enum):
    test = "test"
    train = "train"


def _version(value: bool) -> None:
    if value:
        import importlib.metadata

        from kdgraph import __version__

        def v(name: str) -> str:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"
        out.print(f"kdgraph {__version__} (torch {v('torch')}, timm {v('timm')}, python {sys.version.split()[0]})",
                  highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version of kdgraph, torch and timm and exit.")] = False):
    """kdgraph: compile a teacher-student YAML spec into a staged distillation plan and run it."""
    _plain_warnings()


def _plain_warnings() -> None:
    """kdgraph's own warnings (an image skipped, say) as 'warning: ...' lines, not Python's
    'data.py:363: BadImageWarning: ...' format; other libraries' warnings are left as they are."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "kdgraph", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("kdgraph."):
            err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show.kdgraph = True
    warnings.showwarning = show


def _fail(exc: KDGraphError) -> None:
    err.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(spec: Path, overrides: list[str] | None, allow_code: bool = False):
    from kdgraph.spec import load_spec

    return load_spec(spec, overrides or [], allow_code=allow_code)


def _load_run(spec: Path, overrides: list[str] | None, allow_code: bool = False):
    """The spec as its run trained it: the --set overrides stored in OUTPUT/run.json first,
    then the ones given now (train --resume, eval and export). Returns (spec, all overrides)."""
    from kdgraph.runtime.runs import stored_run

    given = list(overrides or [])
    loaded = _load(spec, given, allow_code)
    stored = stored_run(loaded.output_dir)
    if stored and stored.get("overrides"):
        given = list(stored["overrides"]) + given
        loaded = _load(spec, given, allow_code)
    return loaded, given


@app.command()
def plan(spec: SpecArg, set_: SetOpt = None, allow_code: CodeOpt = False,
         format: Annotated[PlanFormat, typer.Option("--format", "-f", help="Output format.")] = PlanFormat.table,
         png: Annotated[Optional[Path], typer.Option(help="Also draw the block graph to this PNG.")] = None):
    """Show how kdgraph decomposes the pair: cuts, stages, block pairing, adapters, schedule."""
    from kdgraph.compiler import blockgraph, compile_spec
    from kdgraph.render import draw_block_graph, plan_view

    try:
        compiled = compile_spec(_load(spec, set_, allow_code), allow_missing_weights=True, materialize=False)
    except KDGraphError as exc:
        _fail(exc)
    for missing in compiled.missing_weights:  # planning needs shapes only; train and eval need the file
        err.print(f"warning: {missing} does not exist yet; planned without it (train needs it)",
                  highlight=False, soft_wrap=True)
    if format is PlanFormat.json:
        sys.stdout.write(json.dumps(compiled.to_dict(), indent=2) + "\n")
    elif format is PlanFormat.dot:
        sys.stdout.write(blockgraph.to_dot(compiled.graph, compiled.run.name))
    elif format is PlanFormat.mermaid:
        sys.stdout.write(blockgraph.to_mermaid(compiled.graph))
    else:
        Console(markup=False, width=_table_width()).print(plan_view(compiled))
    if png is not None:
        try:
            drawn = draw_block_graph(compiled.graph, png, compiled.run.name)
        except KDGraphError as exc:
            _fail(exc)
        err.print(f"block graph drawn to {drawn}")


@app.command()
def train(spec: SpecArg, set_: SetOpt = None, allow_code: CodeOpt = False,
          resume: Annotated[bool, typer.Option(
              help="Continue from OUTPUT/checkpoints/last.pt, with the spec and --set overrides stored in the run.")] = False,
          force: Annotated[bool, typer.Option(help="Start over: delete an earlier run's files in OUTPUT first.")] = False,
          reshard: Annotated[bool, typer.Option(
              help="With --resume: continue a checkpoint written at another number of ranks; the spec may change "
                   "runtime.shard_student, runtime.shard_dtype, teacher.shard, and data.batch_size where "
                   "batch_size x ranks stays the same (each step reads the same data).")] = False,
          quiet: Annotated[bool, typer.Option(help="Plain log lines instead of progress bars.")] = False):
    """Compile the plan and run it: train, evaluate, checkpoint, export the student."""
    from kdgraph.runtime.loop import TrainingInterrupted
    from kdgraph.runtime.loop import train as run_training
    from kdgraph.tasks.create import task_class

    overrides = list(set_ or [])
    try:
        if resume:  # --resume alone reuses the run's own overrides
            loaded, overrides = _load_run(spec, overrides, allow_code)
        else:
            loaded = _load(spec, overrides, allow_code)
        source = {"spec_file": str(spec.resolve()), "overrides": overrides}
        summary = run_training(loaded, resume=resume, quiet=quiet or not sys.stdout.isatty(), force=force,
                               source=source, reshard=reshard)
    except TrainingInterrupted as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    except KDGraphError as exc:
        _fail(exc)
    headline = task_class(summary["task"]).headline
    if headline(summary) is None:  # a non-main rank: rank 0 reports
        return
    if summary.get("already_finished"):
        out.print(f"{summary['output']} already finished ({headline(summary)}); nothing was changed",
                  soft_wrap=True)
        return
    out.print(headline(summary, teacher=True)
              + f"  ({summary['wall_time_s']:.0f} s, outputs in {summary['output']})", soft_wrap=True)


@app.command()
def cache(spec: SpecArg, epochs: Annotated[int, typer.Option(help="Cache the run's first N epochs of training views.")],
          set_: SetOpt = None, allow_code: CodeOpt = False,
          full: Annotated[bool, typer.Option(help="Full fp32 logits (exact replay) instead of top-k fp16 probabilities.")] = False,
          top_k: Annotated[int, typer.Option(help="Probabilities kept per view, per token of a causal LM (top-k mode).")] = 10,
          quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False):
    """Write the teacher's outputs for the run's training views into teacher.cache, for training to replay.
    Resumes a stopped build; under torchrun each rank writes its own shards."""
    from kdgraph.runtime.cache import build_cache

    try:
        summary = build_cache(_load(spec, set_, allow_code), epochs, full=full, top_k=top_k,
                              quiet=quiet or not sys.stderr.isatty())
    except KDGraphError as exc:
        _fail(exc)
    out.print(str(summary), highlight=False, soft_wrap=True)


@app.command("eval")
def eval_(spec: SpecArg, set_: SetOpt = None, allow_code: CodeOpt = False,
          checkpoint: Annotated[Optional[Path], typer.Option(
              help="The student to score: an export folder (kdgraph's, or a diffusers: student's in diffusers' "
                   "layout), student.safetensors / best.safetensors or a training checkpoint, told apart by content "
                   "(default: OUTPUT/student.safetensors).")] = None,
          split: Annotated[EvalSplit, typer.Option(help="Which split to evaluate on.")] = EvalSplit.test,
          format: Annotated[EvalFormat, typer.Option("--format", "-f")] = EvalFormat.table):
    """The trained student's scores (and the teacher's, where its weights exist) on a split: its task's
    metrics (top-1 and top-5 accuracy, or the task's own such as mean IoU). The run's stored --set overrides apply first."""
    from kdgraph.runtime.commands import evaluate_spec

    try:
        result = evaluate_spec(_load_run(spec, set_, allow_code)[0], checkpoint, split.value)
    except KDGraphError as exc:
        _fail(exc)
    if format is EvalFormat.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for key, value in result.items():
            out.print(f"{key}: {value:.5f}" if key.endswith("_mse") else
                      f"{key}: {value:.2f}%" if isinstance(value, float) else f"{key}: {value}")


@app.command()
def export(spec: SpecArg, to: Annotated[Path, typer.Option(
               "--to", help="Folder to write: model.safetensors (or model.pt2), config.json, README.md.")],
           set_: SetOpt = None, allow_code: CodeOpt = False,
           checkpoint: Annotated[Optional[Path], typer.Option(
               help="The trained student: OUTPUT/student.safetensors (default), best.safetensors or a training "
                    "checkpoint, told apart by content.")] = None):
    """Write the student as a folder timm loads: weights, config.json with preprocessing, model card;
    a diffusers: denoiser as diffusers' save_pretrained folder; a torchvision: student whose task ships
    in torchvision's layout as its state dict and constructor.json.
    The run's stored --set overrides apply first; the teacher's weights are not needed."""
    from kdgraph.runtime.commands import export_spec

    try:
        loaded, overrides = _load_run(spec, set_, allow_code)
        command = "kdgraph train " + " ".join([str(spec), *(f"--set {o}" for o in overrides)])
        result = export_spec(loaded, to, checkpoint, command=command)
    except KDGraphError as exc:
        _fail(exc)
    layout = _EXPORTED.get(result["format"], " in its task's layout ({format})")  # a registered task's own
    out.print(f"student written to {result['folder']}" + layout.format(**result),
              highlight=False, soft_wrap=True)


# What each export layout holds (``result["format"]`` of ``export_spec``), after its folder.
_EXPORTED = {
    "diffusers": " in diffusers' layout (config.json, diffusion_pytorch_model.safetensors): load it with "
                 "UNet2DModel.from_pretrained",
    "state_dict": " (model.safetensors, config.json, README.md)",
    "torchvision": " in torchvision's layout (constructor.json, model.safetensors): load it with {reason}, "
                   "then load_state_dict(safetensors.torch.load_file('model.safetensors'))",
    "torch.export": " as a torch.export program (model.pt2): {reason}",
}


@app.command()
def sweep(spec: SpecArg, grid: Annotated[list[str], typer.Option(
              "--grid", help="An axis: dotted.path=value1,value2,... (YAML values). Repeatable.")],
          seeds: Annotated[str, typer.Option(help="Selection seeds (the validation split chooses).")] = "0",
          report_seeds: Annotated[str, typer.Option(help="Fresh seeds the test split is reported on.")] = "1,2,3",
          baseline: Annotated[Optional[str], typer.Option(
              help="axis=value: that axis's values are the arms compared (Welch's t test against this one); "
                   "the other axes are tuned within each arm.")] = None,
          set_: SetOpt = None, allow_code: CodeOpt = False,
          work: Annotated[Optional[Path], typer.Option(help="Cells' folders (default: OUTPUT-sweep).")] = None,
          results: Annotated[Optional[Path], typer.Option(help="The JSONL (default: WORK/results.jsonl).")] = None,
          jobs: Annotated[int, typer.Option(help="Cells trained at once (local processes).")] = 1,
          extend: Annotated[int, typer.Option(help="Values a numeric axis may grow by per side while the "
                                                   "choice sits at its edge.")] = 0,
          report: Annotated[bool, typer.Option(help="Print the report of what has finished; train nothing.")] = False):
    """Train a grid x seeds, each cell its own resumable process (a rerun skips finished cells);
    choose on the validation split with --seeds, report the test split on --report-seeds."""
    from kdgraph import sweep as sweeps

    try:
        s = sweeps.from_cli(spec, grid, seeds, report_seeds, baseline, set_, allow_code, work, results, jobs, extend)
        if not report:
            s.log = lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)
            s.run()
    except KDGraphError as exc:
        _fail(exc)
    out.print(sweeps.format_report(sweeps.sweep_report(s)), markup=False, highlight=False, soft_wrap=True)


@app.command()
def schema(out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the schema to this file (one `kdgraph schema` wrote, or a new one) instead of stdout.")] = None):
    """Print the spec's JSON Schema, for editors (a spec's first line: # yaml-language-server: $schema=PATH)
    and validators. Cross-field rules are checked by `kdgraph plan`, not by the schema."""
    from kdgraph.spec.reference import schema_text, write_json_schema

    if out_file is None:
        sys.stdout.write(schema_text())
        return
    try:
        written = write_json_schema(out_file)
    except KDGraphError as exc:
        _fail(exc)
    err.print(f"JSON Schema written to {written}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the `kdgraph` script and `python -m kdgraph`."""
    try:
        app(prog_name="kdgraph")
    except Exception as exc:  # noqa: BLE001 - a full disk under any writer is the user's to fix: one line
        if (known := disk_full(exc)) is None:
            raise
        err.print(Text.assemble(("error:", "bold red"), f" {known}"), highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
