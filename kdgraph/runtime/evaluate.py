"""Top-1 and top-5 accuracy on a split (one host sync per evaluation), and a run's ``Evaluator``.

Per-pixel logits (``per_pixel``: (B, C, H, W) logits, (B, H, W) labels, no ignored label; a task
with its own metric scores itself, ``Task.score``) count every pixel as a sample:
its top-1 is the pixel accuracy; it also reports ``pixel_acc`` (the same number) and ``miou``
(the mean over classes present in labels or predictions of intersection / union).
"""

from __future__ import annotations

import itertools

import torch

from kdgraph.runtime.techniques import autocast

TOPK = (1, 5)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = TOPK) -> torch.Tensor:
    """How many rows have their target among the k highest logits, for each k in ``ks``
    (a device tensor, no host sync). As timm's ``accuracy``: with C < k classes, top-k is
    top-C (every row counts)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hit = top == target.unsqueeze(1)  # (N, maxk) or, per pixel, (N, maxk, H, W)
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def accuracy(forward, loader, device: torch.device, precision: str = "fp32",
             channels_last: bool = False, per_pixel: bool = False) -> dict[str, float]:
    """{'top1': %, 'top5': %} of ``forward`` over every batch of ``loader`` (``per_pixel``: also
    'pixel_acc' and 'miou')."""
    correct = torch.zeros(len(TOPK), dtype=torch.long, device=device)
    total = 0
    confusion = None
    for xb, yb in loader.epoch(0):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = forward(xb)
        correct += topk_correct(logits, yb)
        total += yb.numel()
        if per_pixel:
            c = logits.shape[1]
            pairs = yb.flatten() * c + logits.argmax(dim=1).flatten()
            counts = torch.bincount(pairs, minlength=c * c).reshape(c, c)
            confusion = counts if confusion is None else confusion + counts
    out = {f"top{k}": 100.0 * c / max(total, 1) for k, c in zip(TOPK, correct.tolist())}
    if confusion is not None:
        out.update(pixel_acc=out["top1"], miou=mean_iou(confusion))
    return out


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean intersection over union (%) from a (true, predicted) confusion matrix, over the
    classes that occur in either."""
    confusion = confusion.double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    seen = union > 0
    return 100.0 * float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else 0.0


class Evaluator:
    """A run's evaluation of the composed student on the validation split (else the test split), scored by its task, with
    the BatchNorm statistics of its inference path re-estimated first where ``bn_recalibrate``
    says so (``recalibrate_bn``)."""

    def __init__(self, distiller, task, data, config):
        self.distiller, self.task, self.data, self.config = distiller, task, data, config
        self.bn_recalibrated_at: int | None = None  # the global step of the last BatchNorm re-estimate

    def evaluate(self, global_step: int, loader=None) -> dict[str, float]:
        """The task's scores of the composed student on ``loader`` (default: the validation split
        where there is one, else the test split; BatchNorm re-estimated first where due)."""
        setting = self.config.bn_recalibrate
        if setting is True or (setting == "auto" and len(self.distiller.groups) > 1):
            self.recalibrate_bn(global_step)
        was = self.distiller.training
        self.distiller.eval()
        try:
            return self.score(lambda x, *side: self.distiller.inference(x, side), loader)
        finally:
            self.distiller.train(was)

    def evaluate_test(self, global_step: int) -> dict[str, float] | None:
        """With a validation split (which chose the best epoch), the test split's scores, taken
        once at the end of the run; None without one (every evaluation was the test split's)."""
        return None if self.data.val is None else self.evaluate(global_step, self.data.test)

    def score(self, forward, loader=None) -> dict[str, float]:
        """``forward`` on ``loader`` (default: the validation split where there is one, else the
        test split), scored by the task."""
        cfg, loader = self.config, self.data.eval_loader if loader is None else loader
        return self.task.score(forward, loader, cfg.device, cfg.precision, cfg.channels_last)

    @torch.no_grad()
    def recalibrate_bn(self, global_step: int) -> None:
        """Re-estimate the BatchNorm statistics of the student's inference path on the first
        ``bn_recalibrate_batches`` batches of the training data (a whole pass without a bound).
        In decomposed stages each block's statistics were gathered on inputs derived from the
        teacher's features; the composed student feeds it its own, slightly different ones.
        The pass runs in train mode without gradients, with a cumulative average, on epoch 0's
        order (the same batches at every evaluation, in any process), and leaves the RNG
        untouched so that resumed runs stay exact. A pass at the step of the last one finds
        the statistics it would compute, and is skipped."""
        if self.bn_recalibrated_at == global_step:
            return
        self.bn_recalibrated_at = global_step
        norms = [m for m in self.distiller.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        was = self.distiller.training
        self.distiller.train()
        device = self.config.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for xb, yb, idx in itertools.islice(self.task.batches(self.data.train, 0),
                                                self.config.bn_recalibrate_batches):
                xb, side = self.task.inputs(xb, yb, idx)
                if self.config.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(self.config.precision, device):
                    self.distiller.inference(xb, side)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.distiller.train(was)
