"""The denoise task: a batch is (x_t, its true noise or velocity, (t,) or (t, y)), drawn per
sample from (seed, epoch, index); the score is the MSE at each test image's fixed draw (lower
is better); after training, a DDIM sample grid and, with a judge, the Fréchet distance of the
student's and the teacher's samples; a ``diffusers:`` student ships in diffusers' layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import RunFolder, check_judge_data, readable
from kdgraph.runtime.techniques import autocast
from kdgraph.stream import StreamLoader
from kdgraph.tasks import register_task
from kdgraph.tasks.base import Batch, Task
from kdgraph.tasks.denoise.diffusion import (
    DIFFUSERS_PREDICTION,
    DenoiseTask,
    ddim_sample,
    denoise_mse,
    pixel_range,
    save_grid,
)

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled, RunRecord
    from kdgraph.spec import Spec


@register_task
class Denoise(Task):
    """DDPM/DDIM denoisers (spec ``denoise``); see the module docstring."""

    name = "denoise"
    head_loss = ("denoise", "ddpm")  # output KD plus the task term with a teacher; DDPM's MSE alone without
    metrics = ("mse",)
    best_metric = "mse"
    higher_is_better = False
    indexed = True  # the draws are keyed by the sample's index

    def __init__(self, spec: Spec | RunRecord, compiled: Compiled):
        super().__init__(spec, compiled)
        self.spec = spec.denoise
        self.compiled, self.data_spec = compiled, spec.to_dict()["data"]  # the models' class embeddings, the judge's data
        self.draws = DenoiseTask.of(spec.denoise, spec.seed)
        self.input_size = tuple(compiled.input_size)

    def check_data(self, data, dataset: str) -> None:
        if isinstance(data.train, StreamLoader):
            raise KDGraphError("denoise: a denoiser is trained from data held in memory (data.loader: memory)")
        if self.spec.judge is not None:
            from kdgraph.tasks.denoise.frechet import Judge  # a judged run's only: numpy's linalg, the judge's run

            Judge.finished_run(self.spec.judge)  # before training, not after it
            check_judge_data(self.spec.judge, self.data_spec)
        check_class_inputs(self.compiled, data.num_classes, self.spec)

    def prepare(self, xb, yb, idx, epoch: int, step: int, mix) -> Batch:
        """Noisy images, their true noise (velocity, with denoise.prediction: v) and (t,) or (t, y),
        drawn per sample from (seed, epoch, index): a resumed run draws as the uninterrupted one."""
        return self.draws.draw(xb, yb, epoch, idx)

    def inputs(self, xb, yb, idx):
        x, _, side = self.draws.draw(xb, yb, 0, idx)
        return x, side

    def fit_batches(self, loader):
        """Epoch 0's noisy images and their side inputs: what the teacher sees in training."""
        return (self.draws.draw(xb, yb, 0, idx) for xb, yb, idx in loader.epoch_indexed(0))

    def score(self, forward, loader, device: torch.device, precision: str = "fp32",
              channels_last: bool = False) -> dict[str, float]:
        """{'mse'}: to the true noise (velocity, with denoise.prediction: v) at each test image's
        fixed (t, ε)."""
        def run(x: torch.Tensor, *side: torch.Tensor) -> torch.Tensor:
            with autocast(precision, device):
                return forward(x.contiguous(memory_format=torch.channels_last) if channels_last else x, *side)
        return denoise_mse(run, loader, self.draws)

    def score_trained(self, model, loader, device: torch.device, precision: str) -> dict[str, float]:
        return denoise_mse(model, loader, self.draws)

    def describe(self, score: dict[str, float]) -> str:
        return f"denoising MSE {score['mse']:.5f}"

    @classmethod
    def headline(cls, summary: dict, teacher: bool = False) -> str | None:
        if summary.get("student_mse") is None:
            return None
        return f"student denoising MSE {summary['student_mse']:.5f}" + (
            f", teacher {summary['teacher_mse']:.5f}" if teacher and summary.get("teacher_mse") is not None else "")

    # ------------------------------------------------------------------ samples and the judge

    @torch.no_grad()
    def sample(self, run, forward, n: int) -> torch.Tensor:
        """``n`` DDIM samples of ``forward`` (fixed seed and step count: the same model draws the
        same images), in the data's normalisation; ``forward`` predicts what ``denoise.prediction``
        says (the teacher as the student)."""
        d, data = self.draws, run.data
        return ddim_sample(forward, d.schedule, self.input_size, n, self.spec.sample_steps, d.seed,
                           data.num_classes if d.class_conditional else None, run.config.device,
                           pixel_range(data.mean, data.std), d.prediction)

    def reports(self, run) -> dict:
        """The DDIM sample grid (samples.png) and, with a judge (``denoise.judge``), the Fréchet
        distance of the student's and the teacher's samples to the test split in the judge's
        feature space, and its accuracy on their classes: {student_fd, ...}."""
        d = self.spec
        n = max(d.sample_images, d.judge_samples if d.judge is not None else 0)
        if not n:
            return {}
        was = run.distiller.training
        run.distiller.eval()
        try:
            images = self.sample(run, lambda x, *side: run.distiller.inference(x, side), n)
        finally:
            run.distiller.train(was)
        if d.sample_images:
            readable(save_grid(images[:d.sample_images], run.data.mean, run.data.std, run.folder.samples))
        if d.judge is None:
            return {}
        return self.judged(run, images[:d.judge_samples])

    def reports_elsewhere(self, run) -> dict:
        """Where the main rank's judge samples a sharded teacher, this rank runs the same samples
        (every rank gathers the others' shards at each module) and drops them; {}."""
        teacher = run.distiller.teacher
        if self.spec.judge is not None and teacher is not None and teacher.sharded:
            self.sample(run, teacher, self.spec.judge_samples)
        return {}

    def judged(self, run, images: torch.Tensor) -> dict:
        """The judge's verdict on the student's samples ``images`` and on the teacher's."""
        from kdgraph.tasks.denoise.frechet import Judge

        judge = Judge.from_run(self.spec.judge, run.config.device)
        m = torch.tensor(run.data.mean, device=run.config.device).view(1, -1, 1, 1)
        s = torch.tensor(run.data.std, device=run.config.device).view(1, -1, 1, 1)
        to_pixels = lambda x: (x.to(run.config.device) * s + m).clamp(0, 1)  # noqa: E731
        real = torch.cat([xb for xb, _ in run.data.test.epoch(0)])[:len(images)]
        classes = torch.arange(len(images)) % run.data.num_classes if self.draws.class_conditional else None
        out = {f"student_{k}": v for k, v in judge.judge(to_pixels(images), to_pixels(real), classes).items()}
        if run.distiller.teacher is not None:
            teacher = self.sample(run, run.distiller.teacher, len(images))
            out |= {f"teacher_{k}": v for k, v in judge.judge(to_pixels(teacher), to_pixels(real), classes).items()}
        return {"judge": judge.name, **out}

    # ------------------------------------------------------------------ export

    @classmethod
    def layouts(cls) -> tuple:
        from kdgraph.tasks.denoise.layout import DIFFUSERS  # diffusers' layout: read where a run is read back

        return (DIFFUSERS,)

    @classmethod
    def check_export(cls, spec: Spec | RunRecord) -> None:
        if not spec.student.model.startswith("diffusers:"):
            raise KDGraphError("kdgraph export ships a classifier in timm's layout, or a diffusers: denoiser in "
                               f"diffusers' layout; {spec.student.model} is neither: its trained weights are "
                               f"{RunFolder(spec.output_dir).student}, its state_dict, loadable into the student model")

    def ship(self, spec: Spec | RunRecord, compiled: Compiled, maps: dict, path: Path, to: Path, command: str) -> dict:
        """The trained diffusers student in diffusers' folder layout (``layout.ship_diffusers``)."""
        from kdgraph.tasks.denoise.layout import ship_diffusers

        if maps:
            raise KDGraphError(f"{spec.student.model}: the trained student keeps adapters after blocks "
                               f"{', '.join(map(str, sorted(maps)))}, which diffusers' layout cannot hold; distil "
                               "into a student of the teacher's widths (no adapter stays in its inference path)")
        compiled.student.model.eval()
        card = {"method": compiled.plan.method, "weights_from": str(path), "command": command,
                # a scheduler's setting: on record, for the user's scheduler
                "prediction_type": DIFFUSERS_PREDICTION[self.spec.prediction]}
        return ship_diffusers(compiled.student.model, to, card)


def check_class_inputs(compiled: Any, data_classes: int, denoise: Any) -> None:
    """A class-conditional denoiser (``denoise``: the spec's, or None) embeds every class of the
    data: a model (``compiled``'s teacher or student) built for fewer (its ``num_classes``) would
    index past its class embedding."""
    if denoise is None or not denoise.class_conditional:
        return
    for role in ("teacher", "student"):
        art = getattr(compiled, role)
        classes = getattr(art.model, "num_classes", None) if art is not None else None
        if isinstance(classes, int) and 0 < classes < data_classes:
            raise KDGraphError(f"{role}.kwargs.num_classes: the {role} embeds {classes} classes, the data has "
                               f"{data_classes}; set num_classes: {data_classes} (denoise.class_conditional: true)")
