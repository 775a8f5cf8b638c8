"""The kdgraph spec's schema: pydantic models that are the single source of truth for a run.

Every field has its default and its documentation here, and nowhere else. Each rule that
spans fields is one named validator. Names chosen from a registry (methods, datasets, LR
schedules, augmentations, model sources) are checked against ``kdgraph.registry`` when
validating, so an entry registered later is valid too.

Numbers are typed strictly (``true`` is not 1, ``2.5`` is not an integer) and bounded
above as well as below, so that no spec can hang or exhaust the machine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PrivateAttr,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from kdgraph.paths import NAME_MAX, PATH_MAX, path_problem
from kdgraph.registry import (
    AUGMENTATIONS,
    DATASETS,
    LOGIT_LOSSES,
    METHODS,
    MODEL_SOURCES,
    PRETRAINED_SOURCES,
    SCHEDULES,
    TASKS,
    TOKEN_DIVERGENCES,
    Method,
    dataset_choices,
    model_source_choices,
)

__all__ = [
    "CutPair",
    "EveryLayer",
    "LayerPair",
    "MixupSpec",
    "DataSpec",
    "DecomposeSpec",
    "LossSpec",
    "ModelSpec",
    "TeacherSpec",
    "OneOf",
    "OptimSpec",
    "RuntimeSpec",
    "ScheduleSpec",
    "Spec",
    "max_recompositions",
]

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
DEFAULT_CROP_PCT = 0.875  # timm's evaluation crop, where neither the spec nor the model's pretrained_cfg sets one

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
        ctx["got"] = got
    return PydanticCustomError("spec_value", message, ctx)


@dataclass(frozen=True)
class OneOf:
    """Field metadata: a string that must be one of ``choices()``, read when validating (so
    that entries registered after import count). ``accepts`` decides; by default, being one
    of the choices. The error renderer lists the choices as what is allowed."""

    what: str
    choices: Callable[[], list[str]]
    accepts: Callable[[str], bool] | None = None

    def allowed(self) -> str:
        return ", ".join(self.choices())

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The choices as the JSON schema's enum (examples, where ``accepts`` takes more forms)."""
        return {**handler(schema), ("enum" if self.accepts is None else "examples"): self.choices()}

    def _check(self, value: str) -> str:
        accepted = self.accepts(value) if self.accepts is not None else value in self.choices()
        if not accepted:
            raise _invalid(f"unknown {self.what}", allowed=self.allowed())
        return value


def _method_names(where: Callable[[Method], bool]) -> list[str]:
    """Names of the methods ``where`` holds for, in registration order."""
    return [name for name in METHODS if where(METHODS.get(name))]


def max_recompositions(blocks: int) -> int:
    """How many recompositions k blocks allow: each merges neighbouring pairs, ceil(k/2) remain."""
    return math.ceil(math.log2(blocks)) if blocks > 1 else 0


def _not_a_bool(value: Any) -> Any:
    """Python's bool is an int: without this, `epochs: true` would train for one epoch."""
    if isinstance(value, bool):
        raise PydanticCustomError("spec_value", "true/false is not a number", {"allowed": "", "at": ""})
    return value


# Numbers refuse booleans; Int takes integers only (not "3", not 64.0); Float takes
# integers, and strings YAML 1.1 leaves unparsed ("1e-3": PyYAML needs 1.0e-3).
Int = Annotated[int, BeforeValidator(_not_a_bool), Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
Flag = Annotated[bool, Strict()]  # true/false only: not 1, "yes" or "on"
_Side = Annotated[Int, Field(ge=1, le=MAX_SIDE)]


def _fits_the_os(path: Path) -> Path:
    """A path every os call would refuse (ENAMETOOLONG, even to ask whether it exists)."""
    problem = path_problem(path)
    if problem is not None:
        raise _invalid(f"the path {problem}", allowed=f"names of at most {NAME_MAX} bytes, paths of at most "
                       f"{PATH_MAX - 1} bytes", got=str(path) if len(str(path)) <= 80 else str(path)[:80] + "...")
    return path


UserPath = Annotated[Path, AfterValidator(_fits_the_os)]


class _Strict(BaseModel):
    # No inf/nan anywhere: `--set optim.lr=.inf` would otherwise train all-NaN and exit 0.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EveryLayer(_Strict):
    """Every k-th of the teacher's layers: indices k-1, 2k-1, ... (counting from 1, the k-th, 2k-th, ...)."""

    every: Int = Field(description="k >= 1: keep teacher layers k-1, 2k-1, 3k-1, ... (0-based).")


def _increasing_layers(keep: list[int] | EveryLayer | None) -> list[int] | EveryLayer | None:
    if isinstance(keep, EveryLayer) and not 1 <= keep.every <= 10**6:
        raise _invalid("every k-th layer needs k >= 1", allowed="{every: k}, k from 1 to 10^6", got=keep.every)
    if isinstance(keep, list):
        if any(not 0 <= i <= 10**6 for i in keep):
            raise _invalid("teacher layer indices count from 0", allowed="indices from 0 to 10^6", got=keep)
        if not keep:
            raise _invalid("no layer kept", allowed="a non-empty list of teacher layer indices, or {every: k}")
        if any(b <= a for a, b in zip(keep, keep[1:])):
            raise _invalid("the kept teacher layers must be strictly increasing (each once, in the teacher's "
                           "order)", allowed="e.g. [0, 2, 5]", got=keep)
    return keep


class ModelSpec(_Strict):
    """A network to build: a source reference, its constructor arguments, optional weights."""

    model: Annotated[str, Strict()] = Field(  # strict: no bytes (YAML's !!binary) coerced to a reference
        description="Model reference: 'timm:NAME', 'torchvision:NAME', 'module:pkg.mod:factory' "
        "(a factory function in an importable module; the spec's directory is searched first) or "
        "'diffusers:UNet2DModel' (kwargs: its config; pip install 'kdgraph[diffusion]') or "
        "'transformers:TYPE|CONFIG.json|FOLDER|org/name' (a causal LM; pip install 'kdgraph[lm]')."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the model factory, e.g. {num_classes: 100}.",
    )
    pretrained: Flag = Field(
        default=False,
        description="Load the source's own pretrained weights (timm:, torchvision: and transformers: models; "
        "timm's or Hugging Face's hub or local cache, torchvision's DEFAULT weights). Another kwargs.num_classes gives a student a fresh "
        "classifier, as timm does; a teacher's must match. `kdgraph plan` does not fetch them.",
    )
    checkpoint: UserPath | None = Field(
        default=None,
        description="Weights file to load (strictly; format read from its content): safetensors or a torch "
        "file holding a timm, torchvision or HF state_dict (wrappers such as state_dict/model/module and "
        "prefixes such as module. stripped) or a kdgraph training checkpoint (checkpoints/last.pt). A "
        "student's classifier trained for another number of classes is re-initialised; a teacher's must fit. "
        "Relative paths are relative to the working directory.",
    )
    from_teacher: Flag = Field(
        default=False,
        description="Student only: start from the teacher's weights, every tensor whose name and shape match "
        "(BK-SDM's initialisation of a student with blocks removed); the plan's notes list what was copied.",
    )
    from_teacher_layers: Annotated[
        list[Int] | EveryLayer | None, AfterValidator(_increasing_layers)
    ] = Field(
        default=None,
        description="Student only, transformers: pairs: a depth-pruned copy of the teacher. Student decoder layer "
        "i starts as teacher layer keep[i] (a list of teacher layer indices, 0-based, increasing; or {every: k}: "
        "layers k-1, 2k-1, ..., the ones Minitron's pairing then pairs them with), and every other tensor "
        "(embedding, final norm, head) is the teacher's. The student's config must have as many layers as are "
        "kept and the teacher's shapes (width, heads, vocabulary); the plan's notes list the copy.",
    )

    @field_validator("model")
    @classmethod
    def _check_reference(cls, ref: str) -> str:
        allowed = ", ".join(model_source_choices())
        source, sep, rest = ref.partition(":")
        if not sep or not rest:
            raise _invalid("model reference must be 'SOURCE:NAME'", allowed=allowed)
        if source not in MODEL_SOURCES:
            raise _invalid(f"unknown model source {source!r}", allowed=allowed)
        if source in ("timm", "torchvision") and not _NAME.match(rest):
            raise _invalid(f"bad {source} model name {rest!r}", allowed=allowed)
        if source == "module":
            module, sep, factory = rest.rpartition(":")
            if not sep or not _DOTTED.match(module) or not _IDENT.match(factory):
                raise _invalid("module reference must be 'module:pkg.mod:factory'", allowed=allowed)
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
    def _pretrained_or_checkpoint(self) -> ModelSpec:
        if self.pretrained and self.checkpoint is not None:
            raise _invalid("give either pretrained: true or a checkpoint, not both (the checkpoint would "
                           "replace every pretrained weight)", allowed="false with a checkpoint", at="pretrained",
                           got=True)
        return self

    @model_validator(mode="after")
    def _pretrained_weights_exist(self) -> ModelSpec:
        if not self.pretrained:
            return self
        source, sources = self.model.partition(":")[0], _pretrained_sources()
        if source not in sources:
            raise _invalid(f"{source}: models have no pretrained weights kdgraph can fetch; give the weights "
                           "file as checkpoint: PATH", allowed=f"true for {', '.join(sources)} models",
                           at="pretrained", got=True)
        return self


class TeacherSpec(ModelSpec):
    """The teacher: a network to build, and optionally its logits replayed from a cache."""

    cache: UserPath | None = Field(
        default=None,
        description="A teacher cache written by `kdgraph cache SPEC --epochs N` (a folder): every training "
        "stage whose only teacher read is the head replays the teacher's logits from it instead of running "
        "the teacher (the teacher is not built when no stage needs it live); `kdgraph plan` names those "
        "stages. A cache built for another teacher, data, augmentation, seed or runtime is refused, and so "
        "is a plan that reads it past its epochs.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="The dtype the frozen teacher's weights are kept and computed in: bfloat16 or float16 halve "
        "its memory (2 bytes per parameter, no optimizer state: it is never trained) and run it in that dtype, "
        "outside the run's autocast; its outputs reach the losses as float32. float32 is exact. A teacher "
        "cache is keyed on it.",
    )
    shard: Flag = Field(
        default=False,
        description="Under torchrun, shard the frozen teacher's parameters across the ranks with torch's FSDP2 "
        "(fully_shard; outside the student's DDP): each rank keeps 1/N of them and gathers one module's at a "
        "time as it runs. Needs torchrun with 2 or more ranks; not with runtime.compile or loss.tpp.",
    )

    @field_validator("cache")
    @classmethod
    def _cache_is_a_folder(cls, v: Path | None) -> Path | None:
        if v is not None and (v.is_file() or (v.exists() and not v.is_dir())):
            raise _invalid("a teacher cache is a folder, and this is a file",
                           allowed="a folder kdgraph cache wrote, or a path that does not exist yet")
        return v


def _shown(keep: list[int] | EveryLayer) -> Any:
    return {"every": keep.every} if isinstance(keep, EveryLayer) else keep


def _pretrained_sources() -> list[str]:
    """Sources whose models have pretrained weights (declared in kdgraph.registry, implemented in kdgraph.models)."""
    return PRETRAINED_SOURCES.names()


def _summaries(registry) -> str:
    """'name (summary), ...' of a registry whose entries carry a one-line summary."""
    return ", ".join(f"{name} ({registry.get(name).summary})" for name in registry.names())


def _is_registered_dataset(dataset: str) -> bool:
    """A dataset is named by its registered loader, before any colon (torchvision:CIFAR10)."""
    return dataset.partition(":")[0] in DATASETS


class MixupSpec(_Strict):
    """Mixup / CutMix of each training batch, timm's ``Mixup`` in batch mode (``kdgraph.transforms.MixupCutmix``):
    the one mixed batch is what both the teacher and the student see (consistent teaching)."""

    mixup_alpha: Float = Field(default=1.0, ge=0.0, le=100.0, description="Mixup's Beta(α, α) (0: no mixup).")
    cutmix_alpha: Float = Field(default=0.0, ge=0.0, le=100.0, description="CutMix's Beta(α, α) (0: no cutmix).")
    prob: Float = Field(default=1.0, ge=0.0, le=1.0, description="Probability that a batch is mixed.")
    switch_prob: Float = Field(default=0.5, ge=0.0, le=1.0, description="With both alphas > 0: probability of "
                               "cutmix rather than mixup for a batch.")

    @model_validator(mode="after")
    def _one_alpha_positive(self) -> MixupSpec:
        if self.mixup_alpha + self.cutmix_alpha <= 0:
            raise _invalid("mixup_alpha and cutmix_alpha are both 0: nothing would be mixed",
                           allowed="mixup_alpha > 0 or cutmix_alpha > 0", at="mixup_alpha", got=self.mixup_alpha)
        return self


class DataSpec(_Strict):
    """The dataset, its input shape and how it is batched and augmented."""

    dataset: Annotated[str, OneOf("dataset", dataset_choices, accepts=_is_registered_dataset)] = Field(
        default="digits",
        description="Dataset: digits, fashion-mnist, fashion-mnist-masks, fashion-mnist-seg, imagefolder, synthetic, "
        "'torchvision:NAME' (a torchvision dataset class whose files are present under root), text (token "
        "windows of seq_len for a causal LM, task causal_lm; root a folder of UTF-8 .txt files or a .jsonl file), "
        "or an image + mask folder under root for the dense task, its train split trained on and its val split "
        "evaluated, streamed at input_size: voc (JPEGImages/, SegmentationClass/ PNG masks, "
        "ImageSets/Segmentation/{train,val}.txt; num_classes: None = the student's) or cityscapes "
        "(leftImg8bit/<split>/<city>/, gtFine/<split>/<city>/*_labelIds.png, mapped to its 19 train ids).",
    )
    root: UserPath | None = Field(default=None, description="Directory of the dataset files (None: the dataset's default).")
    input_size: tuple[_Side, _Side, _Side] | None = Field(
        default=None, description=f"Input shape C,H,W fed to the models (None: the dataset's own size); each "
        f"side at most {MAX_SIDE}, C*H*W at most {MAX_INPUT_ELEMENTS}."
    )
    seq_len: Int | None = Field(default=None, ge=2, le=1 << 16, description="text: tokens per window fed to a "
                                "causal LM (required there; input_size is then [1, 1, seq_len]).")
    tokenizer: UserPath | None = Field(
        default=None, description="text: a local folder holding a Hugging Face fast tokenizer (tokenizer.json, "
        "tokenizer_config.json; read with local files only, no remote code; hub ids are not fetched) the text is "
        "tokenised with; its ids must fit the student's and the teacher's vocab_size; export writes it beside "
        "the model (None: UTF-8 bytes, ids 0..255). Refused on any other dataset.",
    )
    batch_size: Int = Field(default=128, ge=1, le=MAX_BATCH_SIZE, description="Training batch size.")
    test_batch_size: Int | None = Field(
        default=None, ge=1, le=MAX_BATCH_SIZE, description="Evaluation batch size (None: the training batch size)."
    )
    fraction: Float = Field(default=1.0, gt=0.0, le=1.0, description="Fraction of the training set used, in (0, 1] "
                            "(of what val_fraction leaves).")
    val_fraction: Float = Field(
        default=0.0, ge=0.0, le=0.5,
        description="Share of each class of the training split held out (chosen by seed, before fraction) as a "
        "validation split: evaluation during training and the best checkpoint read it, the test split is "
        "evaluated once at the end (0: no validation split; evaluation reads the test split). text: the last "
        "share of the tokens before the held-out end.",
    )
    samples: Int = Field(default=2048, ge=1, le=MAX_SAMPLES, description="Number of samples of the synthetic dataset.")
    num_classes: Int | None = Field(
        default=None, ge=2, le=MAX_CLASSES, description="Number of classes (None: from the dataset; required for synthetic data of a custom size)."
    )
    augment: Annotated[str, OneOf("augmentation", lambda: ["auto", *AUGMENTATIONS.names()])] = Field(
        default="auto",
        description="Training augmentation: auto (the dataset's usual one); " + _summaries(AUGMENTATIONS) + ". A crop "
        "is padded by H // 8 in memory, timm's random-resized crop (crop_scale) when streamed; for voc and "
        "cityscapes a random scale in 0.5..2 and an input_size crop applied to image and mask alike (auto: with "
        "the flip).",
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
        default=2048, ge=1, le=1 << 30,
        description="auto loader: the most MB the decoded splits (uint8 at input_size, one byte per pixel value) "
        "may take in memory before an image folder is streamed instead; loading peaks at about that size.",
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
        f"centre-crop input_size (None: the teacher's pretrained_cfg crop_pct, else timm's {DEFAULT_CROP_PCT}).",
    )
    crop_scale: tuple[Annotated[Float, Field(gt=0.0, le=1.0)], Annotated[Float, Field(gt=0.0, le=1.0)]] = Field(
        default=(0.08, 1.0), description="Streamed training: area range of timm's random-resized crop.",
    )
    mixup: MixupSpec | None = Field(
        default=None, description="Mixup/CutMix of each training batch after augment, drawn from (seed, epoch, "
        "batch) so that a resumed run is exact; teacher and student see the same mixed batch and the "
        "cross-entropy term gets the mixed labels (None: off). Classification labels only.",
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

    @model_validator(mode="after")
    def _stream_reads_image_folders(self) -> DataSpec:
        if self.loader == "stream" and self.dataset != "imagefolder":
            raise _invalid(f"the streaming loader reads image folders; {self.dataset} is held in memory",
                           allowed="auto, memory", at="loader", got=self.loader)
        return self

    @model_validator(mode="after")
    def _tokenizer_for_text(self) -> DataSpec:
        if self.tokenizer is not None and self.dataset != "text":
            raise _invalid(f"tokenises the text dataset; {self.dataset} is not text, and it would be ignored",
                           allowed="null", at="tokenizer", got=str(self.tokenizer))
        return self

    @model_validator(mode="after")
    def _normalisation_set_for_image_folders(self) -> DataSpec:
        for key in ("mean", "std"):
            if getattr(self, key) is not None and self.dataset != "imagefolder":
                raise _invalid(f"sets the normalisation of an image folder (0..1 pixel units); {self.dataset} is "
                               "normalised with its training split's statistics", allowed="null", at=key,
                               got=getattr(self, key))
        return self

    @model_validator(mode="after")
    def _mean_and_std_together(self) -> DataSpec:
        if (self.mean is None) != (self.std is None):
            given, missing = ("mean", "std") if self.std is None else ("std", "mean")
            raise _invalid(f"{given} is set, {missing} is not: give both or neither",
                           allowed=f"a list of per-channel values like {given}", at=missing, got=None)
        return self

    @model_validator(mode="after")
    def _mean_and_std_per_channel(self) -> DataSpec:
        channels = self.input_size[0] if self.input_size is not None else None
        if self.mean is not None and (len(self.mean) != len(self.std) or
                                      (channels is not None and len(self.mean) != channels)):
            raise _invalid(f"mean has {len(self.mean)} values, std {len(self.std)}"
                           + (f", input_size {channels} channels" if channels is not None else ""),
                           allowed=f"{channels or 'C'} values each", at="mean", got=self.mean)
        return self

    @model_validator(mode="after")
    def _crop_scale_ordered(self) -> DataSpec:
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
    adapters: Literal["auto", "in_path", "projected"] = Field(
        default="auto",
        description="Where widths or layouts differ at a block end: in_path (lift/lower adapters, lower∘lift "
        "stays in the student's path and folds at export where exact) or projected (the teacher's feature is "
        "projected into the student's format by a PCA fitted on projection_batches training batches before "
        "decomposition, then frozen; the student is fed it and trained to produce it, so no adapter stays "
        "in its path and export is always the plain model). Pairs the projection cannot carry (multi-tensor "
        "cuts, prefix tokens the teacher lacks) fall back to in_path; the plan says why. auto (the default): "
        "projected where the method decomposes (stablekd) with the conv1x1 projector and no TPP, in_path "
        "otherwise (KD's feature lifts are training-only and never reach the student's path).",
    )
    projection_batches: Int = Field(default=20, ge=1, le=100_000,
                                    description="Training batches the PCA of adapters: projected is fitted on.")

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

    method: Annotated[str, OneOf("method", METHODS.names)] = Field(
        default="stablekd",
        description=_summaries(METHODS) + ". Without a teacher the default becomes supervised.",
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


# The feature entries of kdgraph.losses.LOSSES (which needs torch: a test keeps the two equal).
FeatureLoss = Literal["mse", "dfm", "pkd", "cosine"]


class LayerPair(_Strict):
    """One explicit layer pair: a feature loss between a student module's output and a teacher
    module's output (both single-tensor cuts: `kdgraph plan` lists them), an adapter lifting the
    student's feature where widths or grids differ."""

    student: str = Field(min_length=1, description="Student module path whose output is compared, e.g. 'layer2.1'.")
    teacher: str = Field(min_length=1, description="Teacher module path whose output is its target, e.g. 'layer3.0'.")
    loss: FeatureLoss = Field(default="mse", description="Feature loss of the pair: mse, cosine, pkd or dfm (as loss.feature).")
    weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight of the pair's loss term.")


class LossSpec(_Strict):
    """Weights and form of the loss terms."""

    logit: Annotated[str, OneOf("logit loss", LOGIT_LOSSES.names)] = Field(
        default="kl", description="Head loss against the teacher's logits: " + _summaries(LOGIT_LOSSES)
        + ". Without a teacher the head loss is cross-entropy alone.")
    standardize: Flag = Field(default=False, description="Logit standardisation (Sun et al. 2024): Z-score "
                              "the teacher's and the student's logits per sample before the tempered softmax "
                              "of loss.logit (temperature is then the base temperature; their CIFAR recipe: "
                              "temperature 2, kl_weight 9).")
    ce_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight of the cross-entropy term with "
                             "the labels; 0 is function matching (Beyer et al.: the teacher's logits alone), "
                             "which needs a teacher.")
    kl_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight λ of KL(teacher logits) in the head loss (loss.logit: kl).")
    temperature: Float = Field(default=1.0, ge=1e-3, le=1000.0, description="Softmax temperature of the logit "
                               "loss (KL, DKD, DIST) and of TPP's KL.")
    dkd_alpha: Float = Field(default=1.0, ge=0.0, le=1000.0, description="DKD: weight α of the target-class "
                             "term TCKD (mdistiller's CIFAR-100 setting: 1).")
    dkd_beta: Float = Field(default=8.0, ge=0.0, le=1000.0, description="DKD: weight β of the non-target-class "
                            "term NCKD (mdistiller's CIFAR-100 setting: 8).")
    dkd_warmup_epochs: Float = Field(default=0.0, ge=0.0, le=MAX_EPOCHS, description="DKD: epochs over which "
                                     "its terms ramp in linearly, per step (0: none; mdistiller: 20 of 240).")
    dist_beta: Float = Field(default=1.0, ge=0.0, le=1000.0, description="DIST: weight β of the inter-class "
                             "relation (the authors' default: 1).")
    dist_gamma: Float = Field(default=1.0, ge=0.0, le=1000.0, description="DIST: weight γ of the intra-class "
                              "relation (the authors' default: 1).")
    feature: FeatureLoss = Field(
        default="mse", description="Loss between student and teacher block features: mse, cosine (1 - the cosine "
        "similarity along channels, averaged over tokens or pixels: a causal LM's hidden states), pkd (Cao et al. 2022: "
        "MSE of per-channel Pearson-normalised features), or dfm "
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
    token: Annotated[str, OneOf("token divergence", TOKEN_DIVERGENCES.names)] = Field(
        default="forward_kl", description="Causal LM (task causal_lm) with a teacher: the per-token divergence of "
        "the head loss, weighted by kl_weight, plus ce_weight times cross-entropy (without a teacher: "
        "cross-entropy alone).")
    skew_alpha: Float = Field(default=0.1, gt=0.0, lt=1.0, description="Causal LM, skew_kl: the teacher's share α "
                              "of the mixture KL(p || α p + (1−α) q) (DistiLLM: 0.1).")
    jsd_beta: Float = Field(default=0.5, gt=0.0, lt=1.0, description="Causal LM, jsd: the teacher's share β of the "
                            "mixture m = β p + (1−β) q in β KL(p || m) + (1−β) KL(q || m) (GKD: 0.5).")
    ignore_index: Int | None = Field(default=None, ge=-(1 << 31), le=(1 << 31) - 1, description="The target "
                                     "left out of every loss and metric: a causal LM's padding token id, a dense "
                                     "task's unlabelled pixel (VOC's borders, Cityscapes' void). None: -100 for a "
                                     "causal LM, 255 for the dense task.")
    dense: Literal["pixel_kl", "cwd"] = Field(
        default="pixel_kl", description="Dense task (per-pixel logits) with a teacher: the head loss besides "
        "ce_weight times the per-pixel cross-entropy: pixel_kl (KL of the per-pixel class distributions, weight "
        "kl_weight) or cwd (Shu et al. 2021: KL of per-channel spatial softmaxes, weight kl_weight; their "
        "Cityscapes setting: temperature 1, kl_weight 5). pixel_kl under a loss.logit other than kl (dkd, dist, "
        "...) is that recipe's head with every pixel a sample. Without a teacher: the cross-entropy alone.")
    aux_weight: Float = Field(default=0.5, ge=0.0, le=1000.0, description="Dense task, a model with an auxiliary "
                              "head (torchvision's aux_loss: true; the plan's head 'aux'): the weight of its per-pixel "
                              "cross-entropy, added inside the ce term (torchvision's reference recipe: 0.5).")
    feature_weights: list[Annotated[Float, Field(ge=0.0, le=1000.0)]] | None = Field(
        default=None, max_length=MAX_BLOCKS, description="Per-level weights of the block-end feature losses (one "
        "per inner block end, in order; kd+mse's levels, StableKD's block losses): a multi-level loss such as "
        "PKD's over FPN levels. None: feature_weight each.")
    token_chunk: Int = Field(default=128, ge=1, le=1 << 24, description="Causal LM: tokens per chunk of the token "
                             "losses (batch × sequence × vocabulary is never held whole in float32).")
    task_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Denoising (spec denoise): weight of "
                               "the task term, MSE between the predicted and the true noise (velocity, with "
                               "denoise.prediction: v; BK-SDM's L_task).")
    output_weight: Float = Field(default=1.0, ge=0.0, le=1000.0, description="Denoising with a teacher: weight "
                                 "of the output term, MSE between the student's and the teacher's predicted "
                                 "noise or velocity (BK-SDM's L_outKD); feature_weight weighs its L_featKD.")
    pairs: list[LayerPair] = Field(
        default_factory=list, max_length=MAX_BLOCKS, description="Explicit layer pairs {student, teacher, loss, "
        "weight}: feature losses at named module outputs, in every training stage, on top of the method's own "
        "(with schedule.method kd: instead of automatic pairs, which kd has none of; with kd+mse: on top of its "
        "block-end MSEs; with stablekd: on top of the decomposition's block losses). Terms mse_p1, mse_p2, ...")

    @model_validator(mode="after")
    def _each_pair_once(self) -> LossSpec:
        """The same pair twice would count its loss twice: a weight doubled without saying so."""
        seen: dict[tuple[str, str, str], int] = {}
        for i, p in enumerate(self.pairs):
            key = (p.student, p.teacher, p.loss)
            if key in seen:
                raise _invalid(f"the same pair as pairs.{seen[key]} ({p.student} -> {p.teacher}, {p.loss}); "
                               "its loss would count twice", allowed="each pair once (set its weight instead)",
                               at=f"pairs.{i}", got=p.model_dump())
            seen[key] = i
        return self

    @model_validator(mode="after")
    def _own_params_of_the_chosen_logit_loss(self) -> LossSpec:
        """A parameter only another logit loss reads would be silently ignored: refuse it where
        it is set to other than its default (a spec that writes out the defaults stays valid
        with any logit loss)."""
        for name in LOGIT_LOSSES:
            for key in LOGIT_LOSSES.get(name).own:
                if name != self.logit and getattr(self, key) != type(self).model_fields[key].default:
                    raise _invalid(f"{key} is a parameter of loss.logit {name}, and loss.logit is {self.logit}",
                                   allowed=f"loss.logit: {name}, or no {key}", at=key, got=getattr(self, key))
        return self


class DenoiseSpec(_Strict):
    """The denoising task (DDPM, Ho et al. 2020): the model predicts the noise ε in
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` from ``(x_t, t)`` (and the class y where
    class-conditional), or with ``prediction: v`` the velocity ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0``;
    per sample, t and ε are drawn from (seed, epoch, sample index).
    Its presence makes a run a denoising one: the data's images are x_0, their labels the
    classes y; the head loss is loss.task_weight·MSE(ε̂, ε) + loss.output_weight·MSE(ε̂, ε̂_teacher)
    (v̂ and v with prediction: v)."""

    schedule: Literal["linear", "cosine"] = Field(default="linear", description="Noise schedule: linear betas "
                                                  "(DDPM) or cosine ᾱ (Nichol & Dhariwal).")
    timesteps: Int = Field(default=1000, ge=2, le=100_000, description="Diffusion steps T.")
    beta_start: Float = Field(default=1e-4, gt=0.0, lt=1.0, description="Linear schedule: β_1.")
    beta_end: Float = Field(default=0.02, gt=0.0, lt=1.0, description="Linear schedule: β_T.")
    class_conditional: Flag = Field(default=False, description="The model's forward takes the class y as its "
                                    "third argument: forward(x, t, y).")
    prediction: Literal["epsilon", "v"] = Field(
        default="epsilon", description="What the model predicts, teacher and student alike (one parameterisation "
        "for both: output KD compares their outputs): epsilon, the noise ε (DDPM); v, the velocity "
        "v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022; diffusers' prediction_type: v_prediction). "
        "The task loss, the denoising MSE and the DDIM sampler follow it.")
    sample_steps: Int = Field(default=50, ge=1, le=100_000, description="DDIM steps of the sample grid "
                              "written at the end of a run (deterministic, η = 0).")
    sample_images: Int = Field(default=64, ge=0, le=1024, description="Images in the sample grid (0: none); "
                               "class-conditional: classes in turn.")
    judge: UserPath | None = Field(default=None, description="A finished kdgraph run of a classifier on the same "
                                   "data (its folder): at the end, the Fréchet distance between its features of "
                                   "DDIM samples and of real test images (student_fd, teacher_fd; not Inception's "
                                   "FID) and, class-conditional, its accuracy on the samples' classes.")
    judge_samples: Int = Field(default=500, ge=2, le=100_000, description="Generated and real images the judge "
                               "compares (each).")

    @model_validator(mode="after")
    def _betas_ordered(self) -> DenoiseSpec:
        if self.beta_start > self.beta_end:
            raise _invalid("β_1 must not exceed β_T", allowed=f"at most beta_end ({self.beta_end})",
                           at="beta_start", got=self.beta_start)
        return self


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
    lr_schedule: Annotated[str, OneOf("lr schedule", SCHEDULES.names)] = Field(
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
    shard_student: Flag = Field(
        default=False, description="Under torchrun, shard the student with torch's FSDP2 (fully_shard) instead of "
        "DDP: each of its repeated layers (a transformer's decoder layers) is one unit, the rest the root; each rank "
        "keeps 1/N of the student's parameters, gradients and optimizer state, and checkpoints are written in "
        "torch.distributed.checkpoint's format, each rank its own shards (checkpoints/last.dcp).")
    shard_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="With shard_student: FSDP2's mixed-precision policy, the dtype the "
        "student's gathered parameters are computed in (gradients are reduced, and the weights kept, in float32).")
    activation_checkpointing: Flag = Field(
        default=False, description="Recompute each of the student's repeated layers' activations in the backward "
        "instead of keeping them (less activation memory, about one more forward of compute).")
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
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, max_length=3,
        description="Trackers that also get the run (as HF Trainer's report_to): the resolved spec and plan "
        "as parameters and every metrics.jsonl number at its global step. tensorboard (as log: tensorboard); "
        "mlflow (MLFLOW_TRACKING_URI, else a file store in OUTPUT/mlruns; experiment: the run's name; "
        "pip install 'kdgraph[mlflow]'); wandb (WANDB_MODE=offline works without an account; files in "
        "OUTPUT/wandb; pip install 'kdgraph[wandb]').",
    )
    num_threads: Int | None = Field(default=None, ge=1, le=4096, description="CPU threads for torch (None: torch's default).")
    num_workers: Annotated[Int, Field(ge=0, le=1024)] | Literal["auto"] = Field(
        default="auto", description="Streamed data: DataLoader worker processes that decode and augment "
        "(0: in the training process; auto: 2 on the CPU, else this rank's CPUs less one, at most 8). Batches do "
        "not depend on it.",
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
        default="auto", description="Re-estimate BatchNorm statistics of the composed student on training "
        "data (bn_recalibrate_batches of it) before evaluating (auto: in decomposed training stages, whose blocks gathered "
        "statistics on teacher-fed inputs).")
    bn_recalibrate_batches: Int | None = Field(
        default=100, ge=1, le=MAX_EVERY, description="Training batches the BatchNorm re-estimate reads (None: a whole "
        "epoch). 100 batches of 64-256 images give 6k-25k samples, where the estimate's error (it falls as one over "
        "the square root of the samples) no longer moves accuracy: detectron2's PreciseBN reads 200 batches of 32.")
    deterministic: Flag = Field(
        default=False, description="Bit-reproducible on CUDA: torch's deterministic algorithms, cuDNN autotuning off "
        "(on otherwise: it times convolution algorithms once per shape and keeps the fastest). Slower.")

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
    teacher: TeacherSpec | None = Field(
        default=None, description="Teacher network (None: supervised training of the student alone)."
    )
    student: ModelSpec = Field(description="Student network.")
    data: DataSpec = Field(default_factory=DataSpec, description="Dataset and batching.")
    decompose: DecomposeSpec = Field(default_factory=DecomposeSpec, description="Block decomposition.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Method and training stages.")
    loss: LossSpec = Field(default_factory=LossSpec, description="Loss terms.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and LR schedule.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Device, precision, logging.")
    denoise: DenoiseSpec | None = Field(default=None, description="The denoising task (DDPM: ε- or v-prediction; "
                                        "None: classification or per-pixel classes, as the data say).")
    task: str | None = Field(default=None, description="The task (kdgraph.registry.TASKS: classification, dense, "
                             "denoise, or one registered): what a batch is, the head's loss, the metrics, the "
                             "evaluation and the export layout. None: denoise with a denoise block, else dense where "
                             "the student predicts per-pixel logits, else classification (`kdgraph plan` shows it).")
    output: UserPath | None = Field(default=None, description="Output directory (None: runs/<name>).")

    _source_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _supervised_without_teacher(cls, data: Any) -> Any:
        """No teacher and no explicit method: the method is the one that needs no teacher (supervised)."""
        if not isinstance(data, dict) or data.get("teacher") is not None:
            return data
        teacherless = {"method": _method_names(lambda m: not m.teacher)[0]}
        schedule = data.get("schedule")
        if schedule is None:
            return {**data, "schedule": teacherless}
        if isinstance(schedule, dict) and "method" not in schedule:
            return {**data, "schedule": {**schedule, **teacherless}}
        if isinstance(schedule, ScheduleSpec) and "method" not in schedule.model_fields_set:
            return {**data, "schedule": schedule.model_copy(update=teacherless)}
        return data

    @field_validator("output")
    @classmethod
    def _output_of_its_own(cls, output: Path | None) -> Path | None:
        """A run writes (and --force deletes) files by name in its output folder: it must be a
        folder of the run's own, not the filesystem root, the home folder or the working
        directory (``output: ""`` is the working directory)."""
        if output is None:
            return output
        allowed = "a folder of the run's own, e.g. runs/NAME (the default, with output: null)"
        try:
            where = output.resolve()
            roots = {Path(where.anchor): "the filesystem root", Path.home().resolve(): "your home folder",
                     Path.cwd().resolve(): "the working directory"}
        except (OSError, RuntimeError) as exc:
            raise _invalid(f"cannot resolve {str(output)!r}: {exc}", allowed=allowed) from None
        if str(output) in ("", ".") or where in roots:
            what = roots.get(where, "the working directory")
            raise _invalid(f"this is {what}, where a run would write and replace files by name",
                           allowed=allowed)
        return output

    @model_validator(mode="after")
    def _code_only_from_the_spec_file(self, info: ValidationInfo) -> Spec:
        """A ``module:`` reference imports and calls Python code. Validated with a context
        ``{"code_from_file": {role: reference}}`` (``load_spec`` without allow_code), a model
        may name one only where the spec file itself names the same one; every other source
        of values (--set, a run's stored overrides) is refused here, after parsing and
        coercion, whatever YAML form the value had."""
        from_file = (info.context or {}).get("code_from_file")
        if from_file is None:
            return self
        for role in ("teacher", "student"):
            model = getattr(self, role)
            if model is not None and model.model.startswith("module:") and model.model != from_file.get(role):
                raise _invalid(f"{model.model!r} does not come from the spec file: a module: reference imports "
                               "and calls Python code, so only the spec file may name one; put it in the spec "
                               "file, or pass --allow-code (allow_code=True) to let --set introduce it",
                               allowed="timm:NAME, torchvision:NAME, or the spec file's own module: reference",
                               at=f"{role}.model", got=model.model)
        return self

    @model_validator(mode="after")
    def _sharded_teacher_runs_forward_only(self) -> Spec:
        """A sharded teacher gathers each module's parameters as it runs, outside any compiled
        graph, and only forward: TPP's backward through teacher blocks would gather them again,
        and torch.compile would trace FSDP's hooks."""
        if self.teacher is None or not self.teacher.shard:
            return self
        for at, value, why in (("runtime.compile", self.runtime.compile, "torch.compile would trace FSDP's "
                                "gathers of the teacher's parameters"),
                               ("loss.tpp", self.loss.tpp, "TPP backpropagates through teacher blocks, whose "
                                "sharded parameters run forward only")):
            if value:
                raise _invalid(f"teacher.shard: true cannot run with {at}: true: {why}",
                               allowed="false with teacher.shard: true (or teacher.shard: false)", at=at, got=True)
        return self

    @model_validator(mode="after")
    def _sharded_student_runs_eager(self) -> Spec:
        """A sharded student gathers each layer's parameters in its forward hooks, which
        torch.compile would trace; its traced block segments (decompose.blocks > 1) call none."""
        rt = self.runtime
        if not rt.shard_student:
            if rt.shard_dtype != "float32":
                raise _invalid("runtime.shard_dtype is FSDP2's policy of a sharded student: set runtime.shard_student: "
                               "true, or leave it float32", allowed="float32", at="runtime.shard_dtype", got=rt.shard_dtype)
            return self
        if rt.compile:
            raise _invalid("runtime.shard_student: true cannot run with runtime.compile: true: torch.compile would "
                           "trace FSDP's gathers of the student's layers", allowed="false", at="runtime.compile", got=True)
        return self

    @model_validator(mode="after")
    def _micro_batches_fit_the_batch(self) -> Spec:
        if self.runtime.micro_batches > self.data.batch_size:
            raise _invalid(f"{self.runtime.micro_batches} micro-batches of a batch of {self.data.batch_size} "
                           "leave empty parts", allowed=f"1..{self.data.batch_size} (data.batch_size)",
                           at="runtime.micro_batches", got=self.runtime.micro_batches)
        return self

    @model_validator(mode="after")
    def _teacher_given_when_needed(self) -> Spec:
        method = METHODS.get(self.schedule.method)
        if self.teacher is None and method.teacher:
            raise _invalid(
                f"method {method.name!r} needs a teacher; add teacher: {{model: ...}} or set schedule.method: "
                + " or ".join(_method_names(lambda m: not m.teacher)),
                allowed="a {model, kwargs, pretrained, checkpoint} mapping",
                at="teacher",
                got=None,
            )
        return self

    @model_validator(mode="after")
    def _no_teacher_when_unused(self) -> Spec:
        method = METHODS.get(self.schedule.method)
        if self.teacher is not None and not method.teacher:
            raise _invalid(
                f"{method.name} trains without a teacher; remove teacher or choose a distillation method",
                allowed=", ".join(_method_names(lambda m: m.teacher)),
                at="schedule.method",
                got=method.name,
            )
        return self

    @model_validator(mode="after")
    def _recompositions_fit_blocks(self) -> Spec:
        method = METHODS.get(self.schedule.method)
        limit = max_recompositions(self.decompose.blocks)
        if method.decomposes and self.schedule.recompositions > limit:
            raise _invalid(
                f"{self.decompose.blocks} blocks allow at most {limit} recompositions "
                f"(each merges neighbouring block pairs)",
                allowed=f"0..{limit}",
                at="schedule.recompositions",
                got=self.schedule.recompositions,
            )
        return self

    @property
    def lifts_into_teacher_width(self) -> bool:
        """TPP or ScaleKD's CAP projector: a student feature must be lifted into the teacher's
        width, which projected blocks (meeting in the student's space) do not have."""
        return self.loss.tpp or self.decompose.projector == "cap"

    @model_validator(mode="after")
    def _projected_needs_linear_lift(self) -> Spec:
        """Projected blocks meet in the student's space: nothing lifts a student feature into the
        teacher's, which ScaleKD's CAP and TPP need."""
        if self.decompose.adapters == "projected" and self.lifts_into_teacher_width:
            at = "loss.tpp" if self.loss.tpp else "decompose.projector"
            raise _invalid("decompose.adapters: projected has no lift into the teacher's width, which "
                           f"{'TPP' if self.loss.tpp else 'the cap projector'} needs",
                           allowed="decompose.adapters: in_path", at=at,
                           got=True if self.loss.tpp else "cap")
        return self

    @model_validator(mode="after")
    def _tpp_needs_teacher(self) -> Spec:
        method = METHODS.get(self.schedule.method)
        if self.loss.tpp and not method.teacher:
            raise _invalid("teacher parameter perception needs a teacher", allowed="false without a teacher",
                           at="loss.tpp", got=True)
        return self

    @model_validator(mode="after")
    def _tpp_block_before_head(self) -> Spec:
        if self.loss.tpp_block is not None and self.loss.tpp_block >= self.decompose.blocks:
            raise _invalid(f"the proxy path leaves the student at a block end before the head "
                           f"(1..{self.decompose.blocks - 1})", allowed=f"1..{self.decompose.blocks - 1} or null",
                           at="loss.tpp_block", got=self.loss.tpp_block)
        return self

    @model_validator(mode="after")
    def _tpp_needs_block_end(self) -> Spec:
        if self.loss.tpp and self.decompose.blocks < 2:
            raise _invalid("teacher parameter perception needs at least one block end: decompose.blocks >= 2",
                           allowed="false with decompose.blocks: 1", at="loss.tpp", got=True)
        return self

    @model_validator(mode="after")
    def _logit_loss_needs_teacher(self) -> Spec:
        """Without a teacher the head loss is cross-entropy alone: a logit loss, standardisation
        or another CE weight would be ignored (and CE weight 0 would train nothing)."""
        if METHODS.get(self.schedule.method).teacher:
            return self
        for key, default in (("logit", "kl"), ("standardize", False), ("ce_weight", 1.0)):
            if getattr(self.loss, key) != default:
                raise _invalid(f"{key} shapes the loss against a teacher's logits; "
                               f"{self.schedule.method} trains with cross-entropy alone",
                               allowed=f"{default if not isinstance(default, bool) else 'false'} without a teacher",
                               at=f"loss.{key}", got=getattr(self.loss, key))
        return self

    @model_validator(mode="after")
    def _pairs_need_teacher(self) -> Spec:
        if self.loss.pairs and not METHODS.get(self.schedule.method).teacher:
            raise _invalid(f"a layer pair compares with a teacher's features; {self.schedule.method} has no teacher",
                           allowed="[] without a teacher", at="loss.pairs",
                           got=[p.model_dump() for p in self.loss.pairs])
        return self

    @model_validator(mode="after")
    def _some_loss_term_weighs(self) -> Spec:
        """Every weight of the terms the method trains with at 0: a zero loss, trained to chance, exit 0."""
        method, loss = METHODS.get(self.schedule.method), self.loss
        if self.denoise is not None:
            head = ("task_weight",) + (("output_weight",) if method.teacher else ())
        else:
            own = LOGIT_LOSSES.get(loss.logit).own if method.teacher else ()
            head = ("ce_weight", *(k for k in own if not k.endswith("_epochs")))
        others = ((["feature_weight"] if method.feature_losses else []) + (["tpp_weight"] if loss.tpp else [])
                  + [f"pairs.{i}.weight" for i in range(len(loss.pairs))])
        level_weights = list(loss.feature_weights) if loss.feature_weights is not None else [loss.feature_weight]
        weights = [getattr(loss, k) for k in head] + level_weights * method.feature_losses \
            + [loss.tpp_weight] * loss.tpp + [p.weight for p in loss.pairs]
        if any(w > 0 for w in weights):
            return self
        raise _invalid("every loss term of this run has weight 0, so it would train on a zero loss",
                       allowed="a positive weight for one of " + ", ".join(f"loss.{k}" for k in (*head, *others)),
                       at=f"loss.{head[0]}", got=0.0)

    @model_validator(mode="after")
    def _cache_where_a_stage_replays_it(self) -> Spec:
        """Layer pairs and kd+mse's feature losses read the teacher's features in every stage; a
        cache holds its logits only, so no stage would replay it and the teacher would run live."""
        if self.teacher is None or self.teacher.cache is None:
            return self
        reader = "loss.pairs" if self.loss.pairs else \
            f"schedule.method {self.schedule.method}" if METHODS.get(self.schedule.method).feature_losses else None
        if reader is not None:
            raise _invalid(f"{reader} reads the teacher's features in every stage, and a teacher cache holds its "
                           "logits only: no stage would replay it, the teacher would run live",
                           allowed=f"null with {reader}", at="teacher.cache", got=str(self.teacher.cache))
        return self

    @model_validator(mode="after")
    def _projected_where_features_are_compared(self) -> Spec:
        method = METHODS.get(self.schedule.method)
        if self.decompose.adapters == "projected" and not (method.decomposes or method.feature_losses or self.loss.tpp):
            raise _invalid(f"schedule.method {method.name} compares no block features, so no loss would use the "
                           "projections (their PCA would still be fitted)",
                           allowed=f"auto or in_path with {method.name}",
                           at="decompose.adapters", got="projected")
        return self

    @model_validator(mode="after")
    def _hard_labels_without_mixup(self) -> Spec:
        logit = LOGIT_LOSSES.get(self.loss.logit)
        if self.data.mixup is not None and logit.hard_labels and self.teacher is not None:
            raise _invalid(f"loss.logit {logit.name} needs each sample's class, and mixup gives mixed soft labels",
                           allowed=f"null with loss.logit {logit.name}", at="data.mixup",
                           got=self.data.mixup.model_dump())
        return self

    @model_validator(mode="after")
    def _batch_relations_in_one_batch(self) -> Spec:
        logit = LOGIT_LOSSES.get(self.loss.logit)
        if logit.batch_relations and self.teacher is not None and self.runtime.micro_batches > 1:
            raise _invalid(f"loss.logit {logit.name} relates the samples of a batch; micro-batches would each "
                           "be a batch of their own", allowed=f"1 with loss.logit {logit.name}",
                           at="runtime.micro_batches", got=self.runtime.micro_batches)
        return self

    @model_validator(mode="after")
    def _from_teacher_is_the_students(self) -> Spec:
        if self.teacher is not None and self.teacher.from_teacher:
            raise _invalid("the teacher starts from its own weights", allowed="false", at="teacher.from_teacher",
                           got=True)
        s = self.student
        if s.from_teacher and self.teacher is None:
            raise _invalid("there is no teacher to copy weights from", allowed="false without a teacher",
                           at="student.from_teacher", got=True)
        if s.from_teacher and (s.pretrained or s.checkpoint is not None):
            raise _invalid("the student's weights would come from the teacher and from "
                           + ("pretrained: true" if s.pretrained else "student.checkpoint"),
                           allowed="false with pretrained or a checkpoint", at="student.from_teacher", got=True)
        return self

    @model_validator(mode="after")
    def _from_teacher_layers_is_the_students(self) -> Spec:
        at, s = "student.from_teacher_layers", self.student
        if self.teacher is not None and self.teacher.from_teacher_layers is not None:
            raise _invalid("the teacher starts from its own weights", allowed="null",
                           at="teacher.from_teacher_layers", got=_shown(self.teacher.from_teacher_layers))
        if s.from_teacher_layers is None:
            return self
        if self.teacher is None:
            raise _invalid("there is no teacher to copy layers from", allowed="null without a teacher", at=at,
                           got=_shown(s.from_teacher_layers))
        if s.from_teacher or s.pretrained or s.checkpoint is not None:
            other = ("from_teacher: true" if s.from_teacher else "pretrained: true" if s.pretrained
                     else "student.checkpoint")
            raise _invalid(f"the student's weights would come from the teacher's layers and from {other}",
                           allowed="null with from_teacher, pretrained or a checkpoint", at=at,
                           got=_shown(s.from_teacher_layers))
        if self.teacher.cache is not None:
            raise _invalid("the student copies the teacher's layers when it is built, and a teacher cache replays "
                           "the teacher without building its weights", allowed="null with teacher.cache", at=at,
                           got=_shown(s.from_teacher_layers))
        models = (self.teacher.model, s.model)
        if not all(m.startswith("transformers:") for m in models):
            raise _invalid(f"copying decoder layers needs transformers: models (teacher {models[0]}, student "
                           f"{models[1]}); student.from_teacher: true copies tensors by name and shape",
                           allowed="null for other sources", at=at, got=_shown(s.from_teacher_layers))
        return self

    @model_validator(mode="after")
    def _denoise_without_teacher_cache(self) -> Spec:
        if self.denoise is not None and self.teacher is not None and self.teacher.cache is not None:
            raise _invalid("a teacher cache replays the teacher's outputs on the data's views; a denoiser's teacher "
                           "sees noisy images drawn anew every step", allowed="null with denoise",
                           at="teacher.cache", got=str(self.teacher.cache))
        return self

    @model_validator(mode="after")
    def _task_registered_and_consistent(self) -> Spec:
        if self.task is not None and self.task not in TASKS:
            raise _invalid("no task of that name is registered", allowed=", ".join(TASKS), at="task", got=self.task)
        if (self.task == "denoise") != (self.denoise is not None) and (self.task is not None or self.denoise is None):
            raise _invalid("the denoise task and the denoise block go together", allowed="denoise with a denoise "
                           "block, another task without one", at="task", got=self.task)
        return self

    @model_validator(mode="after")
    def _denoise_without_mixup(self) -> Spec:
        if self.denoise is not None and self.data.mixup is not None:
            raise _invalid("a denoiser is trained on noisy images of one sample each; mixup mixes class labels",
                           allowed="null with denoise", at="data.mixup", got=self.data.mixup.model_dump())
        return self

    @model_validator(mode="after")
    def _stage_epochs_one_per_stage(self) -> Spec:
        method = METHODS.get(self.schedule.method)
        stage_epochs, stages = self.schedule.stage_epochs, method.stages(self.schedule.recompositions)
        if stage_epochs is not None and len(stage_epochs) != stages:
            why = (f"{method.name} with {self.schedule.recompositions} recompositions" if method.decomposes
                   else method.name)
            raise _invalid(
                f"{why} has {stages} training stage(s), {len(stage_epochs)} stage_epochs given",
                allowed=f"a list of {stages} positive integers",
                at="schedule.stage_epochs",
                got=stage_epochs,
            )
        return self

    @model_validator(mode="after")
    def _stage_epochs_sum_to_epochs(self) -> Spec:
        stage_epochs = self.schedule.stage_epochs
        if stage_epochs is not None and sum(stage_epochs) != self.schedule.epochs:
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

    def located_at(self, directory: Path | None) -> Spec:
        """A copy of this spec whose ``source_dir`` is ``directory`` (this one is unchanged)."""
        located = self.model_copy()
        located._source_dir = directory
        return located

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, every default filled in, as JSON-compatible data."""
        return self.model_dump(mode="json")


