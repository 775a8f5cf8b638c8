"""Replay a teacher cache (``kdgraph.teacher_cache``; built by ``kdgraph.runtime.cache``): the
teacher's output for each training batch, read from its epoch's memory-mapped shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdgraph.errors import KDGraphError
from kdgraph.teacher_cache import read_header, shard_path

__all__ = ["TeacherCache", "split_cached"]


def split_cached(cached: Any, parts: int) -> list[Any]:
    """A batch's cached teacher output in ``parts`` micro-batches (as ``tensor_split`` splits the batch)."""
    if isinstance(cached, tuple):
        return [tuple(p) for p in zip(*(c.tensor_split(parts) for c in cached))]
    return list(cached.tensor_split(parts))


class TeacherCache:
    """A built cache, read batch by batch: rows ``step * batch_size ..`` of the epoch's shard
    of this rank, memory-mapped (``np.load(mmap_mode='r')``)."""

    def __init__(self, root: Path | str, rank: int, world_size: int, batch_size: int, device: torch.device):
        self.root = Path(root)
        header = read_header(self.root)
        built_for = header["key"]["ranks"]["value"]
        if built_for != world_size:
            raise KDGraphError(f"{self.root} was built on {built_for} rank(s); this run has {world_size}: rebuild it "
                               f"under the same torchrun")
        if not header.get("complete"):
            raise KDGraphError(f"{self.root} is incomplete (its build stopped): run `kdgraph cache` again to finish it")
        if header["batch_size"] != batch_size:
            raise KDGraphError(f"{self.root} was built with batch size {header['batch_size']}, this run has {batch_size}")
        self.mode = header["key"]["mode"]["value"]["mode"]
        self.stored = set(header["stored_epochs"])
        self.rank, self.batch_size, self.device = rank, batch_size, device
        self._shards: dict[int, np.ndarray] = {}

    def _shard(self, epoch: int) -> np.ndarray:
        if epoch not in self._shards:
            path = shard_path(self.root, epoch, self.rank)
            if epoch not in self.stored or not path.exists():
                raise KDGraphError(f"{self.root} holds no epoch {epoch + 1} (rank {self.rank}); rebuild it with "
                                   f"`kdgraph cache SPEC --epochs {epoch + 1}`")
            self._shards = {epoch: np.load(path, mmap_mode="r")}  # one epoch mapped at a time
        return self._shards[epoch]

    def batch(self, epoch: int, step: int, n: int) -> Any:
        """The teacher's output for the ``n`` views of batch ``step`` of ``epoch``: float32
        logits (full), or (fp16 probabilities, int64 indices) of the top k."""
        rows = self._shard(epoch)[step * self.batch_size: step * self.batch_size + n]
        if self.mode == "full":
            return torch.from_numpy(np.array(rows)).to(self.device, non_blocking=True)
        return (torch.from_numpy(np.array(rows["p"])).to(self.device, non_blocking=True),
                torch.from_numpy(rows["i"].astype(np.int64)).to(self.device, non_blocking=True))
