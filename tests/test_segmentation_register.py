"""kdgraph.segmentation.register: the dense task's registry entries, each looked up by name and
compared with the function or value it must be (the head entries against the loss block, the
refusal of mask folders as image splits one line)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kdgraph.errors import DataError
from kdgraph.registry import DATA_PLANNERS, DATASET_TASKS, DATASETS, LIBRARY_MODELS, TASK_HEAD_LOSSES, TASK_LOSS_DEFAULTS
from kdgraph.segmentation.data import plan_segmentation
from kdgraph.segmentation.models import SEGMENTATION_MODELS, create_segmentation_model
from kdgraph.segmentation.register import TASK, dense_head


def test_every_torchvision_segmentation_model_and_both_layouts_are_registered():
    assert TASK == "dense"
    for name in SEGMENTATION_MODELS:
        assert LIBRARY_MODELS.get(f"torchvision:{name}") is create_segmentation_model
    for layout in ("voc", "cityscapes"):
        assert DATA_PLANNERS.get(layout) is plan_segmentation
        assert DATASET_TASKS.get(layout) == "dense"
    assert TASK_HEAD_LOSSES.get("dense") is dense_head
    assert TASK_LOSS_DEFAULTS.get("dense") == {"ignore_index": 255}


@pytest.mark.parametrize("layout", ["voc", "cityscapes"])
def test_a_mask_folder_loaded_as_image_splits_is_refused_in_one_line(layout):
    with pytest.raises(DataError, match=f"data.dataset: {layout} labels every pixel; it is read by the dense task, "
                                        r"whose student predicts per-pixel logits \(task: dense\)") as info:
        DATASETS.get(layout)(SimpleNamespace(dataset=layout), 0)
    assert "\n" not in str(info.value)


def test_dense_head_entries_follow_loss_dense_and_loss_logit():
    from kdgraph.segmentation.register import dense_head
    from kdgraph.spec import LossSpec

    def entries(**kw):
        return dense_head(LossSpec(**kw).model_dump())
    assert entries() == ("pixel_kl", "pixel_ce")
    assert entries(dense="cwd") == ("cwd", "pixel_ce")
    assert entries(logit="dkd") == ("dkd", "pixel_ce") and entries(logit="dist") == ("dist", "pixel_ce")
    assert entries(logit="dkd", dense="cwd") == ("cwd", "pixel_ce")
