"""A user's own model, built by a spec through ``student: {model: "module:custom_models:tiny_convnet"}``.

kdgraph puts the spec file's directory first on sys.path, so this file only has
to sit next to the spec. Any function returning an nn.Module works; keep its
forward free of data-dependent Python control flow so torch.fx can trace it.
"""

from __future__ import annotations

from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyConvNet(nn.Module):
    """Stem and three stages (width, 2*width, 4*width; the last two halve the resolution), then the head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        self.stem = _conv_bn_relu(in_chans, width, 1)
        self.stages = nn.Sequential(
            _conv_bn_relu(width, width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_convnet(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> nn.Module:
    """A small conv net for 8x8 to 32x32 inputs."""
    return TinyConvNet(num_classes=num_classes, in_chans=in_chans, width=width)
