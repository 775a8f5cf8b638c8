"""torchvision's segmentation models (FCN, DeepLabv3, LRASPP) as models the compiler traces.

torchvision's ``forward`` returns an ``OrderedDict``: ``out``, the logits upsampled to the input's
size, and with ``aux_loss=True`` (FCN, DeepLabv3) ``aux``, an auxiliary head's. A forward of the
compiler returns tensors, so ``SegmentationModel.forward`` returns ``out`` alone, or the tuple
``(out, aux)`` where the model has an auxiliary head (``aux_loss: true``): its ``heads`` attribute
names them, and the plan shows each as a head; both at the head's own output stride (8 for the ResNets, 16 for
MobileNetV3's DeepLabv3, 8 for LRASPP's ``out``): the last bilinear upsampling to the input's size
is left to the losses and metrics (``kdgraph.segmentation.losses.resize_to``, bilinear,
``align_corners=False``, as torchvision's own forward does it). torchvision's forward reads the
input's size at its very end, so no feature map would be the only live tensor anywhere between
(no cut); without it the backbone's stages are cuts. The wrapped model is ``net`` (its state dict is
torchvision's under ``net.``), built with random weights: ``weights=None`` and
``weights_backbone=None`` (torchvision's own default downloads an ImageNet backbone).

``torchvision:NAME`` builds one of ``SEGMENTATION_MODELS`` as a ``SegmentationModel``; the
``constructor`` it records (name and kwargs) is what ``kdgraph.segmentation.export`` writes beside
the student's own state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdgraph.errors import ModelError

__all__ = ["SEGMENTATION_MODELS", "SegmentationModel", "TimmSegmentation", "create_segmentation_model",
           "is_segmentation_model", "timm_segmentation"]

SEGMENTATION_MODELS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                       "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
HEADS_KWARG = "heads"


def is_segmentation_model(name: str) -> bool:
    """True for a torchvision model name whose forward returns the segmentation dict."""
    return name in SEGMENTATION_MODELS


class SegmentationModel(nn.Module):
    """``forward(x) -> out`` (B, C, H, W), or ``(out, aux)`` with ``heads=("out", "aux")``.
    ``net`` is the torchvision model; ``constructor`` its ``(name, kwargs)``."""

    def __init__(self, net: nn.Module, name: str, kwargs: dict[str, Any], heads: tuple[str, ...] = ("out",)):
        super().__init__()
        has_aux = getattr(net, "aux_classifier", None) is not None
        if heads not in (("out",), ("out", "aux")):
            raise ModelError(f"torchvision:{name}: heads must be [out] or [out, aux], got {list(heads)}")
        if "aux" in heads and not has_aux:
            raise ModelError(f"torchvision:{name}: heads [out, aux] needs aux_loss: true (an auxiliary head)")
        self.net = net
        self.heads = heads
        self.constructor = (name, dict(kwargs))

    @property
    def num_classes(self) -> int:
        """Channels of ``out`` (the logits' width)."""
        return int(next(m for m in reversed(list(self.net.modules())) if isinstance(m, nn.Conv2d)).out_channels)

    def forward(self, x: torch.Tensor):
        features = self.net.backbone(x)
        if self.net.__class__.__name__ == "LRASPP":  # its head reads the "low" and "high" features
            return self.net.classifier(features)
        out = self.net.classifier(features["out"])
        if self.heads == ("out",):
            return out
        return out, self.net.aux_classifier(features["aux"])


def create_segmentation_model(name: str, kwargs: dict[str, Any], heads: tuple[str, ...] | None = None) -> SegmentationModel:
    """``torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)`` wrapped,
    returning ``heads`` (None: ``out`` and, where the model has one (``aux_loss: true``), ``aux``).
    torchvision's own switch, ``aux_loss``, says it: a ``heads`` kwarg is refused."""
    import torchvision

    if not is_segmentation_model(name):
        raise ModelError(f"torchvision:{name} is not a segmentation model; these are: {', '.join(SEGMENTATION_MODELS)}")
    if HEADS_KWARG in kwargs:
        raise ModelError(f"torchvision:{name}: kwargs.heads is not a torchvision argument; the heads are 'out' "
                         "and, with aux_loss: true, 'aux'")
    kwargs = dict(kwargs)
    kwargs.setdefault("weights_backbone", None)
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    if heads is None:
        heads = ("out", "aux") if getattr(net, "aux_classifier", None) is not None else ("out",)
    return SegmentationModel(net, name, kwargs, heads)


class TimmSegmentation(nn.Module):
    """A timm backbone with LRASPP's head (Howard et al. 2019, as torchvision builds it): the
    backbone's ``features_only`` maps at stride 8 (``low``) and at its deepest stride (``high``);
    ``out = classify_low(low) + classify_high(upsampled(high · gate(high)))`` with
    ``gate = sigmoid(1x1 conv(global average of high))``, at stride 8. Random weights
    (``pretrained=False``); ``forward(x) -> out`` (B, num_classes, H/8, W/8), upsampled to the
    labels' grid by the losses and metrics as torchvision's models are. ``heads``: ("out",)."""

    heads = ("out",)

    def __init__(self, backbone: str, num_classes: int, in_chans: int = 3, channels: int = 128,
                 low_stride: int = 8):
        super().__init__()
        import timm

        probe = timm.create_model(backbone, pretrained=False, features_only=True, in_chans=in_chans)
        reductions = probe.feature_info.reduction()
        if low_stride not in reductions:
            raise ModelError(f"timm:{backbone} has no feature map at stride {low_stride} (its strides: {reductions})")
        low, high = reductions.index(low_stride), len(reductions) - 1
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, in_chans=in_chans,
                                          out_indices=(low, high))
        low_ch, high_ch = self.backbone.feature_info.channels()
        self.cbr = nn.Sequential(nn.Conv2d(high_ch, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                 nn.ReLU(inplace=True))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_ch, channels, 1, bias=False), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_ch, num_classes, 1)
        self.high_classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = int(num_classes)
        self.constructor = ("timm_segmentation", {"backbone": backbone, "num_classes": num_classes,
                                                  "in_chans": in_chans, "channels": channels, "low_stride": low_stride})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        y = self.cbr(high) * self.scale(high)
        y = nn.functional.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(y)


def timm_segmentation(backbone: str = "resnet18", num_classes: int = 21, **kwargs: Any) -> TimmSegmentation:
    """``TimmSegmentation`` for a spec's ``module:kdgraph.segmentation.models:timm_segmentation``
    (kwargs ``backbone``, ``num_classes``, ``in_chans``, ``channels``, ``low_stride``)."""
    return TimmSegmentation(backbone, num_classes, **kwargs)
