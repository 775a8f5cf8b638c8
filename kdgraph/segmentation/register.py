"""The dense task's entries in the shared registries (``kdgraph.registry``), in one place.

``kdgraph.models``, the first library module every compile imports, imports this module, so the
compiler finds every entry below by name and no shared module names the dense task's parts:

- ``LOSSES``: ``pixel_ce``, ``pixel_kl``, ``cwd``, ``pkd`` (registered where they are defined,
  ``kdgraph.segmentation.losses``, imported here);
- ``LIBRARY_MODELS``: ``torchvision:NAME`` of torchvision's segmentation models
  (``SEGMENTATION_MODELS``) -> ``create_segmentation_model`` (the dict output wrapped, no backbone
  download);
- ``DATA_PLANNERS``: ``voc``, ``cityscapes`` -> ``plan_segmentation`` (listed and checked at plan
  time, streamed); ``DATASET_TASKS``: both are read by ``dense`` alone; ``DATASETS``: both refuse
  to load as in-memory image splits (the dense task streams them through its ``build_data``);
- ``TASK_HEAD_LOSSES``: ``dense`` -> ``dense_head``; ``TASK_LOSS_DEFAULTS``: ``dense`` ->
  ``ignore_index`` 255.

The task class itself (``kdgraph.tasks.dense.Dense``, runtime layer) is registered in ``TASKS``
by ``kdgraph.tasks.create``.
"""

from __future__ import annotations

from typing import Any

from kdgraph.errors import DataError
from kdgraph.registry import (DATA_PLANNERS, DATASET_TASKS, DATASETS, LIBRARY_MODELS, LOGIT_LOSSES, TASK_HEAD_LOSSES,
                              TASK_LOSS_DEFAULTS)
from kdgraph.segmentation import IGNORE_INDEX, LAYOUTS
from kdgraph.segmentation import losses as _losses  # noqa: F401  (registers pixel_ce, pixel_kl, cwd, pkd)
from kdgraph.segmentation.data import plan_segmentation
from kdgraph.segmentation.models import SEGMENTATION_MODELS, create_segmentation_model

__all__ = ["TASK", "dense_head"]

TASK = "dense"


def dense_head(loss: Any) -> tuple[str, str]:
    """The dense task's head entries: with a teacher ``loss.dense`` (pixel_kl, cwd), except that
    pixel_kl under a ``loss.logit`` other than kl (dkd, dist, ...) is that recipe's head with
    every pixel a sample; without a teacher ``pixel_ce``, the per-pixel cross-entropy
    (ignore_index honoured)."""
    if loss["dense"] == "pixel_kl" and loss["logit"] != "kl":
        return (LOGIT_LOSSES.get(loss["logit"]).entry, "pixel_ce")
    return (loss["dense"], "pixel_ce")


def _refuse_mask_folders(data_spec: Any, seed: int) -> Any:
    """An image + mask folder is streamed by the dense task (``segmentation.data.segmentation_data``),
    never loaded whole as image splits."""
    raise DataError(f"data.dataset: {data_spec.dataset} labels every pixel; it is read by the dense task, whose "
                    "student predicts per-pixel logits (task: dense)")


for _name in SEGMENTATION_MODELS:
    LIBRARY_MODELS.register(f"torchvision:{_name}", create_segmentation_model)
for _layout in LAYOUTS:
    DATA_PLANNERS.register(_layout, plan_segmentation)
    DATASET_TASKS.register(_layout, TASK)
    DATASETS.register(_layout, _refuse_mask_folders)
TASK_HEAD_LOSSES.register(TASK, dense_head)
TASK_LOSS_DEFAULTS.register(TASK, {"ignore_index": IGNORE_INDEX})
