"""Image classification: ``Task``'s defaults."""

from __future__ import annotations

from kdgraph.tasks import register_task
from kdgraph.tasks.base import Task


@register_task
class Classification(Task):
    """Images -> class logits: ``Task``'s defaults."""

    name = "classification"
