"""kdgraph.errors: the user-facing errors' messages (a spec path prefixed once) and disk_full's
reading of each writer's full-disk words, against errors built by hand as those writers raise them."""

from __future__ import annotations

import errno

import pytest

from kdgraph.errors import DataError, KDGraphError, ModelError, PlanError, SpecError, TraceError, disk_full


@pytest.mark.parametrize("exc,full", [(OSError(28, "No space left on device"), True),
                                      (RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
                                                    "failed writing file data/0: file write failed"), True),
                                      (RuntimeError("unexpected pos 64 vs 0"), True),
                                      (OSError(13, "Permission denied"), False), (ValueError("x"), False)])
def test_disk_full_recognises_each_writers_words(exc, full):
    assert (disk_full(exc) is not None) == full


def test_disk_full_is_one_line_naming_the_first_line_of_the_cause_and_the_resume():
    exc = OSError(errno.ENOSPC, "No space left on device")
    said = disk_full(exc)
    assert isinstance(said, KDGraphError) and "\n" not in str(said)
    assert str(said).startswith("a write failed, the disk is full or over quota ([Errno 28] No space left on device)")
    assert str(said).endswith("(a training run continues with --resume)")
    cut = disk_full(RuntimeError("file write failed " + "x" * 1000 + "\nsecond line"))
    assert f"(file write failed {'x' * 282})" in str(cut) and "second line" not in str(cut)  # 300 characters


def test_a_quota_errno_counts_and_its_words_in_any_case():
    assert disk_full(OSError(errno.EDQUOT, "whatever the OS says")) is not None
    assert disk_full(OSError(errno.EACCES, "Disk quota exceeded")) is not None  # the words, whatever the errno
    assert disk_full(RuntimeError("DISK QUOTA EXCEEDED")) is not None  # in any case
    assert disk_full(RuntimeError("write: no space left on device")) is not None
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full(RuntimeError("")) is None


def test_a_spec_error_prefixes_its_path_once():
    assert str(SpecError("schedule.epochs", "must be at least 1")) == "schedule.epochs: must be at least 1"
    already = SpecError("schedule.epochs", "schedule.epochs: must be at least 1; optim.lr: must be positive")
    assert str(already) == "schedule.epochs: must be at least 1; optim.lr: must be positive"
    assert str(SpecError("", "no spec")) == "no spec"
    error = SpecError("data.root", "is missing")
    assert (error.path, error.message) == ("data.root", "is missing")


@pytest.mark.parametrize("kind", [SpecError, ModelError, TraceError, PlanError, DataError])
def test_every_error_kind_is_a_kdgraph_error_the_cli_catches(kind, monkeypatch):
    """Raised where the CLI loads the spec: its message on one line after 'error:', exit 2, no traceback."""
    from typer.testing import CliRunner

    import kdgraph.cli.main as cli

    error = kind("data.root", "is missing") if kind is SpecError else kind("the model is missing")

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "_load", refuse)
    result = CliRunner().invoke(cli.app, ["plan", "spec.yaml"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # typer.Exit(2), nothing uncaught
    said = result.output.strip()
    assert said == f"error: {error}" and "Traceback" not in said
