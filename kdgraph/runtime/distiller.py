"""The distiller: one nn.Module whose forward is the loss of one training stage.

It holds the student (its segments share its parameters) and the adapters as
submodules, so that DDP, the optimizer and checkpoints see exactly the trainable
state. The teacher is a ``FrozenTeacher``, a plain object: always in eval mode, never
trained, recalibrated, saved or wrapped. ``set_stage`` chooses the groups;
``forward(x, y)`` returns the named loss terms.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import build_adapters
from ..compiler import Compiled
from ..layouts import FeatureFormat
from ..losses import FeatureMSE, HeadLoss, KLDivergence
from ..scalekd import DualViewFeatureMimicking
from ..plan import TrainingStage
from .teacher import FrozenTeacher


class Distiller(nn.Module):
    def __init__(self, compiled: Compiled):
        super().__init__()
        spec, plan = compiled.spec, compiled.plan
        self.student = compiled.student.model
        self.adapters = build_adapters(compiled.pairing) if plan.uses_adapters else nn.ModuleDict()
        # Segments share the student's submodules; kept out of the module tree so that
        # state_dict and DDP see every parameter once, under the student's own names.
        self._segments = list(compiled.student.segments())
        # A plain object: nn.Module.__setattr__ registers modules only, so the teacher stays
        # out of train()/eval(), modules(), parameters(), state_dict() and DDP.
        self.teacher = (FrozenTeacher(compiled.teacher.model, compiled.teacher.segments())
                        if compiled.teacher else None)
        self.k = plan.k
        self.feature_losses = plan.feature_losses
        # StableKD keeps lower(lift(.)) between blocks; KD + MSE uses lift for its losses only.
        self.adapted_chain = bool(len(self.adapters)) and not self.feature_losses
        self.head_loss = HeadLoss(spec.loss.kl_weight, spec.loss.temperature, spec.loss.label_smoothing)
        self.mse = FeatureMSE()
        self.feature_weight = spec.loss.feature_weight
        # DFM compares maps on the teacher's grid; one per block end, in the teacher's format.
        self.dfm = {}
        if spec.loss.feature == "dfm" and compiled.teacher is not None:
            hw = compiled.input_size[1:]
            self.dfm = {b.index: DualViewFeatureMimicking(FeatureFormat.of(b.teacher, hw), spec.loss.dfm_alpha,
                                                          spec.loss.dfm_beta)
                        for b in compiled.pairing.blocks if not b.is_head}
        self.tpp_block = plan.tpp_block
        self.tpp_weight = spec.loss.tpp_weight
        self.tpp_kl = KLDivergence(spec.loss.temperature)
        self.set_stage(plan.stages[0])

    def _apply(self, fn, recurse=True):
        """Moves and casts reach the segments' own constants (fx copies plain tensor
        attributes such as swin's relative position index into each segment) and the
        unregistered teacher too."""
        super()._apply(fn, recurse)
        for module in self._segments:
            module._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher.apply_(fn)
        return self

    # -- the teacher ---------------------------------------------------------------------
    def set_stage(self, stage: TrainingStage) -> None:
        self.groups = stage.groups
        need: set[int] = set()
        if self.teacher is not None:
            self.teacher.freeze()  # whatever happened to it since (a user's .train()), eval again
            for group in self.groups:
                a, b = group[0], group[-1]
                if a > 1:
                    need.add(a - 1)
                need.add(b)
                if self.feature_losses:
                    need.update(group[:-1])
                if self.tpp_block in group:
                    need.add(self.k)
        self._needed = need

    def teacher_features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The frozen teacher's outputs at the block ends this stage needs (block k: its logits)."""
        return self.teacher.features(x, self._needed)

    # -- the student ---------------------------------------------------------------------
    def _adapter(self, i: int):
        return self.adapters[str(i)] if str(i) in self.adapters else None

    def _lift(self, i: int, h: torch.Tensor) -> torch.Tensor:
        a = self._adapter(i)
        return a.lift(h) if a is not None else h

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """The student as it will be exported: segments, with lower(lift(.)) where adapters are kept."""
        if not self.adapted_chain:
            return self.student(x)
        h = x
        for i, seg in enumerate(self._segments, start=1):
            h = seg(h)
            a = self._adapter(i)
            if a is not None:
                h = a(h)
        return h

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of the current stage. No gradient crosses groups: each group starts
        from the input or from a (no-grad) teacher feature."""
        feats = self.teacher_features(x) if self.teacher is not None else {}
        terms: dict[str, torch.Tensor] = {}
        for group in self.groups:
            a, b = group[0], group[-1]
            if a == 1:
                h = x
            else:
                adapter = self._adapter(a - 1)
                h = adapter.lower(feats[a - 1]) if adapter is not None else feats[a - 1]
            for i in group:
                h = self._segments[i - 1](h)
                if i == self.tpp_block:
                    terms["tpp"] = self.tpp_weight * self.tpp_kl(self.proxy(i, h), feats[self.k])
                if i == b:
                    break
                if self.feature_losses:
                    terms.update(self.feature_loss(i, h, feats[i]))
                else:
                    adapter = self._adapter(i)
                    if adapter is not None:
                        h = adapter(h)
            if b == self.k:
                terms.update(self.head_loss(h, y, feats.get(self.k)))
            else:
                terms.update(self.feature_loss(b, h, feats[b]))
        return terms

    def feature_loss(self, i: int, h: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE (or DFM's two views) between lift_i(student feature) and the teacher's feature."""
        lifted = self._lift(i, h)
        if i in self.dfm:
            return {f"{name.replace('dfm', f'dfm{i}')}": self.feature_weight * v
                    for name, v in self.dfm[i](lifted, target).items()}
        return {f"mse{i}": self.feature_weight * self.mse(lifted, target)}

    def proxy(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """TPP: the student's feature at block i, lifted, through the frozen teacher's blocks
        i+1..k. The teacher's parameters need no grad; gradients reach lift_i and the student."""
        return self.teacher.tail(self._lift(i, h), start=i)
