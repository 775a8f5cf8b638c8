"""What `kdgraph eval` and `kdgraph export` do: compile the spec with the run builder (as
each needs it: ``builder.EVAL``, ``builder.EXPORT``), load the run's trained student (any file
kdgraph writes, told apart by content), then score it or ship it; from the compiled plan and
its ``RunRecord`` on, the spec is not read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from kdgraph.data import DeviceLoader
from kdgraph.errors import KDGraphError
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.runtime import ship
from kdgraph.runtime.builder import EVAL, EXPORT, build_run, plan_records
from kdgraph.runtime.export import file_format, load_student, load_trained
from kdgraph.runtime.runs import RunFolder
from kdgraph.tasks.create import create_task, spec_task

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled
    from kdgraph.spec import Spec


SPLITS = ("test", "train")


def evaluate_spec(spec: Spec, checkpoint: Path | None = None, split: str = "test") -> dict:
    """Top-1 and top-5 of the trained student (and of the teacher, where its weights are at
    hand) on the spec's ``split`` (test, or the training split as the spec's data.fraction
    selects it), on the CPU or GPU. The teacher is never needed to score the student; a
    teacher cache is not read (evaluation runs the student and the teacher themselves)."""
    from kdgraph.runtime.techniques import DistInfo, resolve_device

    if split not in SPLITS:
        raise KDGraphError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    run = plan_records(spec, EVAL)
    layouts = spec_task(run).layouts()  # the task's own export layouts, read back as its students
    if checkpoint is not None:
        file_format(checkpoint, given=True, layouts=layouts)  # a --checkpoint that is not there: said before anything is built
    device = resolve_device(run.runtime.device, DistInfo())
    compiled = build_run(spec, EVAL)  # the student's weights come from the checkpoint
    student = load_student(compiled, checkpoint or RunFolder(run.output_dir).student, layouts).to(device).eval()
    task = create_task(run, compiled)
    task.writes_output = False  # eval reads the run folder, never creates or writes it
    data = task.build_data(run, compiled.data, device, DistInfo())  # the loader and normalisation training used
    if split == "test":
        loader, samples = data.test, data.test_samples()
    elif isinstance(data.train, DeviceLoader):  # the training split, unaugmented and in order
        loader = DeviceLoader(data.train.x, data.train.y, run.data.test_batch_size or run.data.batch_size,
                              shuffle=False, device=device, norm=data.train.norm)
        samples = len(data.train.y)
    else:
        raise KDGraphError("--split train is available where the data is held in memory; this spec streams "
                           "its image folder (data.loader: stream)")
    result: dict = {"split": split, "samples": samples}
    result.update(_scores("student", task.score_trained(student, loader, device, run.runtime.precision), task.metrics))
    if compiled.teacher is not None and _teacher_weights_at_hand(compiled):
        teacher = compiled.teacher.model.to(device).eval()
        result.update(_scores("teacher", task.score_trained(teacher, loader, device, run.runtime.precision),
                              task.metrics))
    return result


def _scores(role: str, acc: dict, metrics: tuple[str, ...]) -> dict:
    """``role``'s scores of the task's ``metrics``."""
    return {f"{role}_{k}": acc[k] for k in metrics if k in acc}


def _teacher_weights_at_hand(compiled: Compiled) -> bool:
    if any(m.startswith("teacher") for m in compiled.missing_weights):
        return False
    teacher = compiled.run.teacher
    return teacher.checkpoint is not None or bool(teacher.pretrained)


def export_spec(spec: Spec, to: Path, checkpoint: Path | None = None, command: str | None = None) -> dict:
    """Write the shippable student (timm layout, see ``ship``; a diffusers: denoiser in
    diffusers' layout) of a run to the folder ``to``.

    ``checkpoint``: default OUTPUT/student.safetensors (the run's final student), else
    OUTPUT/checkpoints/last.pt. Exporting the student needs the teacher's shapes (the
    pairing), never its weights or its cache (``EXPORT``), so a teacher file that is gone or
    does not fit cannot stop an export."""
    run = plan_records(spec, EXPORT)
    task_class = spec_task(run)
    task_class.check_export(run)  # a student its task cannot ship: said before anything is built
    ship.check_destination(Path(to))  # before anything is built: a folder export may not overwrite
    if checkpoint is not None:
        file_format(checkpoint, given=True, layouts=task_class.layouts())
    compiled = build_run(spec, EXPORT)
    folder = RunFolder(run.output_dir)
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
    task = create_task(run, compiled)
    try:
        return task.ship(run, compiled, maps, path, Path(to), command or f"kdgraph train {run.name}")
    except (OSError, SafetensorError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise KDGraphError(f"cannot write --to {to}: {detail}") from None
