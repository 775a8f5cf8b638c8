"""The kdgraph spec: a pydantic model that is the single source of truth for a run.

Every field has its default and its documentation here, and nowhere else.
``load_spec`` reads YAML (or a dict), applies ``--set`` style overrides and
validates; every problem comes back as one ``SpecError`` that names the dotted
YAML path of each wrong value and says what is allowed.

Numbers are typed strictly (``true`` is not 1, ``2.5`` is not an integer) and bounded
above as well as below, and what is read is bounded too (file size, nesting depth,
values after YAML aliases are expanded), so that no spec can hang or exhaust the
machine before its errors are shown.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kdgraph.errors import SpecError

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODEL_SOURCES",
    "CutPair",
    "DataSpec",
    "DecomposeSpec",
    "LossSpec",
    "ModelSpec",
    "OptimSpec",
    "RuntimeSpec",
    "ScheduleSpec",
    "Spec",
    "load_spec",
    "max_recompositions",
]

# Reference shapes of the model sources shipped with kdgraph (models.py builds them).
BUILTIN_MODEL_SOURCES: dict[str, str] = {
    "timm": "timm:NAME",
    "torchvision": "torchvision:NAME",
    "module": "module:pkg.mod:factory",
}
BUILTIN_DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "imagefolder", "synthetic")

# Bounds of what a spec may ask for. Generous for real runs; they exist so that a typo
# (`epochs: 1e23`, `input_size: [1, 100000, 100000]`) is an error, not a hang or an 80 GB
# allocation while tracing.
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_BLOCKS = 64
MAX_CLASSES = 1_000_000
MAX_SAMPLES = 10_000_000
MAX_SIDE = 16_384  # each of C, H, W
MAX_INPUT_ELEMENTS = 2**26  # C*H*W of one sample (64 Mi: 3x4096x4096 fits)
MAX_SEED = 2**32 - 1  # the loader derives per-epoch seeds as seed * 1_000_003 + epoch, within 64 bits
MAX_EVERY = 10**9  # log / eval / checkpoint intervals
# Bounds of what is read: a spec is a few hundred values a few levels deep.
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 32
MAX_SPEC_VALUES = 10_000  # after YAML aliases are expanded (a "billion laughs" expands to 10^9)
MAX_SHOWN = 200  # characters of a value shown in an error message

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _invalid(message: str, *, allowed: str = "", at: str = "", got: Any = ...) -> PydanticCustomError:
    """A validation error carrying what ``load_spec`` needs to render it.

    ``at`` is a dotted path below the validator's own location (a model validator
    reports on one of its fields); ``got`` replaces the input shown to the user.
    """
    ctx: dict[str, Any] = {"allowed": allowed, "at": at}
    if got is not ...:
        ctx["got"] = _got(got)
    return PydanticCustomError("spec_value", message, ctx)


def max_recompositions(blocks: int) -> int:
    """How many recompositions k blocks allow: each merges neighbouring pairs, ceil(k/2) remain."""
    return math.ceil(math.log2(blocks)) if blocks > 1 else 0


def _not_a_bool(value: Any) -> Any:
    """Python's bool is an int: without this, `epochs: true` would train for one epoch."""
    if isinstance(value, bool):
        raise PydanticCustomError("spec_value", "true/false is not a number", {"allowed": "", "at": ""})
    return value


# Numbers refuse booleans; Int refuses fractions (2.5) but takes 3.0; Float takes integers.
Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
Flag = Annotated[bool, Strict()]  # true/false only: not 1, "yes" or "on"
_Side = Annotated[Int, Field(ge=1, le=MAX_SIDE)]


class _Strict(BaseModel):
    # No inf/nan anywhere: `--set optim.lr=.inf` would otherwise train all-NaN and exit 0.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(_Strict):
    """A network to build: a source reference, its constructor arguments, optional weights."""

    model: str = Field(
        description="Model reference: 'timm:NAME', 'torchvision:NAME' or 'module:pkg.mod:factory' "
        "(a factory function in an importable module; the spec's directory is searched first)."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the model factory, e.g. {num_classes: 100}.",
    )
    pretrained: Flag = Field(
        default=False,
        description="Load the source's own pretrained weights (timm: and torchvision: models; timm's hub or "
        "local cache, torchvision's DEFAULT weights). Another kwargs.num_classes gives a student a fresh "
        "classifier, as timm does; a teacher's must match. `kdgraph plan` does not fetch them.",
    )
    checkpoint: Path | None = Field(
        default=None,
        description="Weights file to load (strictly; format read from its content): safetensors or a torch "
        "file holding a timm, torchvision or HF state_dict (wrappers such as state_dict/model/module and "
        "prefixes such as module. stripped) or a kdgraph training checkpoint (checkpoints/last.pt). A "
        "student's classifier trained for another number of classes is re-initialised; a teacher's must fit. "
        "Relative paths are relative to the working directory.",
    )

    @field_validator("model")
    @classmethod
    def _check_reference(cls, ref: str) -> str:
        allowed = ", ".join(BUILTIN_MODEL_SOURCES.values())
        source, sep, rest = ref.partition(":")
        if not sep or not rest:
            raise _invalid("model reference must be 'SOURCE:NAME'", allowed=allowed)
        if source in ("timm", "torchvision"):
            if not _NAME.match(rest):
                raise _invalid(f"bad {source} model name {rest!r}", allowed=allowed)
        elif source == "module":
            module, sep, factory = rest.rpartition(":")
            if not sep or not _DOTTED.match(module) or not _IDENT.match(factory):
                raise _invalid("module reference must be 'module:pkg.mod:factory'", allowed=allowed)
        elif source not in _registered_model_sources():
            raise _invalid(f"unknown model source {source!r}", allowed=allowed)
        return ref

    @field_validator("kwargs")
    @classmethod
    def _no_download(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in ("pretrained", "weights"):
            if kwargs.get(key):
                raise _invalid(
                    f"'{key}' in kwargs is not how kdgraph loads weights; remove it and write pretrained: true "
                    "next to kwargs (the source's own pretrained weights) or checkpoint: PATH (a weights file)",
                    allowed="constructor arguments other than pretrained/weights",
                )
        return kwargs

    @model_validator(mode="after")
    def _one_weights_source(self) -> ModelSpec:
        if not self.pretrained:
            return self
        if self.checkpoint is not None:
            raise _invalid("give either pretrained: true or a checkpoint, not both (the checkpoint would "
                           "replace every pretrained weight)", allowed="false with a checkpoint", at="pretrained",
                           got=True)
        source = self.model.partition(":")[0]
        sources = _pretrained_sources()
        if source not in sources:
            raise _invalid(f"{source}: models have no pretrained weights kdgraph can fetch; give the weights "
                           "file as checkpoint: PATH", allowed=f"true for {', '.join(sources)} models",
                           at="pretrained", got=True)
        return self


def _pretrained_sources() -> list[str]:
    """Sources whose models have pretrained weights (kdgraph.models; imported lazily: torch)."""
    from kdgraph.models import PRETRAINED_SOURCES

    return list(PRETRAINED_SOURCES)


def _registered_model_sources() -> set[str]:
    """Sources added with ``kdgraph.models.register_model_source`` (imported lazily: torch)."""
    from kdgraph.models import MODEL_SOURCES

    return set(MODEL_SOURCES)


class DataSpec(_Strict):
    """The dataset, its input shape and how it is batched and augmented."""

    dataset: str = Field(
        default="digits",
        description="Dataset: digits, fashion-mnist, imagefolder, synthetic, or 'torchvision:NAME' "
        "(a torchvision dataset class whose files are present under root).",
    )
    root: Path | None = Field(default=None, description="Directory of the dataset files (None: the dataset's default).")
    input_size: tuple[_Side, _Side, _Side] | None = Field(
        default=None, description=f"Input shape C,H,W fed to the models (None: the dataset's own size); each "
        f"side at most {MAX_SIDE}, C*H*W at most {MAX_INPUT_ELEMENTS}."
    )
    batch_size: Int = Field(default=128, ge=1, le=MAX_BATCH_SIZE, description="Training batch size.")
    test_batch_size: Int | None = Field(
        default=None, ge=1, le=MAX_BATCH_SIZE, description="Evaluation batch size (None: the training batch size)."
    )
    fraction: Float = Field(default=1.0, gt=0.0, le=1.0, description="Fraction of the training set used, in (0, 1].")
    samples: Int = Field(default=2048, ge=1, le=MAX_SAMPLES, description="Number of samples of the synthetic dataset.")
    num_classes: Int | None = Field(
        default=None, ge=2, le=MAX_CLASSES, description="Number of classes (None: from the dataset; required for synthetic data of a custom size)."
    )
    augment: Literal["auto", "none", "crop", "crop+flip"] = Field(
        default="auto",
        description="Training augmentation: auto (dataset's usual one), none, crop (padded random crop), crop+flip.",
    )
    resize: Literal["resample", "pad"] = Field(
        default="resample",
        description="How images reach input_size: resample (bilinear, antialiased) or pad (centred, with black, "
        "as 28-px MNIST-style images are padded to 32 px; input_size must not be smaller).",
    )
    loader: Literal["auto", "memory", "stream"] = Field(
        default="auto",
        description="memory: decode the whole dataset once and cut batches on the device (fast, for data that "
        "fits); stream (imagefolder only): decode and augment each batch on DataLoader workers; auto: memory "
        "when the decoded splits fit memory_budget_mb, else stream. `kdgraph plan` says which.",
    )
    memory_budget_mb: Int = Field(
        default=2048, ge=1, le=1 << 30, description="auto loader: the most MB the decoded splits (float32 at input_size) may take "
        "in memory before an image folder is streamed instead.",
    )
    on_bad_image: Literal["skip", "error"] = Field(
        default="skip", description="An image file that cannot be decoded: skip it with a warning naming it "
        "(counted in summary.json), or stop with an error.",
    )
    mean: tuple[Float, ...] | None = Field(
        default=None, description="imagefolder: per-channel normalisation mean in 0..1 pixel units (None: the "
        "teacher's timm pretrained_cfg, or the student's without a teacher, else the training split's "
        "statistics). Set with std.",
    )
    std: tuple[Annotated[Float, Field(gt=0.0)], ...] | None = Field(
        default=None, description="imagefolder: per-channel normalisation std in 0..1 pixel units (see mean).",
    )
    crop_pct: Float | None = Field(
        default=None, gt=0.0, le=1.0, description="Streamed evaluation: resize to input_size / crop_pct, then "
        "centre-crop input_size (None: the teacher's pretrained_cfg crop_pct, else timm's 0.875).",
    )
    crop_scale: tuple[Annotated[Float, Field(gt=0.0, le=1.0)], Annotated[Float, Field(gt=0.0, le=1.0)]] = Field(
        default=(0.08, 1.0), description="Streamed training: area range of timm's random-resized crop.",
    )

    @field_validator("input_size")
    @classmethod
    def _bounded_input(cls, size: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        # Tracing allocates a batch of this size before any model code runs.
        if size is not None and math.prod(size) > MAX_INPUT_ELEMENTS:
            raise _invalid(f"one sample of {size[0]}x{size[1]}x{size[2]} has {math.prod(size):,} values, more than "
                           f"the {MAX_INPUT_ELEMENTS:,} kdgraph accepts",
                           allowed=f"[C, H, W] with C*H*W <= {MAX_INPUT_ELEMENTS:,} (e.g. [3, 4096, 4096])")
        return size

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, dataset: str) -> str:
        if dataset in BUILTIN_DATASETS:
            return dataset
        source, sep, name = dataset.partition(":")
        if source == "torchvision" and sep and _IDENT.match(name):
            return dataset
        from .data import DATASETS  # loaders registered with kdgraph.data.register_dataset (lazy: torch)

        if source in DATASETS:
            return dataset
        extra = sorted(set(DATASETS) - set(BUILTIN_DATASETS) - {"torchvision"})
        raise _invalid("unknown dataset", allowed=", ".join([*BUILTIN_DATASETS, *extra]) + ", torchvision:NAME")

    @model_validator(mode="after")
    def _check_image_options(self) -> DataSpec:
        folder = self.dataset == "imagefolder"
        if self.loader == "stream" and not folder:
            raise _invalid(f"the streaming loader reads image folders; {self.dataset} is held in memory",
                           allowed="auto, memory", at="loader", got=self.loader)
        for key in ("mean", "std"):
            if getattr(self, key) is not None and not folder:
                raise _invalid(f"sets the normalisation of an image folder (0..1 pixel units); {self.dataset} is "
                               "normalised with its training split's statistics", allowed="null", at=key,
                               got=getattr(self, key))
        if (self.mean is None) != (self.std is None):
            given, missing = ("mean", "std") if self.std is None else ("std", "mean")
            raise _invalid(f"{given} is set, {missing} is not: give both or neither",
                           allowed=f"a list of per-channel values like {given}", at=missing, got=None)
        channels = self.input_size[0] if self.input_size is not None else None
        if self.mean is not None and (len(self.mean) != len(self.std) or
                                      (channels is not None and len(self.mean) != channels)):
            raise _invalid(f"mean has {len(self.mean)} values, std {len(self.std)}"
                           + (f", input_size {channels} channels" if channels is not None else ""),
                           allowed=f"{channels or 'C'} values each", at="mean", got=self.mean)
        if self.crop_scale[0] > self.crop_scale[1]:
            raise _invalid("crop_scale is (min, max) area", allowed="0 < min <= max <= 1", at="crop_scale",
                           got=self.crop_scale)
        return self


class CutPair(_Strict):
    """One hand-chosen cut: a teacher module path and the student module path matched with it."""

    teacher: str = Field(description="Teacher module path whose output is the cut, e.g. 'layer3'.")
    student: str = Field(description="Student module path whose output is the cut, e.g. 'stages.2'.")


class DecomposeSpec(_Strict):
    """How teacher and student are cut into sequential blocks."""

    blocks: Int = Field(default=5, ge=1, le=MAX_BLOCKS, description="Number of blocks k, the head included.")
    cuts: Literal["auto"] | list[CutPair] = Field(
        default="auto",
        description="'auto' (cut at stage ends found from shapes) or blocks-1 explicit {teacher, student} module paths.",
    )
    projector: Literal["conv1x1", "cap"] = Field(
        default="conv1x1",
        description="lift adapter: conv1x1 (1x1 conv + BN where widths differ; with resampling and "
        "token<->map conversion where layouts or resolutions differ) or cap (ScaleKD's cross-attention "
        "projector at every block end).",
    )

    @model_validator(mode="after")
    def _cuts_fit_blocks(self) -> DecomposeSpec:
        if isinstance(self.cuts, list) and len(self.cuts) != self.blocks - 1:
            raise _invalid(
                f"{self.blocks} blocks need {self.blocks - 1} cuts, {len(self.cuts)} given",
                allowed=f"'auto' or a list of {self.blocks - 1} {{teacher, student}} pairs",
                at="cuts",
                got=[c.model_dump() for c in self.cuts],
            )
        return self


class ScheduleSpec(_Strict):
    """The training method and how epochs are split over its training stages."""

    method: Literal["stablekd", "kd", "kd+mse", "supervised"] = Field(
        default="stablekd",
        description="stablekd (decompose, then recompose), kd (logits only), kd+mse (logits and block "
        "features), supervised (labels only, no teacher). Without a teacher the default becomes supervised.",
    )
    recompositions: Int = Field(
        default=2, ge=0, le=MAX_BLOCKS, description="StableKD recompositions n (n+1 training stages); ignored by other methods."
    )
    epochs: Int = Field(default=60, ge=1, le=MAX_EPOCHS, description="Total training epochs over all training stages.")
    stage_epochs: list[Annotated[Int, Field(ge=1, le=MAX_EPOCHS)]] | None = Field(
        default=None,
        description="Epochs of each training stage (recompositions+1 entries for stablekd, 1 otherwise, "
        "summing to epochs). None: equal split, remainder to the last stage.",
    )

    @property
    def num_stages(self) -> int:
        """Training stages this schedule has: recompositions+1 for StableKD, one otherwise."""
        return self.recompositions + 1 if self.method == "stablekd" else 1


class LossSpec(_Strict):
    """Weights and form of the loss terms."""

    kl_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight λ of KL(teacher logits) in the head loss.")
    temperature: Float = Field(default=1.0, gt=0.0, le=1000.0, description="Softmax temperature of the KL term.")
    feature: Literal["mse", "dfm"] = Field(
        default="mse", description="Loss between student and teacher block features: mse, or dfm "
        "(ScaleKD's dual-view feature mimicking: channel-normalised MSE + MSE with the DCT's direct "
        "component removed).")
    feature_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight of each feature loss term.")
    dfm_alpha: Float = Field(default=0.08, ge=0.0, le=1000.0, description="DFM weight of the direct view (ScaleKD's configs: 0.08).")
    dfm_beta: Float = Field(default=0.06, ge=0.0, le=1000.0, description="DFM weight of the alternative view (ScaleKD's configs: 0.06).")
    tpp: Flag = Field(default=False, description="ScaleKD's teacher parameter perception: feed the student's "
                      "feature at block tpp_block (through lift) into the frozen teacher's later blocks and match "
                      "the teacher's logits (KL) there; gradients reach the student through the teacher.")
    tpp_block: Int | None = Field(default=None, ge=1, le=MAX_BLOCKS, description="Block end where the proxy path leaves the "
                                          "student (None: the last block before the head).")
    tpp_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight of the TPP loss.")
    label_smoothing: Float = Field(default=0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy term.")


class OptimSpec(_Strict):
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = Field(default="sgd", description="Optimizer.")
    lr: Float = Field(default=0.1, gt=0.0, le=10.0, description="Peak learning rate (of the first training stage).")
    momentum: Float = Field(default=0.9, ge=0.0, le=1.0, description="SGD momentum.")
    nesterov: Flag = Field(default=False, description="Nesterov momentum (SGD).")
    weight_decay: Float = Field(default=5e-4, ge=0.0, le=1.0, description="Weight decay.")
    decay_norms_and_biases: Flag = Field(
        default=False, description="Also decay 1-d parameters (norm scales and shifts, biases) and the "
        "student's no_weight_decay() tokens; off by default, as timm does.")
    betas: tuple[Annotated[Float, Field(ge=0.0, lt=1.0)], Annotated[Float, Field(ge=0.0, lt=1.0)]] = Field(
        default=(0.9, 0.999), description="AdamW betas."
    )
    lr_schedule: Literal["stage_cyclic", "onecycle", "cosine", "constant"] = Field(
        default="stage_cyclic",
        description="stage_cyclic: one triangular cycle per training stage, peak halving each stage "
        "(StableKD's); onecycle / cosine over the whole run; constant.",
    )
    min_lr_ratio: Float = Field(
        default=0.0, ge=0.0, le=1.0, description="Cycles start and end at lr * min_lr_ratio."
    )
    clip_grad_norm: Float | None = Field(
        default=None, gt=0.0, le=1e6, description="Clip the global gradient norm of each step to this (None: no clipping)."
    )


class RuntimeSpec(_Strict):
    """Where and how the plan runs; none of this changes what is trained."""

    device: str = Field(default="auto", description="auto (cuda if available), cpu, cuda or cuda:N.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, fp32 on CPU; bf16 is fp32 on CPU (slow there); "
        "fp16: fp16 autocast with a gradient scaler (GPUs without bf16)."
    )
    micro_batches: Int = Field(
        default=1, ge=1, le=MAX_BATCH_SIZE, description="Split each batch into this many micro-batches and accumulate their gradients: "
        "one optimizer step per batch, the activation memory of one micro-batch (the same gradient as the "
        "whole batch for models without BatchNorm)."
    )
    compile: Flag = Field(default=False, description="torch.compile the training step.")
    channels_last: Flag | Literal["auto"] = Field(
        default="auto", description="channels_last memory format (auto: for conv nets on GPU)."
    )
    log_every: Int = Field(default=50, ge=1, le=MAX_EVERY, description="Log losses every N steps (the step does no host syncs).")
    checkpoint_every: Int = Field(
        default=0, ge=0, le=MAX_EVERY, description="Checkpoint every N steps; 0: only at the end of every epoch."
    )
    eval_every: Int = Field(default=1, ge=1, le=MAX_EVERY, description="Evaluate every N epochs.")
    track_stability: Flag = Field(
        default=False, description="Log, per step, the Euclidean distance between consecutive parameters of "
        "each student block (the head's is StableKD's stability diagnostic) to metrics.jsonl."
    )
    log: Literal["jsonl", "tensorboard"] = Field(
        default="jsonl", description="metrics.jsonl always; tensorboard: also TensorBoard event files in "
        "OUTPUT/tensorboard (needs the tensorboard package: pip install 'kdgraph[tensorboard]').",
    )
    num_threads: Int | None = Field(default=None, ge=1, le=4096, description="CPU threads for torch (None: torch's default).")
    num_workers: Int = Field(
        default=2, ge=0, le=1024, description="Streamed data: DataLoader worker processes that decode and augment "
        "(0: in the training process). Batches do not depend on it.",
    )
    pin_memory: Flag | Literal["auto"] = Field(
        default="auto", description="Streamed data: page-locked batches for faster host-to-GPU copies (auto: on CUDA)."
    )
    persistent_workers: Flag = Field(
        default=True, description="Streamed data: keep the workers alive between epochs (no restart cost per epoch)."
    )
    prefetch_factor: Int = Field(
        default=2, ge=1, le=1024, description="Streamed data: batches each worker prepares ahead of the training step."
    )
    bn_recalibrate: Flag | Literal["auto"] = Field(
        default="auto", description="Re-estimate BatchNorm statistics of the composed student on one pass of "
        "training data before evaluating (auto: in decomposed training stages, whose blocks gathered "
        "statistics on teacher-fed inputs).")

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not _DEVICE.match(device):
            raise _invalid("unknown device", allowed="auto, cpu, cuda, cuda:N")
        return device


class Spec(_Strict):
    """A kdgraph run: teacher, student, data, and how distillation is compiled and run."""

    name: str = Field(min_length=1, description="Run name; outputs go to runs/<name> unless output is set.")
    seed: Int = Field(default=0, ge=0, le=MAX_SEED,
                      description="Random seed of data order, initialisation and augmentation.")
    teacher: ModelSpec | None = Field(
        default=None, description="Teacher network (None: supervised training of the student alone)."
    )
    student: ModelSpec = Field(description="Student network.")
    data: DataSpec = Field(default_factory=DataSpec, description="Dataset and batching.")
    decompose: DecomposeSpec = Field(default_factory=DecomposeSpec, description="Block decomposition.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Method and training stages.")
    loss: LossSpec = Field(default_factory=LossSpec, description="Loss terms.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and LR schedule.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Device, precision, logging.")
    output: Path | None = Field(default=None, description="Output directory (None: runs/<name>).")

    _source_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _supervised_without_teacher(cls, data: Any) -> Any:
        """No teacher and no explicit method: the method is supervised."""
        if not isinstance(data, dict) or data.get("teacher") is not None:
            return data
        schedule = data.get("schedule")
        if schedule is None:
            return {**data, "schedule": {"method": "supervised"}}
        if isinstance(schedule, dict) and "method" not in schedule:
            return {**data, "schedule": {**schedule, "method": "supervised"}}
        if isinstance(schedule, ScheduleSpec) and "method" not in schedule.model_fields_set:
            return {**data, "schedule": schedule.model_copy(update={"method": "supervised"})}
        return data

    @model_validator(mode="after")
    def _check_method(self) -> Spec:
        method = self.schedule.method
        if self.teacher is None and method != "supervised":
            raise _invalid(
                f"method {method!r} needs a teacher; add teacher: {{model: ...}} or set schedule.method: supervised",
                allowed="a {model, kwargs, pretrained, checkpoint} mapping",
                at="teacher",
                got=None,
            )
        if self.teacher is not None and method == "supervised":
            raise _invalid(
                "supervised trains without a teacher; remove teacher or choose a distillation method",
                allowed="stablekd, kd, kd+mse",
                at="schedule.method",
                got=method,
            )
        if method == "stablekd":
            limit = max_recompositions(self.decompose.blocks)
            if self.schedule.recompositions > limit:
                raise _invalid(
                    f"{self.decompose.blocks} blocks allow at most {limit} recompositions "
                    f"(each merges neighbouring block pairs)",
                    allowed=f"0..{limit}",
                    at="schedule.recompositions",
                    got=self.schedule.recompositions,
                )
        if self.loss.tpp and method == "supervised":
            raise _invalid("teacher parameter perception needs a teacher", allowed="false without a teacher",
                           at="loss.tpp", got=True)
        if self.loss.tpp_block is not None and self.loss.tpp_block >= self.decompose.blocks:
            raise _invalid(f"the proxy path leaves the student at a block end before the head "
                           f"(1..{self.decompose.blocks - 1})", allowed=f"1..{self.decompose.blocks - 1} or null",
                           at="loss.tpp_block", got=self.loss.tpp_block)
        if self.loss.tpp and self.decompose.blocks < 2:
            raise _invalid("teacher parameter perception needs at least one block end: decompose.blocks >= 2",
                           allowed="false with decompose.blocks: 1", at="loss.tpp", got=True)
        stage_epochs = self.schedule.stage_epochs
        if stage_epochs is not None:
            stages = self.schedule.num_stages
            if len(stage_epochs) != stages:
                why = f"stablekd with {self.schedule.recompositions} recompositions" if method == "stablekd" else method
                raise _invalid(
                    f"{why} has {stages} training stage(s), {len(stage_epochs)} stage_epochs given",
                    allowed=f"a list of {stages} positive integers",
                    at="schedule.stage_epochs",
                    got=stage_epochs,
                )
            if sum(stage_epochs) != self.schedule.epochs:
                raise _invalid(
                    f"stage_epochs sum to {sum(stage_epochs)}, not epochs={self.schedule.epochs}",
                    allowed=f"positive integers summing to {self.schedule.epochs}",
                    at="schedule.stage_epochs",
                    got=stage_epochs,
                )
        return self

    @property
    def output_dir(self) -> Path:
        """Where the run writes: ``output``, or runs/<name>."""
        return self.output if self.output is not None else Path("runs") / self.name

    @property
    def source_dir(self) -> Path | None:
        """Directory of the YAML file this spec was loaded from (searched first for module: models)."""
        return self._source_dir

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, every default filled in, as JSON-compatible data."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------
# Loading


def load_spec(source: str | Path | dict[str, Any], overrides: Sequence[str] = (), *,
              allow_code: bool = False) -> Spec:
    """Read, override and validate a spec.

    ``source`` is a YAML file path or an already-parsed mapping (not modified).
    ``overrides`` are ``dotted.path=value`` strings whose value is parsed as YAML.
    A ``module:`` model reference imports and calls Python code, so a spec file is code;
    an override may not introduce one unless ``allow_code`` (the CLI's ``--allow-code``).
    Raises SpecError for any problem; returns a fully resolved Spec.
    """
    source_dir = None
    if isinstance(source, dict):
        _check_bounded(source, "the spec")
        raw = _deep_copy(source)
    else:
        path = Path(source)
        raw = _read_yaml(path)
        source_dir = path.resolve().parent
    before = _code_references(raw)
    for override in overrides:
        _apply_override(raw, override)
    _check_bounded(raw, "the spec with its overrides")
    added = sorted(_code_references(raw) - before)
    if added and not allow_code:
        raise SpecError("--set", f"the overrides introduce {', '.join(map(repr, added))}: a module: reference "
                        "imports and calls Python code; put it in the spec file, or pass --allow-code")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise spec_error_from(exc) from None
    spec._source_dir = source_dir
    return spec


def _code_references(value: Any) -> set[str]:
    """Every ``module:`` string anywhere in a raw spec."""
    if isinstance(value, dict):
        return set().union(*(_code_references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_code_references(v) for v in value)) if value else set()
    return {value.strip()} if isinstance(value, str) and value.strip().startswith("module:") else set()


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _check_bounded(value: Any, what: str) -> None:
    """Refuse values nested deeper than MAX_SPEC_DEPTH or holding more than MAX_SPEC_VALUES
    values, counting a shared (YAML alias) or self-containing one each time it is reached.

    Walks with an explicit stack and stops at the first limit, so that a "billion laughs"
    costs MAX_SPEC_VALUES steps; everything after (copying, validating, rendering errors)
    then works on a small value.
    """
    stack = [(value, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_SPEC_VALUES:
            raise SpecError("", f"{what} holds more than {MAX_SPEC_VALUES:,} values (YAML aliases counted "
                            "at their expanded size); a spec is a few hundred")
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()]
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        if depth >= MAX_SPEC_DEPTH and children:
            raise SpecError("", f"{what} is nested more than {MAX_SPEC_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in children)


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the depth checked on the event stream first: the loader
    recurses once per level and would raise RecursionError around 300 levels."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_SPEC_DEPTH:
                line = f":{event.start_mark.line + 1}" if event.start_mark is not None else ""
                raise SpecError("", f"{where}{line} is nested more than {MAX_SPEC_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    value = yaml.safe_load(text)
    _check_bounded(value, where)
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError("", f"spec file not found: {path}")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError("", f"spec file {path} is {size:,} bytes; a spec is a few KB (at most {MAX_SPEC_BYTES:,})")
    try:
        raw = _parse_yaml(path.read_text(), str(path))
    except UnicodeDecodeError as exc:
        raise SpecError("", f"spec file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError("", f"YAML syntax error in {where}: {problem}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise SpecError("", f"cannot read {path}: {_short(str(exc))}") from None
    if raw is None:
        raise SpecError("", f"spec file {path} is empty; it needs at least name: and student: {{model: ...}}")
    if not isinstance(raw, dict):
        raise SpecError("", f"spec file {path} must be a mapping of keys (name:, student:, ...), got a {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError("--set", f"override {_short(override)} must look like dotted.path=value, e.g. schedule.epochs=3")
    try:
        value = _parse_yaml(text, f"--set {key}") if text.strip() else None
    except SpecError as exc:
        raise SpecError("--set", exc.message) from None
    except (yaml.YAMLError, ValueError) as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError("--set", f"value of override {key!r} is not valid YAML: {_short(problem)}") from None
    parts = key.split(".")
    if len(parts) > MAX_SPEC_DEPTH:
        raise SpecError("--set", f"override key {_short(key)} is more than {MAX_SPEC_DEPTH} levels deep")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, parts[: depth + 1], override)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, parts, override)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, walked: list[str], override: str) -> Any:
    """The container under ``node[part]``, made a fresh mapping where it is absent or null."""
    if isinstance(node, list):
        return node[_index(node, part, walked, override)]
    if node.get(part) is None:
        node[part] = {}
    child = node[part]
    if not isinstance(child, (dict, list)):
        raise SpecError("--set", f"cannot apply {_short(override)}: {'.'.join(walked)} is {_short(child)}, not a mapping")
    return child


def _index(node: list[Any], part: str, walked: list[str], override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SpecError("--set", f"cannot apply {_short(override)}: {'.'.join(walked)} is not an index of a list of {len(node)}")
    return int(part)


# ---------------------------------------------------------------------------
# Rendering validation errors


def spec_error_from(exc: ValidationError, root: type[BaseModel] = Spec) -> SpecError:
    """One SpecError listing every problem of ``exc`` as '<path>: <problem> (got X); allowed: ...'."""
    problems: list[tuple[tuple[str | int, ...], str, tuple[str | int, ...] | None, Any]] = []
    for err in exc.errors(include_url=False):
        path, union_at = _clean_loc(err["loc"], root)
        at = (err.get("ctx") or {}).get("at")
        if at:
            path = path + tuple(at.split("."))
        problems.append((path, _describe(err, path, root), union_at, err.get("input")))
    # A union (cuts: 'auto' | list) reports one error per alternative: where one
    # alternative got further into the value, the others' complaints are noise.
    deeper = {u for p, _, u, _ in problems if u is not None and len(p) > len(u)}
    kept: list[tuple[tuple[str | int, ...], str]] = []
    seen_union: set[tuple[str | int, ...]] = set()
    for path, text, union_at, value in problems:
        if union_at is not None and path == union_at:
            if union_at in deeper or union_at in seen_union:
                continue
            seen_union.add(union_at)
            allowed = _allowed_for(_annotation_at(path, root))
            text = f"matches none of the allowed forms (got {_got(value)}); allowed: {allowed}"
        kept.append((path, text))
    # A misspelt key usually also leaves a required key missing: name the typo first.
    kept.sort(key=lambda item: 0 if "unknown key" in item[1] else 1)
    lines = [f"{_dotted(path)}: {text}" for path, text in kept[:_MAX_PROBLEMS]]
    if len(kept) > _MAX_PROBLEMS:
        lines.append(f"... and {len(kept) - _MAX_PROBLEMS} more problems")
    return SpecError(_dotted(kept[0][0]), "\n".join(lines))


_MAX_PROBLEMS = 10


def _short(value: Any) -> str:
    """``repr(value)`` (a string as it is), cut to MAX_SHOWN characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} characters)"


def _got(value: Any) -> str:
    return _short(repr(value))


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return args[0] if len(args) == 1 else tp


def _is_union(tp: Any) -> bool:
    import types

    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _annotation_at(path: tuple[str | int, ...], root: type[BaseModel]) -> Any:
    """The declared type at ``path`` below ``root`` (None where it cannot be followed)."""
    tp: Any = root
    for part in path:
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif isinstance(part, int):
            tp = _sequence_item(tp, part)
            if tp is None:
                return None
        else:
            return None
    return tp


def _sequence_item(tp: Any, index: int) -> Any:
    options = typing.get_args(tp) if _is_union(tp) else (tp,)
    for option in options:
        origin = typing.get_origin(option)
        args = typing.get_args(option)
        if origin is list and args:
            return args[0]
        if origin is tuple and args:
            return args[0] if args[-1] is Ellipsis else (args[index] if index < len(args) else None)
    return None


def _clean_loc(loc: tuple[str | int, ...], root: type[BaseModel]) -> tuple[tuple[str | int, ...], tuple[str | int, ...] | None]:
    """Drop pydantic's union-member tags ('list[CutPair]') from ``loc``.

    Returns the YAML path and, when the error went through a union of
    alternatives, the path of that union.
    """
    path: list[str | int] = []
    union_at: tuple[str | int, ...] | None = None
    for i, part in enumerate(loc):
        tp = _annotation_at(tuple(path), root)
        model = _strip_optional(tp)
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        if isinstance(part, int) or (is_model and (part in model.model_fields or i == len(loc) - 1)):
            path.append(part)
        elif isinstance(part, str) and tp is not None and _is_union(tp):
            union_at = tuple(path)  # a member tag of a union with several alternatives
        elif tp is None or not is_model:
            path.append(part)  # inside a free-form mapping (kwargs)
    return tuple(path), union_at


def _allowed_for(tp: Any) -> str:
    """A short human rendering of the values a type accepts."""
    if tp is None:
        return ""
    if _is_union(tp):
        parts = [_allowed_for(a) for a in typing.get_args(tp)]
        return " or ".join(p for p in parts if p)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ", ".join(str(v) for v in typing.get_args(tp))
    if origin is Annotated:
        return _allowed_for(typing.get_args(tp)[0])
    if origin is dict or tp is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_allowed_for(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} {_allowed_for(args[0])}s"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "{" + ", ".join(tp.model_fields) + "} mapping"
    names = {int: "integer", float: "number", bool: "true/false", str: "string", Path: "path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(err: dict[str, Any], path: tuple[str | int, ...], root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        owner = _strip_optional(_annotation_at(path[:-1], root))
        fields = list(owner.model_fields) if isinstance(owner, type) and issubclass(owner, BaseModel) else []
        close = difflib.get_close_matches(str(path[-1]), fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {path[-1]!r}; {hint}allowed: {', '.join(fields)}"
    if kind == "missing" and path and isinstance(path[-1], int):
        allowed = _allowed_for(_annotation_at(path[:-1], root))
        return f"too few items, item {path[-1]} is missing; allowed: {allowed}"
    if kind == "missing":
        allowed = _allowed_for(_annotation_at(path, root))
        return f"required key is missing; allowed: {allowed}" if allowed else "required key is missing"
    numeric = _numeric_range(path, root)
    if kind == "spec_value":
        got = ctx.get("got", _got(value))
        allowed = ctx.get("allowed") or numeric
        return f"{err['msg']} (got {got})" + (f"; allowed: {allowed}" if allowed else "")
    message = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    message = message.replace("Input is not a valid path for <class 'pathlib.Path'>", "must be a path")
    message = message[0].lower() + message[1:] if message else message
    # A number's error names its whole range; a wrong type names the allowed form; other bounds
    # (too_short, ...) already say what is allowed.
    is_type_error = kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "enum", "path_type")
    allowed = numeric or (_allowed_for(_annotation_at(path, root)) if is_type_error else "")
    return f"{message} (got {_got(value)})" + (f"; allowed: {allowed}" if allowed else "")


def _numeric_range(path: tuple[str | int, ...], root: type[BaseModel]) -> str:
    """'an integer from 1 to 100000' for a bounded number field at ``path``, else ''."""
    tp, metadata = _strip_optional(_annotation_at(path, root)), list(_metadata_at(path, root))
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata += extra
    if tp not in (int, float):
        return ""
    bounds: dict[str, Any] = {}
    for declared in metadata:
        for item in [declared, *getattr(declared, "metadata", ())]:  # a Field() in Annotated holds its own
            for name in ("gt", "ge", "lt", "le"):
                if getattr(item, name, None) is not None:
                    bounds[name] = getattr(item, name)
    if not bounds:
        return ""
    low = f">= {bounds['ge']:g}" if "ge" in bounds else f"> {bounds['gt']:g}" if "gt" in bounds else ""
    high = f"<= {bounds['le']:g}" if "le" in bounds else f"< {bounds['lt']:g}" if "lt" in bounds else ""
    kind = "an integer" if tp is int else "a number"
    if tp is int and "ge" in bounds and "le" in bounds:
        return f"{kind} from {bounds['ge']} to {bounds['le']}"
    return f"{kind} " + " and ".join(b for b in (low, high) if b)


def _metadata_at(path: tuple[str | int, ...], root: type[BaseModel]) -> list[Any]:
    """The constraints (Ge, Le, ...) declared on the field at ``path``; [] for list items,
    whose constraints live in their Annotated type."""
    if not path or not isinstance(path[-1], str):
        return []
    owner = _strip_optional(_annotation_at(path[:-1], root))
    if isinstance(owner, type) and issubclass(owner, BaseModel) and path[-1] in owner.model_fields:
        return list(owner.model_fields[path[-1]].metadata)
    return []
