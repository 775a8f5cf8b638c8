"""kdgraph: a declarative graph-surgery compiler for knowledge distillation."""

__version__ = "0.1.0"
