"""Small models defined by the project, for the quickstart on 8x8 digits and for tests.

Referenced from a spec as ``module:kdgraph.zoo:<factory>``. Module names follow timm's
ResNet (``conv1``/``bn1``/``act1``, ``layer1``..``layer3``, ``global_pool``, ``fc``) so
every stage is one module ``layerN`` and cuts are named the same way as for timm models.
Everything is ``torch.fx.symbolic_trace``-able: no data-dependent Python control flow.
"""

from __future__ import annotations

import math
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
    "DiffusionUNet",
    "diffusion_unet",
    "diffusion_unet_teacher",
    "diffusion_unet_half",
    "diffusion_unet_small",
    "diffusion_unet_manyskip",
    "diffusion_unet_manyskip_half",
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
    """A small U-Net for per-pixel prediction: ``len(widths) - 1`` encoder levels, each halving
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


# --- a time-conditioned U-Net for denoising (DDPM's epsilon-prediction) ------------------------

class TimestepEmbedding(nn.Module):
    """DDPM's sinusoidal embedding of the timestep t (B,) followed by a two-layer MLP:
    ``mlp([sin(t f_k), cos(t f_k)])`` with ``f_k = 10000^(-k / (dim/2 - 1))``. The frequencies
    are a non-persistent buffer: the graph reads them, the state dict does not hold them."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([args.sin(), args.cos()], dim=1))


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class TimeResBlock(nn.Module):
    """DDPM's residual block: GroupNorm, SiLU, 3x3 conv; the time embedding projected to the
    block's width and added per channel; GroupNorm, SiLU, 3x3 conv; a 1x1 conv on the shortcut
    where the width changes."""

    def __init__(self, in_chs: int, out_chs: int, temb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_chs), in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_chs)
        self.norm2 = nn.GroupNorm(_groups(out_chs), out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1)
        self.act = nn.SiLU()
        self.skip: nn.Module = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class DiffusionUNet(nn.Module):
    """A small denoising U-Net, ``forward(x, t, y=None)``: the noise predicted in a noisy image
    ``x`` (B, C, H, W) at timestep ``t`` (B,) and, with ``num_classes``, of class ``y`` (B,).

    ``conv_in``; per encoder level i (``len(widths) - 1`` of them) ``depth`` residual blocks
    ``enc{i}`` then a stride-2 conv ``down{i}``; the middle blocks ``mid`` at the deepest
    width; per decoder level a 2x2 transposed conv ``up{i}``, the encoder's feature of the same
    grid concatenated (a long skip) and ``depth`` blocks ``dec{i}``; GroupNorm, SiLU and
    ``conv_out`` back to ``in_chans``. Every residual block adds the time embedding (and the
    class embedding): computed from t and y alone, it reaches every level.

    ``skips="block"`` keeps a skip per encoder block, as diffusers' ``UNet2DModel`` does (every
    resnet's output): each decoder block concatenates one, deepest first, so at the middle
    ``levels * depth`` skips are live (6 at widths (8, 16, 32, 64) and depth 2, more than a cut
    of a per-level U-Net ever carries).

    widths (16, 32, 64) on 16x16: enc1 16@16, enc2 32@8, mid 64@4, dec2 32@8, dec1 16@16.
    """

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64), depth: int = 2,
                 num_classes: int | None = None, temb_dim: int | None = None, skips: str = "level"):
        super().__init__()
        if len(widths) < 2 or depth < 1:
            raise ValueError(f"a U-Net needs at least two widths and depth >= 1, got {tuple(widths)}, {depth}")
        if skips not in ("level", "block"):
            raise ValueError(f"skips is 'level' (one per encoder level) or 'block' (one per encoder block), "
                             f"got {skips!r}")
        self.in_chans, self.num_classes, self.levels = in_chans, num_classes, len(widths) - 1
        self.skip_every_block = skips == "block"
        temb_dim = temb_dim or 4 * widths[0]
        self.time_embed = TimestepEmbedding(widths[0], temb_dim)
        self.class_embed = nn.Embedding(num_classes, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_chans, widths[0], 3, padding=1)
        prev = widths[0]
        for i, w in enumerate(widths[:-1]):
            self.add_module(f"enc{i + 1}", nn.ModuleList(
                [TimeResBlock(prev if j == 0 else w, w, temb_dim) for j in range(depth)]))
            self.add_module(f"down{i + 1}", nn.Conv2d(w, w, 3, stride=2, padding=1))
            prev = w
        self.mid = nn.ModuleList([TimeResBlock(prev if j == 0 else widths[-1], widths[-1], temb_dim)
                                  for j in range(depth)])
        for i in reversed(range(self.levels)):
            w, deeper = widths[i], widths[i + 1]
            self.add_module(f"up{i + 1}", nn.ConvTranspose2d(deeper, w, 2, stride=2))
            self.add_module(f"dec{i + 1}", nn.ModuleList(
                [TimeResBlock(2 * w if j == 0 or self.skip_every_block else w, w, temb_dim)
                 for j in range(depth)]))
        self.norm_out = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], in_chans, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time_embed(t)
        if self.class_embed is not None and y is not None:  # decided while tracing: y is an input or None
            temb = temb + self.class_embed(y)
        h = self.conv_in(x)
        skips = []
        for i in range(self.levels):  # fixed at construction: unrolled by fx
            for block in getattr(self, f"enc{i + 1}"):
                h = block(h, temb)
                if self.skip_every_block:
                    skips.append(h)
            if not self.skip_every_block:
                skips.append(h)
            h = getattr(self, f"down{i + 1}")(h)
        for block in self.mid:
            h = block(h, temb)
        for i in reversed(range(self.levels)):
            h = getattr(self, f"up{i + 1}")(h)
            if not self.skip_every_block:
                h = torch.cat([skips.pop(), h], dim=1)
            for block in getattr(self, f"dec{i + 1}"):
                if self.skip_every_block:
                    h = torch.cat([skips.pop(), h], dim=1)
                h = block(h, temb)
        return self.conv_out(self.act_out(self.norm_out(h)))


def diffusion_unet(in_chans: int = 1, widths: Sequence[int] = (16, 32, 64), depth: int = 2,
                   num_classes: int | None = None, temb_dim: int | None = None, skips: str = "level") -> DiffusionUNet:
    return DiffusionUNet(in_chans, widths, depth, num_classes, temb_dim, skips)


def diffusion_unet_teacher(**kw) -> DiffusionUNet:
    """Widths (16, 32, 64), two residual blocks per level."""
    return diffusion_unet(**{"widths": (16, 32, 64), "depth": 2, **kw})


def diffusion_unet_manyskip(**kw) -> DiffusionUNet:
    """diffusers' skip layout (a skip per encoder block) over three levels, widths (8, 16, 32, 64):
    its middle keeps 6 skips live, so cuts there carry 7 tensors."""
    return diffusion_unet(**{"widths": (8, 16, 32, 64), "depth": 2, "skips": "block", **kw})


def diffusion_unet_manyskip_half(**kw) -> DiffusionUNet:
    """The many-skip U-Net at half width (4, 8, 16, 32): an adapter per tensor at every cut."""
    return diffusion_unet(**{"widths": (4, 8, 16, 32), "depth": 2, "skips": "block", **kw})


def diffusion_unet_half(**kw) -> DiffusionUNet:
    """The teacher's topology at half width (8, 16, 32): adapters at every cut."""
    return diffusion_unet(**{"widths": (8, 16, 32), "depth": 2, **kw})


def diffusion_unet_small(**kw) -> DiffusionUNet:
    """BK-SDM's block removal: the teacher's widths with one residual block per level where the
    teacher has two. Its tensors are named as the teacher's first block of each level, so it
    can start from the teacher's weights."""
    return diffusion_unet(**{"widths": (16, 32, 64), "depth": 1, **kw})
