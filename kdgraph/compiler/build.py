"""Pass 1: the teacher and the student, built from the spec with their weights."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdgraph.compiler.artifacts import BuildMode, ModelArtifacts, Models
from kdgraph.errors import SpecError
from kdgraph.lm.prune import init_from_teacher_layers
from kdgraph.models import build_model

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import RunRecord
    from kdgraph.spec import Spec


def build_pass(run: RunRecord, mode: BuildMode, given: tuple[nn.Module | None, nn.Module] | None) -> Models:
    """Pass 1: the teacher and the student with their weights (or ``given``), from the run's
    records (``run``: its ``RunRecord``, whose teacher source is the one the command uses)."""
    if given is not None:
        teacher, student = given
        notes, missing = [], []
    else:
        notes, missing = [], []
        teacher, student = build_models(run, mode.fetch, notes, missing if mode.allow_missing else None,
                                        mode.materialize, mode.defer)
    _check_micro_batches(run, student)
    if run.student.from_teacher and teacher is not None:
        notes.append(init_from_teacher(teacher, student))
    if run.student.from_teacher_layers is not None and teacher is not None:
        notes.append(init_from_teacher_layers(teacher, student, run.student.from_teacher_layers))
    return Models(ModelArtifacts("teacher", teacher) if teacher is not None else None,
                  ModelArtifacts("student", student), tuple(notes), tuple(missing))


def init_from_teacher(teacher: nn.Module, student: nn.Module) -> str:
    """Copy into ``student`` every tensor of ``teacher``'s state dict whose name and shape match
    (BK-SDM's start for a student with blocks removed); returns the note naming what was copied
    (by module) and what kept its initial weights."""
    t, s = teacher.state_dict(), student.state_dict()
    copied = [k for k, v in s.items() if k in t and tuple(t[k].shape) == tuple(v.shape)]
    with torch.no_grad():
        for k in copied:
            s[k].copy_(t[k])  # a state dict's tensors are the module's own

    def modules(keys: list[str]) -> str:
        names = list(dict.fromkeys(k.rpartition(".")[0] or k for k in keys))
        return ", ".join(names[:24]) + (f" and {len(names) - 24} more" if len(names) > 24 else "")

    kept = [k for k in s if k not in set(copied)]
    return (f"student.from_teacher: {len(copied)} of {len(s)} tensors copied from the teacher (name and shape "
            f"match): {modules(copied) or 'none'}" + (f"; initial weights kept: {modules(kept)}" if kept else ""))


# BatchNorm in training normalises each micro-batch by its own statistics: parts of one or
# two samples train a different network (7.5 % instead of 56 % top-1 with 1-sample parts).
MIN_BATCHNORM_PART = 4


def _check_micro_batches(spec: Spec | RunRecord, student: nn.Module) -> None:
    micro, batch = spec.runtime.micro_batches, spec.data.batch_size
    part = batch // micro
    # One micro-batch is the batch the user chose: only a split makes the parts smaller.
    if micro > 1 and part < MIN_BATCHNORM_PART and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        raise SpecError("runtime.micro_batches",
                        f"{micro} micro-batches of a batch of {batch} leave parts of {part} sample(s), and the student "
                        f"has BatchNorm, which normalises each part by its own statistics; allowed: at most "
                        f"{max(batch // MIN_BATCHNORM_PART, 1)} (parts of at least {MIN_BATCHNORM_PART} samples), or "
                        "raise data.batch_size")


def build_models(spec: Spec | RunRecord, fetch: Collection[str] = (), notes: list[str] | None = None,
                 missing: list[str] | None = None, materialize: bool = True,
                 defer: Collection[str] = ()) -> tuple[nn.Module | None, nn.Module]:
    """(teacher, student) of ``spec`` with their weights; ``pretrained: true`` weights are
    fetched only for the roles in ``fetch`` (the others get random weights of the same shapes).
    With ``missing`` (a list), a checkpoint file that does not exist is recorded there and the
    model keeps its initial weights (planning needs shapes only); without it, it is an error.
    ``materialize=False``: parameters on the meta device, checkpoints checked from their
    headers, nothing fetched (``build_model``); the roles in ``defer`` are built so whatever
    ``materialize`` says.

    The teacher is built on a fork of torch's RNG: the student's initialisation is a function
    of the seed alone, the same whether the teacher is built, deferred (a cache replays it)
    or absent."""

    def build(role: str, model_spec):
        if missing is not None and model_spec.checkpoint is not None and not Path(model_spec.checkpoint).exists():
            missing.append(f"{role}.checkpoint {model_spec.checkpoint}")
            model_spec = model_spec.model_copy(update={"checkpoint": None})
        return build_model(model_spec, spec.source_dir, role=role, fetch=role in fetch and role not in defer,
                           notes=notes, materialize=materialize and role not in defer)

    teacher = None
    if spec.teacher:
        with torch.random.fork_rng(devices=[]):
            teacher = build("teacher", spec.teacher)
    return teacher, build("student", spec.student)
