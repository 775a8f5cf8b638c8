"""A student too big for one device: ``runtime.shard_student`` shards it over torchrun's ranks
with torch's FSDP2 (``fully_shard``), and its checkpoints are written in
``torch.distributed.checkpoint`` (DCP) format, each rank writing its own shards.

    shard_student(distiller, info, device, param_dtype, checkpointing)
        every repeated layer of the student (its decoder layers: the longest ``nn.ModuleList``
        of one class) is an FSDP unit, and the distiller is the root unit (embeddings, final
        norm, head, adapters): a rank holds 1/N of every parameter, its gradient and its AdamW
        state, and gathers one layer's parameters at a time. ``param_dtype``: FSDP's
        mixed-precision policy (parameters gathered and computed in it, gradients reduced in
        float32). ``checkpointing``: each layer's activations are recomputed in the backward
        (``torch.distributed._composable.checkpoint``, which keeps the state_dict names).

    ShardedCheckpoints(folder, states, resume_command, info)
        the ``CheckpointManager`` of a sharded run: ``checkpoints/last.dcp/`` (a folder: the
        ranks' ``__R_0.distcp`` shard files, DCP's ``.metadata``, and ``state.pt``, kdgraph's
        checksummed file of every other owner's state plus the sha256 of each shard file).
        A save writes a temp folder, then rank 0 renames: ``last.dcp`` -> ``prev.dcp``,
        temp -> ``last.dcp``; a kill leaves one whole folder at least. A load verifies every
        file's hash before reading anything, falls back to ``prev.dcp``, and reshards: a
        checkpoint of N ranks loads at M ranks, or into an unsharded student in one process.
        A run with no DCP folder but an unsharded run's ``last.pt`` (--reshard onto ranks
        that shard the student) loads that file whole and scatters it (``load_full_tensors``).
"""

from __future__ import annotations

import hashlib
import os
from fnmatch import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdgraph.errors import KDGraphError, SpecError
from kdgraph.runtime import checkpoint as ckpt
from kdgraph.runtime.runs import SHARDED_CHECKPOINT_FILES

OPTION = "runtime.shard_student"
STATE_FILE = "state.pt"  # kdgraph's own part of a DCP checkpoint (everything but model and optimizer)
TENSOR_KEYS = ("model", "optimizer")  # the owners whose state DCP writes, sharded


def repeated_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated layers: its longest ``nn.ModuleList`` whose modules are all of one
    class (a transformer's decoder layers); None where it has none of two or more."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def check_shardable(distiller, info) -> nn.ModuleList:
    """The student's layers, or a one-line SpecError naming why the student cannot be sharded."""
    if not info.enabled:
        raise SpecError(OPTION, "shards the student across torchrun's ranks, and this run is one process: launch "
                        "it with torchrun --nproc_per_node N (N >= 2), or set runtime.shard_student: false")
    layers = repeated_layers(distiller.student)
    if layers is None:
        raise SpecError(OPTION, f"the student ({type(distiller.student).__name__}) has no repeated layers (an "
                        "nn.ModuleList of two or more modules of one class) to shard one at a time; set "
                        "runtime.shard_student: false (DDP)")
    if distiller.adapters_in_inference:
        raise SpecError(OPTION, "a student with adapters kept in its inference path is exported folded, "
                        "which a sharded student cannot be; set runtime.shard_student: false")
    return layers


def student_runs_whole(plan) -> bool:
    """Every program of the plan runs the student's own forward (``whole`` ops, or student blocks
    alone, which ``run_program`` runs as the whole model), never its traced segments: FSDP
    gathers a layer in the layer's forward hook, which a traced segment never calls."""
    programs = [p for st in plan.stages for p in (st.program, st.inference)]
    return all(all(op.kind == "student" for op in p.ops) or not any(op.kind == "student" for op in p.ops)
               for p in programs)


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Activation checkpointing of every layer: its activations are recomputed in the backward
    instead of kept (the state_dict's names are unchanged)."""
    from torch.distributed._composable import checkpoint

    for layer in layers:
        checkpoint(layer)


def shard_student(distiller, info, device: torch.device, param_dtype: torch.dtype = torch.float32,
                  checkpointing: bool = False) -> None:
    """Shard the distiller's student (and adapters) over the run's ranks with FSDP2: each
    repeated layer one unit, the distiller the root; ``inference`` gathers as ``forward`` does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    layers = check_shardable(distiller, info)
    slots = parameter_slots(distiller, *distiller.chain.segments, distiller.chain.side_segment)
    if checkpointing:
        checkpoint_layers(layers)
    mesh = init_device_mesh(device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(distiller, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(distiller, "inference")
    follow_shards(slots)  # the student's traced segments held its whole parameters


def apply_student_options(distiller, plan, config, info) -> None:
    """runtime.shard_student and runtime.activation_checkpointing on the run's distiller (after
    its last move and cast, before its optimizer is built)."""
    option = OPTION if config.shard_student else "runtime.activation_checkpointing"
    if not (config.shard_student or config.activation_checkpointing):
        return
    if not student_runs_whole(plan):
        raise SpecError(option, "reaches the student's layers through their own forward, and this plan runs the "
                        "student as traced block segments: set decompose.blocks: 1")
    if config.shard_student:
        shard_student(distiller, info, config.device, getattr(torch, config.shard_dtype),
                      config.activation_checkpointing)
        return
    layers = repeated_layers(distiller.student)
    if layers is None:
        raise SpecError(option, f"the student ({type(distiller.student).__name__}) has no repeated layers to "
                        "checkpoint; set runtime.activation_checkpointing: false")
    checkpoint_layers(layers)


Slots = dict[int, list[tuple[nn.Module, str]]]


def parameter_slots(*roots: nn.Module | None) -> Slots:
    """Where each parameter is registered (module, name), by the parameter's id, across
    ``roots``: a model and its block segments register the same parameters in modules of their own."""
    slots: Slots = {}
    for root in roots:
        for module in root.modules() if root is not None else ():
            for name, p in module._parameters.items():
                if p is not None and all(m is not module or n != name for m, n in slots.get(id(p), ())):
                    slots.setdefault(id(p), []).append((module, name))
    return slots


def follow_shards(slots: Slots) -> None:
    """After ``fully_shard`` replaced parameters by their shards (DTensors) in the modules it
    manages, every other module that held the same parameter holds the shard too: the whole
    tensor is then referenced nowhere and freed (each rank keeps 1/N of it). Those other modules
    (segments the sharded run never calls) must not run."""
    from torch.distributed.tensor import DTensor

    for places in slots.values():
        shard = next((m._parameters[n] for m, n in places if isinstance(m._parameters[n], DTensor)), None)
        if shard is not None:
            for module, name in places:
                module._parameters[name] = shard


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters held on this rank (its shards, where sharded)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in module.parameters())
    return sum(t.numel() * t.element_size() for t in local)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s whole state_dict on the CPU of rank 0, gathered one tensor at a time (every
    rank must call it; the others get an empty dict). An unsharded module: its own, on CPU."""
    if not is_sharded(module) and not any(is_sharded(m) for m in module.modules()):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- checkpoints ------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_files(folder: Path) -> dict[str, str]:
    """sha256 of every file DCP wrote in ``folder`` (its shards and its metadata)."""
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}


def tensor_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's states keyed by parameter names (DCP's, sharded or not)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder kdgraph wrote: the files at the names it writes there, then the
    folder; anything else in it stops the removal before a file goes (an error naming them)."""
    patterns = (*SHARDED_CHECKPOINT_FILES, ".state.pt.*.tmp")
    entries = sorted(folder.iterdir())
    foreign = [p.name for p in entries if p.is_dir() or p.is_symlink() or not any(fnmatch(p.name, pat) for pat in patterns)]
    if foreign:
        raise KDGraphError(f"{folder} holds files kdgraph did not write ({', '.join(foreign)}); a new checkpoint "
                           "would remove the folder: move them out of it")
    for path in entries:
        path.unlink()
    folder.rmdir()


def write_folder(tensors: dict[str, Any], rest: dict[str, Any], tmp: Path, main: bool, enabled: bool) -> None:
    """DCP's save of ``tensors`` into ``tmp`` by every rank, then rank 0's ``state.pt``: ``rest``
    with the sha256 of every shard file (written atomically, checksummed)."""
    import torch.distributed.checkpoint as dcp

    if main:
        if tmp.exists():
            remove_folder(tmp)  # a save killed before its rename
        tmp.mkdir(parents=True)
    if enabled:
        dist.barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    if main:
        ckpt.save_atomic({**rest, "shard_files": shard_files(tmp)}, tmp / STATE_FILE)


def rotate(tmp: Path, last: Path, prev: Path) -> None:
    """``last`` -> ``prev`` (the one before removed), ``tmp`` -> ``last``: at every moment one
    whole checkpoint folder is there (``prev`` between the two renames)."""
    if last.exists():
        if prev.exists():
            remove_folder(prev)
        os.replace(last, prev)
    os.replace(tmp, last)
    fd = os.open(last.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_folder(folder: Path) -> dict[str, Any]:
    """``state.pt`` of the DCP checkpoint ``folder`` (checksum verified), after every shard file's
    sha256 is checked against it: a damaged or missing shard is an error before anything loads."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise KDGraphError(f"no checkpoint at {folder}: nothing to resume (train without --resume first)")
    state = _load_state(state_file)
    stored, found = state.get("shard_files") or {}, shard_files(folder)
    if not stored or stored != found:
        bad = sorted(k for k in set(stored) | set(found) if stored.get(k) != found.get(k))
        raise KDGraphError(f"checkpoint {folder} is corrupt: its shard files ({', '.join(bad) or 'none'}) do not "
                           "match the hashes stored in state.pt (damaged, missing or from another save)")
    return state


def _load_state(path: Path) -> dict[str, Any]:
    """kdgraph's part of a DCP checkpoint, loaded as data only, its checksum verified."""
    from kdgraph.weights import read_weights_file

    state = read_weights_file(path)
    if not isinstance(state, dict) or state.get(ckpt.CHECKSUM_KEY) != ckpt.checksum(state):
        raise KDGraphError(f"checkpoint {path} is corrupt: its content does not match the checksum stored in it")
    return state


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict:
    """A torch optimizer's own state_dict (a ``last.pt``'s: parameters numbered in the order of
    its groups) keyed by the parameters' names instead, as DCP's state_dict functions read it:
    number ``i`` of saved group ``g`` is the ``i``-th parameter of this optimizer's group ``g``."""
    names = {id(p): n for n, p in model.named_parameters()}
    shape = lambda groups: [len(g["params"]) for g in groups]  # noqa: E731
    if shape(saved["param_groups"]) != shape(optimizer.param_groups):
        raise KDGraphError(f"the checkpoint's optimizer has parameter groups of {shape(saved['param_groups'])} "
                           f"parameters, this run's {shape(optimizer.param_groups)}: it is another model's")
    state, groups = {}, []
    for group, live in zip(saved["param_groups"], optimizer.param_groups):
        fqns = [names[id(p)] for p in live["params"]]
        state.update({fqn: saved["state"][i] for i, fqn in zip(group["params"], fqns) if i in saved["state"]})
        groups.append({**group, "params": fqns})
    return {"state": state, "param_groups": groups}


def load_full_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The whole model's and optimizer's states of a single-file checkpoint (``last.pt``, of a
    run whose student was not sharded) scattered into this run's shards: every rank read the
    whole file; DCP's ``set_*_state_dict(full_state_dict=True)`` keeps each rank's slices."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    want, have = set(model.state_dict()), set(state["model"])  # DCP keeps this run's tensor where one is missing
    if want != have:
        raise KDGraphError(f"the checkpoint's student does not load into this run's sharded one: missing "
                           f"{sorted(want - have)[:3] or 'none'}, unexpected {sorted(have - want)[:3] or 'none'}")
    named = named_optimizer_state(model, optimizer, state["optimizer"])
    try:
        set_model_state_dict(model, state["model"], options=full)
        set_optimizer_state_dict(model, optimizer, named, options=full)
    except (RuntimeError, KeyError, ValueError) as exc:  # torch's: missing or unexpected keys, shapes
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KDGraphError(f"the checkpoint's student does not load into this run's sharded one: {detail}") from None


def load_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The model's and optimizer's states from the DCP checkpoint ``folder``, resharded to this
    run's ranks (or into a whole model in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    states = tensor_states(model, optimizer)
    dcp.load(states, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])


class ShardedCheckpoints:
    """``CheckpointManager``'s interface (``save``, ``written``, ``restore``) for a run whose
    student may be sharded: ``states`` as there; its "model" and "optimizer" go through DCP,
    every other owner into ``state.pt``. Every rank calls ``save`` and ``restore``."""

    def __init__(self, folder, states: dict[str, Any], resume_command: Callable[[], str], info):
        self.folder, self.states, self.resume_command, self.info = folder, states, resume_command, info
        self.writer = ckpt.BackgroundWriter()  # never started (saves are synchronous): the loop joins it

    @property
    def last(self) -> Path:
        return self.folder.sharded_checkpoint

    @property
    def prev(self) -> Path:
        return self.folder.previous_sharded_checkpoint

    @property
    def tmp(self) -> Path:
        return self.folder.sharded_checkpoint_temp

    def save(self) -> None:
        """Every rank writes its shards into the temp folder, rank 0 kdgraph's part; then rank 0
        renames it into place."""
        tensors = tensor_states(self.states["model"], self.states["optimizer"])
        rest = {k: owner.state_dict() for k, owner in self.states.items() if k not in TENSOR_KEYS}
        main, enabled = self.info.is_main, self.info.enabled
        try:
            write_folder(tensors, rest, self.tmp, main, enabled)
            if main:
                rotate(self.tmp, self.last, self.prev)
        except (OSError, ckpt.CheckpointWriteError) as exc:
            raise KDGraphError(f"cannot write checkpoint {self.last}: {exc}; the one before is intact; free space "
                               f"and continue from it with `{self.resume_command()}`") from None
        if enabled:
            dist.barrier()

    def written(self) -> None:
        """Saves are synchronous: nothing is in flight."""

    def latest(self) -> tuple[Path | None, dict[str, Any], str | None]:
        """The last good folder (``last.dcp``, else ``prev.dcp``), its state.pt, and a warning
        where it fell back. A run without DCP folders but with ``last.pt`` (or ``prev.pt``: an
        unsharded run's, continued sharded with --reshard): None, that file's whole state."""
        plain = self.folder.last_checkpoint
        if not (self.last.is_dir() or self.prev.is_dir()) and (plain.is_file() or ckpt.previous_of(plain).is_file()):
            state, warning = ckpt.load_latest(plain, data="mmap")  # every rank reads it: one copy, in the page cache
            return None, state, warning
        try:
            return self.last, read_folder(self.last), None
        except KDGraphError as exc:
            if not self.prev.is_dir():
                raise
            problem = exc
        try:
            state = read_folder(self.prev)
        except KDGraphError as exc:
            raise KDGraphError(f"{problem}; the previous checkpoint is no good either: {exc}") from None
        return self.prev, state, f"warning: {problem}; continuing from the previous checkpoint {self.prev} instead"

    def restore(self, main: bool) -> tuple[dict[str, Any], str | None]:
        """Check the records, load the shards (resharded to this run), then every other owner."""
        folder, state, warning = self.latest()
        checks = [k for k in ("spec", "plan", "data") if k in self.states]  # refusals before any weight moves
        for key in checks:
            if state.get(key) is not None:
                self.states[key].load_state_dict(state[key])
        if folder is None:  # a single-file checkpoint of the whole student: scattered into the shards
            load_full_tensors(self.states["model"], self.states["optimizer"], state)
        else:
            load_tensors(self.states["model"], self.states["optimizer"], folder)
        for key, owner in self.states.items():
            if key not in TENSOR_KEYS and key not in checks and state.get(key) is not None:
                owner.load_state_dict(state[key])
        return state, warning
