"""Dense prediction (semantic segmentation): the library parts of the dense task (issue 41).

- ``losses``: pixel-wise KL, channel-wise distillation (CWD) and the PKD Pearson feature loss,
  registered in ``kdgraph.losses.LOSSES`` (``pixel_kl``, ``cwd``, ``pkd``);
- ``metrics``: a confusion matrix accumulated over batches, mIoU, pixel accuracy, per-class IoU;
- ``data``: VOC- and Cityscapes-layout image + mask folders, joint geometric augmentation, and
  the streamed loaders of ``data.dataset: voc | cityscapes`` (the dense task's ``build_data``);
- ``models``: torchvision's segmentation models as single-output modules the compiler traces;
- ``export``: the student's own state dict with its torchvision constructor recorded.

Every loss and metric honours ``ignore_index`` (255 by default): a pixel labelled with it changes
nothing.
"""

IGNORE_INDEX = 255
"""The label of a pixel that no loss or metric counts (VOC's object borders, Cityscapes' void)."""

LAYOUTS = ("voc", "cityscapes")
"""The ``data.dataset`` values that read an image + mask folder (``kdgraph.segmentation.data``)."""
