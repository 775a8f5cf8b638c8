"""How real a denoiser's samples look, judged by a classifier trained with kdgraph on the same
data: the Fréchet distance between the judge's features of generated and of real test images,
and (class-conditional) the judge's accuracy on the classes the samples were drawn for.

This is not Inception's FID: the feature space is the judge's (the input of its last linear
layer), a small Fashion-MNIST classifier, so the numbers compare runs judged by the same
classifier, not papers. ``Judge.from_run`` reads a finished kdgraph run: its resolved spec
(run.json, whose ``module:`` model reference is imported as a spec file's would be: name a run
you trust), its student.safetensors and the normalisation its training used (summary.json).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdgraph.errors import KDGraphError
from kdgraph.runtime.runs import RunFolder, stored_run

__all__ = ["Judge", "frechet_distance"]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|μ_a - μ_b|² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½)`` between Gaussians fitted to the rows of
    ``a`` and of ``b`` (samples × features; unbiased covariances), as FID computes it: the
    matrix square root by scipy, its imaginary rounding noise dropped."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(root).all():  # a singular product: FID's offset on the diagonals
        eps = np.eye(len(s_a)) * 1e-6
        root = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2.0 * root))


@dataclass
class Judge:
    """A trained classifier, its input normalisation (0..1 pixel units) and the layer whose
    input is its feature space (its last ``nn.Linear``)."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    @classmethod
    def from_run(cls, folder: Path, device: torch.device | str = "cpu") -> Judge:
        """The student of the finished kdgraph run in ``folder``, as its training normalised it."""
        from kdgraph.compiler import compile_spec
        from kdgraph.runtime.export import load_student
        from kdgraph.spec import load_spec

        run = cls.finished_run(folder)
        spec = load_spec(stored_run(run.root)["spec"])
        if spec.denoise is not None:
            raise KDGraphError(f"denoise.judge: {folder} trained a denoiser; the judge is a classifier")
        data = json.loads(run.summary.read_text())["data"]
        model = load_student(compile_spec(spec, allow_missing_weights=True), run.student).to(device).eval()
        return cls(model, tuple(data["mean"]), tuple(data["std"]), spec.name)

    @staticmethod
    def finished_run(folder: Path) -> RunFolder:
        """``folder`` as a run folder, where a run finished there (checked before training starts)."""
        run = RunFolder(Path(folder))
        if not (run.stored_spec.is_file() and run.student.is_file() and run.summary.is_file()):
            raise KDGraphError(f"denoise.judge: {folder} is not a finished kdgraph run (run.json, student.safetensors "
                               "and summary.json); train a classifier on the same data first "
                               "(specs/fashion-classifier.yaml)")
        return run

    def _head(self) -> nn.Linear:
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise KDGraphError(f"denoise.judge: {self.name or 'the classifier'} has no linear layer whose input "
                               "could serve as its feature space")
        return linears[-1]

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(features, predicted classes) of images in 0..1 pixel units (N, C, H, W)."""
        seen: list[torch.Tensor] = []
        hook = self._head().register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(1).float()))
        device = next(self.model.parameters()).device
        m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        preds = []
        try:
            for part in pixels.split(batch_size):
                logits = self.model((part.to(device).float() - m) / s)
                preds.append(logits.argmax(1))
        finally:
            hook.remove()
        return torch.cat(seen).cpu().numpy(), torch.cat(preds).cpu().numpy()

    def judge(self, generated: torch.Tensor, real: torch.Tensor, classes: torch.Tensor | None = None) -> dict:
        """{'fd': the Fréchet distance of ``generated`` to ``real`` (0..1 pixels)} and, given the
        ``classes`` the samples were drawn for, {'class_accuracy': % the judge agrees}."""
        f_gen, pred = self.features(generated)
        f_real, _ = self.features(real)
        out = {"fd": frechet_distance(f_gen, f_real)}
        if classes is not None:
            out["class_accuracy"] = 100.0 * float((pred == classes.cpu().numpy()).mean())
        return out
