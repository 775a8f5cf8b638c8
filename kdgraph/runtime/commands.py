"""What `kdgraph eval` and `kdgraph export` do: compile the spec, load the run's trained
student (any file kdgraph writes, told apart by content), then score it or ship it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from kdgraph.compiler import Compiled, compile_spec
from kdgraph.data import DeviceLoader
from kdgraph.errors import KDGraphError
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.runtime import ship
from kdgraph.runtime.export import file_format, load_student, load_trained
from kdgraph.runtime.runs import RunFolder
from kdgraph.tasks.create import create_task, spec_task

if TYPE_CHECKING:
    from kdgraph.spec import Spec


SPLITS = ("test", "train")


def evaluate_spec(spec: Spec, checkpoint: Path | None = None, split: str = "test") -> dict:
    """Top-1 and top-5 of the trained student (and of the teacher, where its weights are at
    hand) on the spec's ``split`` (test, or the training split as the spec's data.fraction
    selects it), on the CPU or GPU. The teacher is never needed to score the student."""
    from kdgraph.runtime.techniques import DistInfo, resolve_device

    if split not in SPLITS:
        raise KDGraphError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    layouts = spec_task(spec).layouts()  # the task's own export layouts, read back as its students
    if checkpoint is not None:
        file_format(checkpoint, given=True, layouts=layouts)  # a --checkpoint that is not there: said before anything is built
    device = resolve_device(spec.runtime.device, DistInfo())
    compiled = _compile_for_eval(spec)  # the student's weights come from the checkpoint
    student = load_student(compiled, checkpoint or RunFolder(spec.output_dir).student, layouts).to(device).eval()
    task = create_task(spec, compiled)
    task.writes_output = False  # eval reads the run folder, never creates or writes it
    data = task.build_data(spec, compiled.data, device, DistInfo())  # the loader and normalisation training used
    if split == "test":
        loader, samples = data.test, data.test_samples()
    elif isinstance(data.train, DeviceLoader):  # the training split, unaugmented and in order
        loader = DeviceLoader(data.train.x, data.train.y, spec.data.test_batch_size or spec.data.batch_size,
                              shuffle=False, device=device, norm=data.train.norm)
        samples = len(data.train.y)
    else:
        raise KDGraphError("--split train is available where the data is held in memory; this spec streams "
                           "its image folder (data.loader: stream)")
    result: dict = {"split": split, "samples": samples}
    result.update(_scores("student", task.score_trained(student, loader, device, spec.runtime.precision), task.metrics))
    if compiled.teacher is not None and _teacher_weights_at_hand(spec, compiled):
        teacher = compiled.teacher.model.to(device).eval()
        result.update(_scores("teacher", task.score_trained(teacher, loader, device, spec.runtime.precision),
                              task.metrics))
    return result


def _scores(role: str, acc: dict, metrics: tuple[str, ...]) -> dict:
    """``role``'s scores of the task's ``metrics``."""
    return {f"{role}_{k}": acc[k] for k in metrics if k in acc}


def _compile_for_eval(spec: Spec) -> Compiled:
    """The plan with the teacher's pretrained weights fetched where it has them; where they
    cannot be had (offline), the plan without them: the student is scored either way. A
    teacher cache is not read (evaluation runs the student and the teacher themselves)."""
    if spec.teacher is not None and spec.teacher.cache is not None:
        spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"cache": None})})
    if spec.teacher is not None and spec.teacher.pretrained:
        try:
            return compile_spec(spec, fetch=("teacher",), allow_missing_weights=True)
        except KDGraphError as exc:
            compiled = compile_spec(spec, allow_missing_weights=True)
            return replace(compiled, missing_weights=compiled.missing_weights
                           + (f"teacher pretrained weights ({str(exc).splitlines()[0]})",))
    return compile_spec(spec, allow_missing_weights=True)


def _teacher_weights_at_hand(spec: Spec, compiled: Compiled) -> bool:
    if any(m.startswith("teacher") for m in compiled.missing_weights):
        return False
    return spec.teacher.checkpoint is not None or bool(spec.teacher.pretrained)


def _without_teacher_weights(spec: Spec) -> Spec:
    """``spec`` with a teacher of random weights and no cache: exporting the student needs the
    teacher's shapes (the pairing), never its weights or its cache, so a teacher file that is
    gone or does not fit cannot stop an export."""
    if spec.teacher is None:
        return spec
    teacher = spec.teacher.model_copy(update={"checkpoint": None, "pretrained": False, "cache": None})
    return spec.model_copy(update={"teacher": teacher})


def export_spec(spec: Spec, to: Path, checkpoint: Path | None = None, command: str | None = None) -> dict:
    """Write the shippable student (timm layout, see ``ship``; a diffusers: denoiser in
    diffusers' layout) of a run to the folder ``to``.

    ``checkpoint``: default OUTPUT/student.safetensors (the run's final student), else
    OUTPUT/checkpoints/last.pt. The teacher's weights are not needed."""
    task_class = spec_task(spec)
    task_class.check_export(spec)  # a student its task cannot ship: said before anything is built
    ship.check_destination(Path(to))  # before anything is built: a folder export may not overwrite
    if checkpoint is not None:
        file_format(checkpoint, given=True, layouts=task_class.layouts())
    compiled = compile_spec(_without_teacher_weights(spec), allow_missing_weights=True)
    folder = RunFolder(spec.output_dir)
    path = checkpoint
    if path is None:
        path = folder.student if folder.student.exists() else folder.last_checkpoint
    try:
        maps = load_trained(compiled, path, task_class.layouts())
    except KDGraphError as exc:
        prev = ckpt.previous_of(folder.last_checkpoint)
        if checkpoint is not None or path != folder.last_checkpoint or not prev.is_file():
            raise
        raise KDGraphError(f"{exc}; the run's previous checkpoint may be good: --checkpoint {prev}") from None
    task = create_task(spec, compiled)
    try:
        return task.ship(spec, compiled, maps, path, Path(to), command or f"kdgraph train {spec.name}")
    except (OSError, SafetensorError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise KDGraphError(f"cannot write --to {to}: {detail}") from None
