"""Pass 1: the teacher and the student, built from the spec with their weights."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from kdgraph.compiler.artifacts import BuildMode, ModelArtifacts, Models
from kdgraph.models import build_model

if TYPE_CHECKING:
    from kdgraph.spec import Spec


def build_pass(spec: Spec, mode: BuildMode, given: tuple[nn.Module | None, nn.Module] | None) -> Models:
    """Pass 1: the teacher and the student with their weights (or ``given``)."""
    if given is not None:
        teacher, student = given
        notes, missing = [], []
    else:
        notes, missing = [], []
        teacher, student = build_models(spec, mode.fetch, notes, missing if mode.allow_missing else None,
                                        mode.materialize)
    return Models(ModelArtifacts("teacher", teacher) if teacher is not None else None,
                  ModelArtifacts("student", student), tuple(notes), tuple(missing))


def build_models(spec: Spec, fetch: Collection[str] = (), notes: list[str] | None = None,
                 missing: list[str] | None = None, materialize: bool = True) -> tuple[nn.Module | None, nn.Module]:
    """(teacher, student) of ``spec`` with their weights; ``pretrained: true`` weights are
    fetched only for the roles in ``fetch`` (the others get random weights of the same shapes).
    With ``missing`` (a list), a checkpoint file that does not exist is recorded there and the
    model keeps its initial weights (planning needs shapes only); without it, it is an error.
    ``materialize=False``: parameters on the meta device, checkpoints checked from their
    headers, nothing fetched (``build_model``)."""

    def build(role: str, model_spec):
        if missing is not None and model_spec.checkpoint is not None and not Path(model_spec.checkpoint).exists():
            missing.append(f"{role}.checkpoint {model_spec.checkpoint}")
            model_spec = model_spec.model_copy(update={"checkpoint": None})
        return build_model(model_spec, spec.source_dir, role=role, fetch=role in fetch, notes=notes,
                           materialize=materialize)

    teacher = build("teacher", spec.teacher) if spec.teacher else None
    return teacher, build("student", spec.student)
