"""Registries: one per kind of named thing a spec chooses (model sources, datasets, LR
schedules, augmentations, methods). The spec's validation, the plan and the runtime all
read these, so a name registered here is valid everywhere at once.

This module does not import torch, nor any module of kdgraph. Every built-in name is
declared here, so that a torch-free caller such as the spec's validation sees them all;
an entry whose implementation needs torch registers itself against its declared name where
it is implemented (``kdgraph.models``, ``kdgraph.data``, ``kdgraph.schedules``), and only
those modules read such entries. Methods, augmentations and logit losses are plain
descriptions, registered here in full.

A task's own parts that the compiler reads by name (its losses, a library model it wraps, the
datasets it alone reads and their planner, its head loss, its loss defaults) are registries here
too, filled by the task's library module (``kdgraph.segmentation.register`` for the dense task),
so that no shared module tests a task's name to find them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DATASET_TASKS",
    "DATA_PLANNERS",
    "LIBRARY_MODELS",
    "LOGIT_LOSSES",
    "LOSSES",
    "METHODS",
    "MODEL_SOURCES",
    "SCHEDULES",
    "TASKS",
    "TASK_HEAD_LOSSES",
    "TASK_LOSS_DEFAULTS",
    "TOKEN_DIVERGENCES",
    "Augmentation",
    "LogitLoss",
    "Method",
    "Registry",
    "UnknownName",
    "dataset_choices",
    "model_source_choices",
    "register_dataset",
    "register_model_source",
]

T = TypeVar("T")


class UnknownName(LookupError):
    """A name that its registry does not hold."""


class Registry(Generic[T]):
    """Named entries of one ``kind``, in declaration and then registration order.

    ``declared`` names are valid from the start (``names``, ``in``); their entries are
    registered by ``home``, the module that implements them, when it is imported. Reading
    a declared entry before that is an error that names ``home``.
    """

    def __init__(self, kind: str, declared: Iterable[str] = (), home: str | None = None):
        self.kind = kind
        self._home = home
        self._entries: dict[str, T | None] = dict.fromkeys(declared)

    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates.

        A name already registered is an error unless ``overwrite``; a declared name without
        an entry yet takes ``entry`` in its place.
        """
        if entry is None:
            def decorate(fn: T) -> T:
                self.register(name, fn, overwrite=overwrite)
                return fn

            return decorate
        if self._entries.get(name) is not None and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def get(self, name: str) -> T:
        """The entry of ``name``; UnknownName, listing the registered names, if there is none."""
        if name not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}")
        entry = self._entries[name]
        if entry is None:
            raise LookupError(f"{self.kind} {name!r} is declared but not registered yet: {self._home} "
                              "registers it when imported")
        return entry

    def names(self) -> list[str]:
        """The declared and registered names, in that order."""
        return list(self._entries)

    def unregistered(self) -> list[str]:
        """Declared names whose entry is not registered (yet)."""
        return [name for name, entry in self._entries.items() if entry is None]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


# ------------------------------------------------------------------------- model sources

MODEL_SOURCES: Registry[Callable[[str, dict[str, Any]], Any]] = Registry(
    "model source", declared=("timm", "torchvision", "module", "diffusers", "transformers"), home="kdgraph.models")
"""``SOURCE`` of a ``SOURCE:REST`` model reference -> ``factory(REST, kwargs) -> nn.Module``."""


LIBRARY_MODELS: Registry[Callable[[str, dict[str, Any]], Any]] = Registry("library model")
"""``SOURCE:NAME`` of a library model that a task builds itself instead of its source's factory
(a model whose forward returns what the compiler cannot trace whole, wrapped) -> ``factory(NAME,
kwargs) -> nn.Module``; ``kdgraph.models.create_model`` asks it first."""


PRETRAINED_SOURCES: Registry[tuple[Callable[[str], Any], Callable[..., Any]]] = Registry(
    "pretrained model source", declared=("timm", "torchvision", "transformers"), home="kdgraph.models")
"""Sources whose models have pretrained weights -> (classes of the default weights, loader)."""


def register_model_source(name: str, factory: Callable[[str, dict[str, Any]], Any]) -> None:
    """Make ``NAME:REST`` references build with ``factory(REST, kwargs)``, replacing any
    source of that name."""
    if not name.isidentifier():
        raise ValueError(f"model source name must be an identifier, got {name!r}")
    MODEL_SOURCES.register(name, factory, overwrite=True)


def model_source_choices() -> list[str]:
    """The model references a spec may give, one form per source."""
    return ["module:pkg.mod:factory" if name == "module" else f"{name}:NAME" for name in MODEL_SOURCES]


# --------------------------------------------------------------------------------- tasks

TASKS: Registry[Any] = Registry("task", declared=("classification", "dense", "denoise", "causal_lm"),
                               home="kdgraph.tasks")
"""``spec.task`` -> the task class (``kdgraph.tasks.Task``): what a batch is, the head's loss
entry, the metrics and which way "best" points, the evaluation, reports and export layout.
Inferred where the spec leaves it out: ``denoise`` with a denoise block, ``causal_lm`` with
``data.dataset: text``, else ``dense`` where the student predicts per-pixel logits, else
``classification``."""

TASK_HEAD_LOSSES: Registry[Any] = Registry("task head loss")
"""A task whose head loss is its own -> its ``kdgraph.losses.LOSSES`` head entries (with a
teacher, without one), or a function of the spec's ``loss`` block giving them; a task not here
has the spec's ``loss.logit`` (cross-entropy alone without a teacher). ``kdgraph.tasks.register_task``
fills it from the task's ``head_loss``."""
TASK_HEAD_LOSSES.register("denoise", ("denoise", "ddpm"))


def causal_lm_head(loss: Any) -> tuple[str, str]:
    """A causal LM's head entries: ``loss.token``'s divergence with a teacher, token CE without."""
    return (loss["token"], "token_ce")


TASK_HEAD_LOSSES.register("causal_lm", causal_lm_head)

TOKEN_DIVERGENCES: Registry[Callable[..., Any]] = Registry(
    "token divergence", declared=("forward_kl", "reverse_kl", "skew_kl", "jsd"), home="kdgraph.lm.token_losses")
"""``loss.token`` -> per-token divergence(log q, log p, coefficient) of (N, V) log-probabilities ->
(N,); each is also the name of its ``kdgraph.losses.LOSSES`` head entry (a test keeps them equal)."""


TASK_LOSS_DEFAULTS: Registry[dict[str, Any]] = Registry("task loss defaults")
"""A task -> the values its ``loss`` fields left None take (``compiler.blockgraph.resolved_loss``);
a field no task fills keeps the spec's meaning of None (``ignore_index``: -100)."""


# ------------------------------------------------------------------------------ datasets

DATASETS: Registry[Callable[[Any, int], Any]] = Registry(
    "dataset", declared=("digits", "fashion-mnist", "imagefolder", "synthetic", "torchvision", "fashion-mnist-masks",
                         "fashion-mnist-seg", "text", "voc", "cityscapes"), home="kdgraph.data")
"""The part of ``data.dataset`` before any colon -> ``loader(data_spec, seed) -> RawSplits``."""


DATA_PLANNERS: Registry[Callable[..., Any]] = Registry("data planner")
"""A dataset whose loader its own module plans (an image + mask folder, listed and checked at plan
time, always streamed) -> ``planner(data_spec, input_size, normalisation, missing_ok) -> DataPlan``
(``compiler.data.plan_data`` asks it before its own choices)."""

DATASET_TASKS: Registry[str] = Registry("dataset task")
"""A dataset that one task alone reads -> that task (``compiler.blockgraph.task_of`` refuses, at plan
time, a run the student makes another task's)."""


def register_dataset(name: str, fn: Callable[[Any, int], Any], *, overwrite: bool = False) -> None:
    """Add a loader under ``name`` (the part of ``data.dataset`` before any colon)."""
    DATASETS.register(name, fn, overwrite=overwrite)


def dataset_choices() -> list[str]:
    """The values of ``data.dataset`` as shown to users: torchvision takes a class name after a colon."""
    return [f"{name}:NAME" if name == "torchvision" else name for name in DATASETS]


# ------------------------------------------------------------------------- LR schedules

SCHEDULES: Registry[Callable[[Any, int], float]] = Registry(
    "lr schedule", declared=("stage_cyclic", "onecycle", "cosine", "constant"), home="kdgraph.schedules")
"""``optim.lr_schedule`` -> ``lr(schedule: LRSchedule, step) -> float``."""


# ------------------------------------------------------------------------- augmentations


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation (``data.augment``; its ``auto`` is each dataset's usual one)."""

    name: str
    crop: bool  # a random crop: in memory padded by H // 8, streamed timm's random-resized crop
    flip: bool  # a horizontal flip of half the samples
    summary: str


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")
for _augmentation in (
    Augmentation("none", crop=False, flip=False, summary="no augmentation"),
    Augmentation("crop", crop=True, flip=False, summary="a random crop"),
    Augmentation("crop+flip", crop=True, flip=True, summary="a random crop and a horizontal flip of half the samples"),
):
    AUGMENTATIONS.register(_augmentation.name, _augmentation)
del _augmentation


# ------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A training method (``schedule.method``) and what it asks of the compiler."""

    name: str
    teacher: bool  # needs a teacher (False only for supervised)
    decomposes: bool  # True only for stablekd: groups come from decomposition + recompositions
    feature_losses: bool  # True only for kd+mse: an MSE at every inner block end of one end-to-end group
    summary: str  # one line for help/errors

    def stages(self, recompositions: int) -> int:
        """Training stages of a schedule with ``recompositions`` (``schedule.recompositions``):
        one more than that where the method decomposes, one otherwise. Spec validation and the
        plan both count them here."""
        return recompositions + 1 if self.decomposes else 1


METHODS: Registry[Method] = Registry("method")
for _method in (
    Method("stablekd", teacher=True, decomposes=True, feature_losses=False,
           summary="decompose into blocks trained on teacher features, then recompose"),
    Method("kd", teacher=True, decomposes=False, feature_losses=False, summary="logits only"),
    Method("kd+mse", teacher=True, decomposes=False, feature_losses=True, summary="logits and block features"),
    Method("supervised", teacher=False, decomposes=False, feature_losses=False, summary="labels only, no teacher"),
):
    METHODS.register(_method.name, _method)
del _method


# -------------------------------------------------------------------------------- losses

LOSSES: Registry[Any] = Registry("loss")
"""Loss name (a loss op's ``entry``) -> its ``nn.Module`` class (the contract: ``kdgraph.losses``,
which registers the built-in entries and re-exports this registry; a task's own losses register
themselves where they are defined)."""


# --------------------------------------------------------------------------- logit losses


@dataclass(frozen=True)
class LogitLoss:
    """A logit loss of the head block with a teacher (``loss.logit``), described without torch:
    what the spec validates and the compiler chooses by. Its module is the ``head`` entry
    ``entry`` of ``kdgraph.losses.LOSSES``, whose ``summary`` is this one and whose params read
    ``own`` besides the fields every logit loss shares (``ce_weight``, ``label_smoothing``,
    ``temperature``, ``standardize``); a test keeps the two equal."""

    name: str
    entry: str  # its kdgraph.losses.LOSSES entry (role head)
    own: tuple[str, ...]  # loss.* fields only this logit loss reads (set with another: refused)
    hard_labels: bool  # needs class indices, not mixed soft targets (refused with data.mixup)
    batch_relations: bool  # relates the samples of a batch (refused with runtime.micro_batches > 1)
    summary: str  # one line: the spec's description, the plan, errors


LOGIT_LOSSES: Registry[LogitLoss] = Registry("logit loss")
for _logit in (
    LogitLoss("kl", entry="kd", own=("kl_weight",), hard_labels=False, batch_relations=False,
              summary="cross-entropy with the labels plus weighted KL to the teacher's logits (Hinton et al.)"),
    LogitLoss("dkd", entry="dkd", own=("dkd_alpha", "dkd_beta", "dkd_warmup_epochs"), hard_labels=True,
              batch_relations=False,
              summary="cross-entropy plus decoupled KD: target-class and non-target-class KL weighted apart "
                      "(Zhao et al. 2022)"),
    LogitLoss("dist", entry="dist", own=("dist_beta", "dist_gamma"), hard_labels=False, batch_relations=True,
              summary="cross-entropy plus DIST: inter- and intra-class Pearson correlation of the "
                      "probabilities (Huang et al. 2022)"),
):
    LOGIT_LOSSES.register(_logit.name, _logit)
del _logit
