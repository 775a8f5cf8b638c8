"""The denoising task (DDPM's ε-prediction, or v-prediction): the noise schedule, the per-sample
draws of timestep and noise, the evaluation at fixed draws and a deterministic DDIM sampler.

    task = DenoiseTask.of(spec.denoise, spec.seed)
    x_t, target, side = task.draw(x0, y, epoch, indices)    # side: (t,) or (t, y)
    loss = mse(model(x_t, *side), target)                   # target: ε, or v (denoise.prediction)

The model predicts the noise ε (``prediction="epsilon"``, DDPM) or the velocity
``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` (``prediction="v"``; Salimans & Ho 2022, diffusers'
``prediction_type="v_prediction"``); ``x0_and_eps`` turns either prediction into (x̂_0, ε̂).

Every random number is a counter-based hash of (seed, epoch, sample index, draw number), as
the crops and mixup of ``kdgraph.transforms`` are: a sample gets the same timestep and the same
noise in any batch, on any rank, after any resume, and no global RNG is touched. The noise is
Gaussian by the Box-Muller transform of two such uniforms per element (float64 on the host,
then one copy to the device). Evaluation draws from a stream of its own, keyed by the test
sample's index alone, so every evaluation of every run sees the same (t, ε) per test image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdgraph.transforms import _mix, sample_seeds, uniforms

if TYPE_CHECKING:
    from kdgraph.spec.schema import DenoiseSpec

__all__ = ["DIFFUSERS_PREDICTION", "PREDICTIONS", "DenoiseTask", "NoiseSchedule", "ddim_sample", "denoise_mse",
           "gaussians", "pixel_range", "save_grid", "target_of", "x0_and_eps"]

_TRAIN_STREAM = np.uint64(0x6464706D6E6F6973)  # "ddpmnois": apart from the crop and mixup draws
_EVAL_STREAM = np.uint64(0x6576616C6E6F6973)  # "evalnois": the test split's fixed draws

PREDICTIONS = ("epsilon", "v")  # what the model predicts: the noise ε, or the velocity v
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}  # diffusers' schedulers' prediction_type


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def _roots(alpha_bar) -> tuple:
    """(sqrt(ᾱ), sqrt(1 - ᾱ)) of a float (math.sqrt) or a tensor (torch.sqrt)."""
    if isinstance(alpha_bar, torch.Tensor):
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


def target_of(x0: torch.Tensor, eps: torch.Tensor, alpha_bar, prediction: str = "epsilon") -> torch.Tensor:
    """What the model is trained to predict for the clean ``x0`` noised with ``eps`` at ᾱ_t =
    ``alpha_bar`` (a float, or a tensor broadcasting with x0): ε, or ``v = sqrt(ᾱ_t) ε -
    sqrt(1 - ᾱ_t) x_0`` (``prediction="v"``)."""
    _check_prediction(prediction)
    if prediction == "epsilon":
        return eps
    a, s = _roots(alpha_bar)
    return a * eps - s * x0


def x0_and_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction: str = "epsilon"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the model's prediction ``pred`` at ``x_t`` and ᾱ_t = ``alpha_bar``: ε̂ =
    pred and ``x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)``; with ``prediction="v"``,
    ``x̂_0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v̂`` and ``ε̂ = sqrt(1 - ᾱ_t) x_t + sqrt(ᾱ_t) v̂``.
    Either way ``sqrt(ᾱ_t) x̂_0 + sqrt(1 - ᾱ_t) ε̂ = x_t``."""
    _check_prediction(prediction)
    a, s = _roots(alpha_bar)
    if prediction == "epsilon":
        return (x_t - s * pred) / a, pred
    return a * x_t - s * pred, s * x_t + a * pred


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t = prod_{s<=t} (1 - β_s) for t = 0..T-1 (float64). ``linear``: β evenly from β_1 to
    β_T (Ho et al.); ``cosine``: ᾱ_t = f(t+1)/f(0), f(t) = cos((t/T + s)/(1 + s) · π/2)², s = 0.008,
    β clipped at 0.999 (Nichol & Dhariwal)."""

    alphas_cumprod: tuple[float, ...]

    @classmethod
    def create(cls, kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        if kind == "linear":
            betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
        elif kind == "cosine":
            s = 0.008
            f = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
            betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
        else:
            raise ValueError(f"unknown noise schedule {kind!r}; allowed: linear, cosine")
        return cls(tuple(np.cumprod(1.0 - betas).tolist()))

    @property
    def timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``t`` (float32, on t's device; from the host's table)."""
        table = torch.tensor(self.alphas_cumprod, dtype=torch.float64)
        return table[t.cpu().long()].to(t.device, torch.float32)


def gaussians(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) standard normal float64: Box-Muller of the uniforms 1..2n of each key."""
    u = uniforms(keys, 2 * n)
    radius = np.sqrt(-2.0 * np.log1p(-u[:, :n]))  # 1 - u in (0, 1]: the log is finite
    return radius * np.cos(2.0 * math.pi * u[:, n:])


def _keys(seed: int, epoch: int, indices, stream: np.uint64) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
    with np.errstate(over="ignore"):
        return _mix(sample_seeds(seed, epoch, idx) ^ stream)


@dataclass(frozen=True)
class DenoiseTask:
    """DDPM's training pairs: ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` with t uniform on
    0..T-1 and ε ~ N(0, I) per sample, both functions of (seed, epoch, sample index); the
    target is ε, or v where ``prediction`` is "v" (``target_of``)."""

    schedule: NoiseSchedule
    seed: int
    class_conditional: bool = False
    prediction: str = "epsilon"

    def __post_init__(self) -> None:
        _check_prediction(self.prediction)

    @classmethod
    def of(cls, spec: DenoiseSpec, seed: int) -> DenoiseTask:
        return cls(NoiseSchedule.create(spec.schedule, spec.timesteps, spec.beta_start, spec.beta_end), seed,
                   spec.class_conditional, spec.prediction)

    def draws(self, epoch: int, indices, shape: tuple[int, ...], evaluation: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B,) int64, ε (B, *shape) float32) on the host for the samples ``indices`` of
        ``epoch`` (the test split's fixed draws where ``evaluation``)."""
        keys = _keys(self.seed, 0 if evaluation else epoch, indices, _EVAL_STREAM if evaluation else _TRAIN_STREAM)
        n = math.prod(shape)
        t = np.floor(uniforms(keys ^ np.uint64(1), 1)[:, 0] * self.schedule.timesteps).astype(np.int64)
        eps = gaussians(keys, n).reshape(len(keys), *shape)
        return torch.from_numpy(t), torch.from_numpy(eps).float()

    def draw(self, x0: torch.Tensor, y: torch.Tensor, epoch: int, indices, evaluation: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(x_t, target, side inputs) for a batch of clean images ``x0`` with classes ``y``: the
        target is ε, or v (``prediction="v"``); the side inputs are (t,), or (t, y) for a
        class-conditional model."""
        t, eps = self.draws(epoch, indices, tuple(x0.shape[1:]), evaluation)
        a = self.schedule.at(t)  # on the host, as drawn: no device sync
        t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
        a = a.to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
        return x_t, target_of(x0, eps, a, self.prediction), ((t, y) if self.class_conditional else (t,))


@torch.no_grad()
def denoise_mse(forward: Callable[..., torch.Tensor], loader, task: DenoiseTask) -> dict[str, float]:
    """{'mse': mean over the test split of MSE(prediction, target)} at each test sample's fixed
    (t, ε): the target of the task's parameterisation, ε (MSE(ε̂, ε)) or v (MSE(v̂, v))."""
    total, count = 0.0, 0
    for xb, yb, idx in loader.epoch_indexed(0):
        x_t, target, side = task.draw(xb, yb, 0, idx, evaluation=True)
        err = (forward(x_t, *side).float() - target.float()).pow(2).flatten(1).mean(1)
        total += float(err.sum())
        count += len(err)
    return {"mse": total / max(count, 1)}


@torch.no_grad()
def ddim_sample(forward: Callable[..., torch.Tensor], schedule: NoiseSchedule, shape: tuple[int, ...], n: int,
                steps: int, seed: int, num_classes: int | None = None, device: torch.device | str = "cpu",
                clip: tuple[torch.Tensor, torch.Tensor] | None = None, prediction: str = "epsilon") -> torch.Tensor:
    """``n`` images of ``shape`` by DDIM with η = 0 (Song et al.): deterministic from its start
    noise (drawn from ``seed``) over ``steps`` timesteps evenly spaced from T-1 to 0:
    ``x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 - ᾱ_{t'}) ε̂``, ``x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)``,
    ᾱ of the step after the last = 1; a v-predicting ``forward`` (``prediction="v"``) gives
    (x̂_0, ε̂) by ``x0_and_eps``. Class-conditional (``num_classes``): image i is of class
    i mod num_classes. ``clip`` (low, high), per channel: x̂_0 is clamped to the data's range at
    every step, as DDPM's sampler clips to [-1, 1]."""
    _check_prediction(prediction)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g).to(device)
    side_y = (torch.arange(n, device=device) % num_classes,) if num_classes else ()
    ts = np.unique(np.round(np.linspace(0, schedule.timesteps - 1, steps)).astype(np.int64))[::-1]
    ab = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        a_t = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        pred = forward(x, torch.full((n,), int(t), device=device, dtype=torch.long), *side_y).float()
        x0, eps = x0_and_eps(pred, x, a_t, prediction)
        if clip is not None:
            x0 = torch.maximum(torch.minimum(x0, clip[1].to(x0)), clip[0].to(x0))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


def pixel_range(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high), (C, 1, 1) each: where pixels 0..1 lie once normalised with ``mean``/``std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return -m / s, (1 - m) / s


def save_grid(images: torch.Tensor, mean, std, path: Path, pad: int = 2) -> Path:
    """A PNG grid of ``images`` (N, C, H, W), normalised with ``mean``/``std`` (0..1 pixel units),
    ceil(sqrt(N)) per row."""
    from PIL import Image

    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).clamp(0, 1)
    n, c, h, w = pixels.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[k]
    array = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)
    return path
