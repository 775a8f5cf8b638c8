"""The distiller: one nn.Module whose forward is the loss of one training stage.

It holds the student and the adapters as submodules, so that DDP, the optimizer and
checkpoints see exactly the trainable state; the student's block segments (a
``StudentChain``) share its parameters. The teacher is a ``FrozenTeacher``, a plain
object: always in eval mode, never trained, recalibrated, saved or wrapped.
``set_stage`` loads a training stage's program, compiled from the block graph
(``kdgraph.program``); ``forward(x, y)`` executes it and returns the named loss terms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kdgraph.adapters import build_adapters
from kdgraph.layouts import FeatureFormat
from kdgraph.losses import FeatureMSE, HeadLoss, KLDivergence
from kdgraph.runtime.chain import StudentChain
from kdgraph.runtime.teacher import FrozenTeacher
from kdgraph.scalekd import DualViewFeatureMimicking

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled
    from kdgraph.compiler.plan import TrainingStage
    from kdgraph.compiler.program import Op


class Distiller(nn.Module):
    def __init__(self, compiled: Compiled):
        super().__init__()
        spec, plan = compiled.spec, compiled.plan
        self.student = compiled.student.model
        self.adapters = build_adapters(compiled.pairing) if plan.uses_adapters else nn.ModuleDict()
        # Kept out of the module tree: state_dict and DDP see every parameter once, under the
        # student's own names.
        self.chain = StudentChain(compiled.student.segments)
        # A plain object: nn.Module.__setattr__ registers modules only, so the teacher stays
        # out of train()/eval(), modules(), parameters(), state_dict() and DDP.
        self.teacher = (FrozenTeacher(compiled.teacher.model, compiled.teacher.segments)
                        if compiled.teacher else None)
        self.k = plan.k
        # StableKD keeps lower(lift(.)) between blocks; KD + MSE uses lift for its losses only.
        self.adapted_chain = bool(len(self.adapters)) and plan.chains_adapters
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
        self.tpp_weight = spec.loss.tpp_weight
        self.tpp_kl = KLDivergence(spec.loss.temperature)
        self._kinds = {"student": self._student, "lift": self._lift, "lower": self._lower, "proxy": self._proxy,
                       "loss": self._loss}
        self.set_stage(plan.stages[0])

    def _apply(self, fn, recurse=True):
        """Moves and casts reach the segments' own constants (fx copies plain tensor
        attributes such as swin's relative position index into each segment) and the
        unregistered teacher too."""
        super()._apply(fn, recurse)
        self.chain.apply_(fn)
        if self.teacher is not None:
            self.teacher.apply_(fn)
        return self

    def set_stage(self, stage: TrainingStage) -> None:
        """Run ``stage``'s program from now on."""
        self.stage = stage
        self.groups = stage.groups
        self.program = stage.program
        self._teacher_blocks = set(self.program.teacher_reads)
        self._ops = tuple(op for op in self.program.ops if op.kind != "teacher")
        if self.teacher is not None:
            self.teacher.freeze()  # whatever happened to it since (a user's .train()), eval again

    def teacher_features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The frozen teacher's outputs at the block ends this stage's program reads (block k:
        its logits), computed without autograd."""
        return self.teacher.features(x, self._teacher_blocks)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """The student as it will be exported: its blocks, with lower(lift(.)) where adapters are kept."""
        if not self.adapted_chain:
            return self.student(x)
        return self.chain(x, {int(i): a for i, a in self.adapters.items()})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of the current stage: its program, op by op. No gradient crosses groups:
        each group starts from the input or from a (no-grad) teacher feature."""
        values: dict[str, torch.Tensor] = {"input": x, "labels": y}
        if self._teacher_blocks:
            values.update((f"T{i}", f) for i, f in self.teacher_features(x).items())
        terms: dict[str, torch.Tensor] = {}
        for op in self._ops:
            values[op.node] = self.run_op(op, [values[n] for n in op.inputs], terms)
        return terms

    def run_op(self, op: Op, inputs: list[torch.Tensor], terms: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One operation of the program: the value of ``op.node`` (a loss adds to ``terms``)."""
        return self._kinds[op.kind](op, inputs, terms)

    # -- the operations of a program -----------------------------------------------------
    def _student(self, op: Op, inputs: list[torch.Tensor], terms) -> torch.Tensor:
        return self.chain.block(op.block, inputs[0])

    def _lift(self, op: Op, inputs: list[torch.Tensor], terms) -> torch.Tensor:
        return self.adapters[str(op.block)].lift(inputs[0])

    def _lower(self, op: Op, inputs: list[torch.Tensor], terms) -> torch.Tensor:
        return self.adapters[str(op.block)].lower(inputs[0])

    def _proxy(self, op: Op, inputs: list[torch.Tensor], terms) -> torch.Tensor:
        """TPP: teacher block ``op.block`` on the student's (lifted) feature; the teacher's
        parameters need no grad, gradients reach lift and the student."""
        return self.teacher.block(op.block, inputs[0])

    def _loss(self, op: Op, inputs: list[torch.Tensor], terms: dict[str, torch.Tensor]) -> None:
        if op.loss == "head":
            terms.update(self.head_loss(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None))
        elif op.loss == "tpp":
            terms["tpp"] = self.tpp_weight * self.tpp_kl(*inputs)
        elif op.block in self.dfm:
            direct, alt = self.dfm[op.block](*inputs).values()
            terms.update(zip(op.terms, (self.feature_weight * direct, self.feature_weight * alt)))
        else:
            terms[op.terms[0]] = self.feature_weight * self.mse(*inputs)
