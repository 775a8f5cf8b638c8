"""Small models defined by the project, for the quickstart on 8x8 digits and for tests.

Referenced from a spec as ``module:kdgraph.zoo:<factory>``. Module names follow timm's
ResNet (``conv1``/``bn1``/``act1``, ``layer1``..``layer3``, ``global_pool``, ``fc``) so
every stage is one module ``layerN`` and cuts are named the same way as for timm models.
Everything is ``torch.fx.symbolic_trace``-able: no data-dependent Python control flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "ResNetTiny",
    "resnet_tiny",
    "resnet_tiny_teacher",
    "resnet_tiny_student",
    "resnet_tiny_student_same",
    "UNetTiny",
    "unet_tiny",
    "unet_tiny_teacher",
    "unet_tiny_student",
]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + BN downsample where the shape changes.
    ``drop_path_rate`` > 0 drops the residual branch per sample in training (timm's DropPath)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_path_rate: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        # Decided at construction, so the traced graph has no Python branch on data.
        self.downsample: nn.Module = (
            nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
            if stride != 1 or in_chs != out_chs
            else nn.Identity()
        )
        # Only where asked for, so that the default graph (and its node names) is unchanged.
        self.drop_path: nn.Module | None = None
        if drop_path_rate > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act2(x + shortcut)


class ResNetTiny(nn.Module):
    """A small ResNet: 3x3 stride-1 stem, stages with strides (1, 2, 2, 2, ...), GAP + linear.

    An 8x8 input gives 8x8, 4x4 and 2x2 stage maps (three stages).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        depths: Sequence[int] = (1, 1, 1),
        stem_width: int | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} must be non-empty and of equal length")
        stem_width = stem_width or widths[0]
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        in_chs = stem_width
        self.feature_info: list[dict] = []
        reduction = 1
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1, drop_path_rate)
                      for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": width, "reduction": reduction, "module": f"layer{i + 1}"})
            in_chs = width
        self.num_stages = len(widths)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):  # fixed at construction: unrolled by fx
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.global_pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet_tiny(
    num_classes: int = 10,
    in_chans: int = 1,
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (1, 1, 1),
    stem_width: int | None = None,
    drop_path_rate: float = 0.0,
) -> ResNetTiny:
    return ResNetTiny(num_classes, in_chans, widths, depths, stem_width, drop_path_rate)


def resnet_tiny_teacher(**kw) -> ResNetTiny:
    """Widths (32, 64, 128), two blocks per stage."""
    return resnet_tiny(**{"widths": (32, 64, 128), "depths": (2, 2, 2), **kw})


def resnet_tiny_student(**kw) -> ResNetTiny:
    """Widths (16, 32, 64), one block per stage: needs adapters against the teacher."""
    return resnet_tiny(**{"widths": (16, 32, 64), "depths": (1, 1, 1), **kw})


def resnet_tiny_student_same(**kw) -> ResNetTiny:
    """The teacher's widths, one block per stage: no adapters needed."""
    return resnet_tiny(**{"widths": (32, 64, 128), "depths": (1, 1, 1), **kw})


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BN + ReLU at one resolution (a U-Net level)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True),
            nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True),
        )


class UNetTiny(nn.Module):
    """A small U-Net for dense prediction: ``len(widths) - 1`` encoder levels, each halving
    the grid, a bottleneck at the deepest width, and a decoder that upsamples (2x2
    transposed conv) and concatenates the encoder feature of the same grid (a long skip).
    The head is a 1x1 conv to ``num_classes`` per-pixel logits of the input's size.

    widths (16, 32, 64) on a 28x28 input: enc1 16@28, enc2 32@14, bottleneck 64@7, then
    dec2 32@14 (after concatenating enc2), dec1 16@28 (after enc1), head C@28.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
                 drop_rate: float = 0.0):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"a U-Net needs at least two widths, got {tuple(widths)}")
        self.num_classes = num_classes
        self.levels = len(widths) - 1
        in_chs = in_chans
        for i, w in enumerate(widths[:-1]):
            self.add_module(f"enc{i + 1}", ConvBlock(in_chs, w))
            self.add_module(f"pool{i + 1}", nn.MaxPool2d(2))
            in_chs = w
        self.bottleneck = ConvBlock(in_chs, widths[-1])
        # Only where asked for, so that the default graph (and its node names) is unchanged.
        self.drop: nn.Module | None = nn.Dropout2d(drop_rate) if drop_rate > 0 else None
        for i in reversed(range(self.levels)):
            w, deeper = widths[i], widths[i + 1]
            self.add_module(f"up{i + 1}", nn.ConvTranspose2d(deeper, w, 2, stride=2))
            self.add_module(f"dec{i + 1}", ConvBlock(2 * w, w))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(self.levels):  # fixed at construction: unrolled by fx
            x = getattr(self, f"enc{i + 1}")(x)
            skips.append(x)
            x = getattr(self, f"pool{i + 1}")(x)
        x = self.bottleneck(x)
        if self.drop is not None:
            x = self.drop(x)
        for i in reversed(range(self.levels)):
            x = getattr(self, f"up{i + 1}")(x)
            x = getattr(self, f"dec{i + 1}")(torch.cat([skips[i], x], dim=1))
        return self.head(x)


def unet_tiny(num_classes: int = 2, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
              drop_rate: float = 0.0) -> UNetTiny:
    return UNetTiny(num_classes, in_chans, widths, drop_rate)


def unet_tiny_teacher(**kw) -> UNetTiny:
    """Widths (16, 32, 64): two encoder levels with long skips and a 64-wide bottleneck."""
    return unet_tiny(**{"widths": (16, 32, 64), **kw})


def unet_tiny_student(**kw) -> UNetTiny:
    """Widths (8, 16, 32), the teacher's topology at half width: adapters at every cut."""
    return unet_tiny(**{"widths": (8, 16, 32), **kw})
