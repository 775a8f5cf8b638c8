"""Frozen projections of the teacher's features into the student's format (``decompose.adapters:
projected``): adapter-free StableKD.

At each block end whose widths or layouts differ, the teacher's feature is converted to a map,
resampled to the student's grid, and projected onto its top principal components over channels
(a PCA of the teacher's features on a few training batches, fitted once before decomposition and
then frozen); the result is put in the student's layout. Student block i+1 is fed it and student
block i is trained to produce it (MSE in the student's space), so recomposition chains the
student's own blocks directly and nothing but the student stays in its inference path.

Why PCA, not a learned autoencoder: it needs no training and no hyper-parameters, it is
deterministic (the same batches give the same projection, up to a sign fixed below), it costs
one no-grad teacher pass over ``projection_batches`` batches, and among linear maps to Cs
channels it keeps the most of the teacher's feature variance (the encoder of an optimal linear
autoencoder spans the same subspace). The components are orthonormal and not whitened, so a
feature MSE in the student's space is the teacher's squared error within that subspace.

A block that ends in a ReLU cannot produce negative values, and principal coordinates are
signed; there ("split") each of Cs/2 components is carried as its positive and negative part,
relu(z) and relu(-z), both non-negative, and a ReLU output can match them exactly. Where the
student is wider than the teacher has components, the extra channels are fed zeros. A token
student's class/register tokens get the teacher's own, projected alike, where the teacher has
as many, else the projection of the teacher's map pooled over the grid.

    z = C (x - mu)               C: (k, Ct) top-k eigenvectors of the teacher's channel covariance
    split: [relu(z), relu(-z)]   k = Cs/2
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kdgraph.ir import Pairing, ProjectionSpec
from kdgraph.layouts import from_map, resample, to_map

__all__ = ["Projection", "build_projections", "fit_projections", "principal_components"]


class Projection(nn.Module):
    """The frozen projection of one block end; its mean and components are buffers (saved in
    checkpoints, so a resumed run continues with exactly the projection it fitted)."""

    def __init__(self, spec: ProjectionSpec):
        super().__init__()
        self.spec = spec
        ct = spec.teacher_format.channels
        self.register_buffer("mean", torch.zeros(ct))
        self.register_buffer("components", torch.zeros(spec.components, ct))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def to_student_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's feature as a (B, Ct, h, w) map on the student's grid (prefix tokens dropped)."""
        m, _ = to_map(x, self.spec.teacher_format)
        return resample(m.float(), self.spec.student_format.hw)

    def coordinates(self, m: torch.Tensor) -> torch.Tensor:
        """Principal coordinates (B, k, h, w) of a (B, Ct, h, w) map."""
        return torch.einsum("kc,bchw->bkhw", self.components, m - self.mean[:, None, None])

    def _student_channels(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """Principal coordinates along ``dim`` as the student's Cs channels: sign-split where
        the student's block ends in a ReLU, zeros past the teacher's components."""
        if self.spec.split:
            z = torch.cat([F.relu(z), F.relu(-z)], dim=dim)
        missing = self.spec.student_format.channels - z.shape[dim]
        if missing > 0:  # a student wider than the teacher's components: the rest is zero
            shape = list(z.shape)
            shape[dim] = missing
            z = torch.cat([z, z.new_zeros(shape)], dim=dim)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.spec.teacher_format, self.spec.student_format
        m, prefix = to_map(x, t)
        m = resample(m.float(), s.hw)
        z = self._student_channels(self.coordinates(m), 1)
        tokens = None
        if s.prefix:
            # The student's class/register tokens: the teacher's own where it has as many, else
            # the teacher's map pooled over the grid (what a class token summarises).
            src = prefix.float() if prefix is not None and t.prefix == s.prefix else \
                m.mean(dim=(2, 3))[:, None, :].expand(-1, s.prefix, -1)
            tokens = self._student_channels((src - self.mean) @ self.components.T, -1)
        return from_map(z, s, tokens).to(x.dtype)

    def lift(self, z: torch.Tensor) -> torch.Tensor:
        """The pseudo-inverse on a student-format feature: the teacher's map on the student's grid,
        mu + C^T z (what the projection kept of the teacher's feature)."""
        m, _ = to_map(z, self.spec.student_format)
        m = m.float()[:, : self.spec.components * (2 if self.spec.split else 1)]
        if self.spec.split:
            k = self.spec.components
            m = m[:, :k] - m[:, k:]
        return torch.einsum("kc,bkhw->bchw", self.components, m) + self.mean[:, None, None]


def build_projections(pairing: Pairing) -> nn.ModuleDict:
    """One (unfitted) Projection per projected block end, keyed by the block index."""
    return nn.ModuleDict({str(p.index): Projection(p) for p in pairing.projections})


def principal_components(count: int, total: torch.Tensor, outer: torch.Tensor, k: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(mean, top-k components) from the sums of ``count`` samples: ``total`` (C,) and
    ``outer`` (C, C) = sum x x^T. The components are the eigenvectors of the covariance with
    the largest eigenvalues (the right singular vectors of the centred data), largest first,
    each signed so that its entry of largest magnitude is positive (a deterministic choice)."""
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = vectors[:, -k:].flip(1).T.contiguous() if k else vectors[:, :0].T
    pivot = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, pivot[:, None]))
    return mean, comps * signs


@torch.no_grad()
def fit_projections(projections: Mapping[str, Projection], features, batches: Iterable, limit: int) -> int:
    """Fit every projection on the teacher's features of the first ``limit`` of ``batches``.

    ``batches``: (x, y), or a denoiser's (x_t, ε, side inputs). ``features(x, blocks)``, a
    denoiser's ``features(x_t, blocks, side inputs)``: the frozen teacher's outputs at those block
    ends (``FrozenTeacher.features``). Sums are kept in float64 and, in a distributed run, added
    over ranks, so every rank holds the same projection. Returns the batches used."""
    blocks = {int(i) for i in projections}
    sums: dict[str, list] = {}
    used = 0
    for x, _, *side in batches:
        if used == limit:
            break
        feats = features(x, blocks, *side)
        for key, proj in projections.items():
            m = proj.to_student_grid(feats[int(key)])
            rows = m.transpose(0, 1).flatten(1).T.double()  # (B*h*w, Ct)
            acc = sums.setdefault(key, [0, 0.0, 0.0])
            acc[0] += rows.shape[0]
            acc[1] = acc[1] + rows.sum(0)
            acc[2] = acc[2] + rows.T @ rows
        used += 1
    for key, proj in projections.items():
        count, total, outer = sums[key]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.tensor(float(count), dtype=torch.float64, device=total.device)
            for t in (n, total, outer):
                torch.distributed.all_reduce(t)
            count = n.item()
        mean, comps = principal_components(count, total, outer, proj.spec.components)
        proj.mean.copy_(mean)
        proj.components.copy_(comps)
        proj.fitted.fill_(True)
    return used
