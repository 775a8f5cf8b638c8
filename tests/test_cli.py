"""The kdgraph CLI (typer) in-process: plan formats, PNG, errors with exit code 2, help."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from kdgraph.cli.main import app

from _runtime_helpers import ROOT

QS = str(ROOT / "specs" / "quickstart.yaml")
NO_CKPT = ["--set", "teacher.checkpoint=null"]


@pytest.fixture
def runner():
    return CliRunner()


def _all(result) -> str:
    text = result.output
    try:
        text += result.stderr
    except (ValueError, AttributeError):
        pass
    return text


def test_plan_table(runner):
    res = runner.invoke(app, ["plan", QS, *NO_CKPT])
    assert res.exit_code == 0, _all(res)
    text = res.output
    # the quickstart's widths differ: StableKD projects the teacher's block ends (the fit stage)
    for word in ("quickstart", "stablekd", "teacher stages", "student stages", "blocks", "frozen pca±",
                 "PCA of the teacher at block ends", "layer3"):
        assert word in text, word
    res = runner.invoke(app, ["plan", QS, *NO_CKPT, "--set", "decompose.adapters=in_path"])
    assert res.exit_code == 0 and "conv1x1" in res.output and "pca" not in res.output, _all(res)


def test_plan_json(runner):
    res = runner.invoke(app, ["plan", QS, *NO_CKPT, "--format", "json"])
    assert res.exit_code == 0, _all(res)
    data = json.loads(res.stdout)
    assert {"teacher", "student", "blocks", "schedule"} <= set(data)
    assert data["schedule"]["method"] == "stablekd" and data["schedule"]["k"] == 4
    assert len(data["blocks"]) == 4
    assert [s["epochs"] for s in data["schedule"]["stages"]] == [6, 6, 8]  # 20 epochs: the remainder to the last stage


@pytest.mark.parametrize("fmt", ["dot", "mermaid"])
def test_plan_graph_formats(runner, fmt):
    res = runner.invoke(app, ["plan", QS, *NO_CKPT, "--format", fmt])
    assert res.exit_code == 0, _all(res)
    assert "S1" in res.stdout and "T1" in res.stdout
    assert ("digraph" in res.stdout) if fmt == "dot" else ("graph" in res.stdout or "flowchart" in res.stdout)


@pytest.mark.parametrize("adapters", ["projected", "in_path"])
def test_plan_png(runner, tmp_path, adapters):
    """Every node kind of the block graph is drawn (projection nodes, lift/lower adapters)."""
    png = tmp_path / "graph.png"
    res = runner.invoke(app, ["plan", QS, *NO_CKPT, "--png", str(png), "--set", f"decompose.adapters={adapters}"])
    assert res.exit_code == 0, _all(res)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_key_is_exit_2_with_path_and_suggestion(runner, tmp_path):
    spec = yaml.safe_load(open(QS))
    spec["schedule"]["epoch"] = spec["schedule"].pop("epochs")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    res = runner.invoke(app, ["plan", str(bad), *NO_CKPT])
    text = _all(res)
    assert res.exit_code == 2, text
    assert "schedule.epoch" in text and "did you mean" in text.lower()
    assert "Traceback" not in text and isinstance(res.exception, SystemExit)  # a clean exit, no exception


def test_bad_value_names_its_path(runner):
    res = runner.invoke(app, ["plan", QS, *NO_CKPT, "--set", "schedule.epochs=-1"])
    text = _all(res)
    assert res.exit_code == 2, text
    assert "schedule.epochs" in text and "Traceback" not in text and isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("command, word", [("train", "--resume"), ("eval", "--checkpoint"), ("export", "--to")])
def test_help(runner, command, word):
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0, _all(res)
    assert word in res.output


# --- kdgraph schema -----------------------------------------------------------------------------

def test_schema_to_stdout_is_the_specs_json_schema(runner):
    from kdgraph.spec.schema import Spec

    res = runner.invoke(app, ["schema"])
    assert res.exit_code == 0, _all(res)
    emitted = json.loads(res.stdout)
    assert emitted["$schema"].startswith("https://json-schema.org/draft/2020-12")
    assert set(emitted["properties"]) == set(Spec.model_fields)
    assert emitted["required"] == ["name", "student"]


def test_schema_out_writes_and_rewrites_its_own_file(runner, tmp_path):
    target = tmp_path / "spec.schema.json"
    for _ in range(2):  # the second run replaces the file the first one wrote
        res = runner.invoke(app, ["schema", "--out", str(target)])
        assert res.exit_code == 0, _all(res)
        assert json.loads(target.read_text())["title"] == "kdgraph spec"
    assert json.loads(target.read_text()) == json.loads(runner.invoke(app, ["schema"]).stdout)


@pytest.mark.parametrize("content", ['{"title": "my own schema"}', "not json", "[1, 2]"])
def test_schema_out_leaves_a_file_it_did_not_write(runner, tmp_path, content):
    target = tmp_path / "schema.json"
    target.write_text(content)
    res = runner.invoke(app, ["schema", "--out", str(target)])
    text = _all(res)
    assert res.exit_code == 2 and "not written by `kdgraph schema`" in text and "Traceback" not in text, text
    assert target.read_text() == content


def test_schema_out_to_a_folder_is_refused(runner, tmp_path):
    res = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in _all(res), _all(res)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["runs/[/]x", "pip install 'kdgraph[diffusion]'", "a [bold]b[/bold] [red]", "[/"])
def test_errors_print_user_text_as_it_is(runner, monkeypatch, text):
    """rich markup in a message (a path or --set value holding `[/]`, an extra's name) crashed
    the printer with MarkupError or was eaten; it prints verbatim, exit 2."""
    import kdgraph.cli.main as cli
    from kdgraph.errors import KDGraphError

    def refuse(*args, **kwargs):
        raise KDGraphError(f"cannot use {text}: because")

    monkeypatch.setattr(cli, "_load", refuse)
    res = runner.invoke(app, ["plan", QS])
    assert res.exit_code == 2, _all(res)
    assert f"error: cannot use {text}: because" in _all(res)


def test_an_output_path_with_brackets_is_printed_intact_through_the_cli(runner, tmp_path):
    out = tmp_path / "runs" / "[/]" / "[b]x"
    res = runner.invoke(app, ["plan", QS, *NO_CKPT, "--set", f"output={out}", "--set", "data.root=/nonexistent[/]"])
    assert res.exit_code in (0, 2), _all(res)
    assert "MarkupError" not in _all(res) and "Traceback" not in _all(res)


def test_plan_tables_do_not_wrap_without_a_terminal(runner):
    """Piped (no terminal, no COLUMNS), a table row is one line however wide."""
    res = runner.invoke(app, ["plan", QS, *NO_CKPT], env={"COLUMNS": ""})
    assert res.exit_code == 0, _all(res)
    assert max(len(line) for line in res.output.splitlines()) > 80
    rows = [line for line in res.output.splitlines() if "PCA of the teacher at block ends" in line]
    assert rows and all(line.rstrip().endswith(("│", "┃")) for line in rows), rows


def test_a_full_disk_under_any_writer_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """safetensors' SafetensorError ("os error 28") from the student's export at an epoch's end was a
    traceback; every writer's way of saying ENOSPC is one line, exit 2."""
    import sys

    import torch

    import kdgraph.cli.main as cli
    from kdgraph.runtime import export

    from _runtime_helpers import tiny_spec, write_spec

    class SafetensorError(Exception):  # safetensors' own error type shares no base with OSError
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_file", full)
    spec = write_spec(tiny_spec(tmp_path / "run", "kd", epochs=1, fraction=0.1), tmp_path / "spec.yaml")
    monkeypatch.setattr(sys, "argv", ["kdgraph", "train", str(spec), "--quiet"])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and "the disk is full or over quota (Error while serializing" in err
    assert "--resume" in err


