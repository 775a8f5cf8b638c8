"""The kdgraph spec: the schema of a run (``schema``), reading it from YAML with ``--set``
overrides (``loader``) and explaining what is wrong with one (``explain``).

``load_spec`` reads YAML (or a dict), applies the overrides and validates; every problem
comes back as one ``SpecError`` that names the dotted YAML path of each wrong value, what
was given and what is allowed. Importing this package does not import torch.
"""

from kdgraph.spec.explain import spec_error_from
from kdgraph.spec.loader import load_spec
from kdgraph.spec.schema import (
    CutPair,
    DataSpec,
    DecomposeSpec,
    LossSpec,
    ModelSpec,
    TeacherSpec,
    OptimSpec,
    RuntimeSpec,
    ScheduleSpec,
    Spec,
    max_recompositions,
)

__all__ = [
    "CutPair",
    "DataSpec",
    "DecomposeSpec",
    "LossSpec",
    "ModelSpec",
    "TeacherSpec",
    "OptimSpec",
    "RuntimeSpec",
    "ScheduleSpec",
    "Spec",
    "load_spec",
    "max_recompositions",
    "spec_error_from",
]
