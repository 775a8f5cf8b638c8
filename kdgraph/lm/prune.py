"""A student initialised from its teacher by depth pruning (``student.from_teacher_layers``).

Student decoder layer i starts as teacher layer ``keep[i]``, parameter for parameter and
buffer for buffer; every tensor outside the decoder stack (token embedding, position
embedding, final norm, head) is the teacher's. ``{every: k}`` keeps teacher layers k-1, 2k-1,
...: the k-th, 2k-th, ... layer, the ones Minitron's depth pairing (student layer i ↔ teacher
layer round((i + 1)·Lt / Ls) − 1) pairs the student's layers with when Lt = k·Ls.

The decoder stack is found from the model, not per family: the ``nn.ModuleList`` of
``config.num_hidden_layers`` modules of one class (``lm.model.layers`` of Llama, Qwen,
Mistral, Phi-3, Gemma-2; ``lm.transformer.h`` of GPT-2). The copy is refused, with one line
naming the first difference, where the kept layers or the rest do not have the teacher's
shapes (another width, head count or vocabulary) or the student has another number of layers.
"""

from __future__ import annotations

import torch
from torch import nn

from kdgraph.errors import SpecError

__all__ = ["decoder_layers", "init_from_teacher_layers", "kept_layers"]

AT = "student.from_teacher_layers"


def decoder_layers(model: nn.Module, role: str) -> tuple[str, nn.ModuleList]:
    """(path, list) of ``model``'s decoder layers: its one ModuleList of ``config.num_hidden_layers``
    modules of the same class."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise SpecError(AT, f"the {role} ({type(model).__name__}) has no config.num_hidden_layers; "
                            "copying decoder layers needs transformers: models")
    found = [(path, m) for path, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1]
    if len(found) != 1:
        raise SpecError(AT, f"the {role} has {len(found)} lists of {n} layers of one class where one decoder "
                            f"stack was expected ({', '.join(p for p, _ in found) or 'none'})")
    return found[0]


def kept_layers(keep, teacher_layers: int) -> list[int]:
    """The teacher layer indices a ``from_teacher_layers`` value keeps (a list, or ``EveryLayer``)."""
    if not isinstance(keep, list):
        every = int(keep.every)
        if every > teacher_layers:
            raise SpecError(AT, f"every {every}th layer of a teacher of {teacher_layers} layers keeps none; "
                                f"allowed: 1..{teacher_layers}")
        return list(range(every - 1, teacher_layers, every))
    if (bad := [i for i in keep if i >= teacher_layers]):
        raise SpecError(AT, f"teacher layer {bad[0]} is out of range: the teacher has {teacher_layers} layers "
                            f"(0..{teacher_layers - 1})")
    return list(keep)


def _shape(t: torch.Tensor) -> str:
    return "×".join(map(str, t.shape)) or "scalar"


def _check(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], where: str,
           prefix: str = "") -> None:
    """Every student tensor has a teacher tensor of that name and shape (``where`` says whose;
    the student's tensors are named ``prefix + name``)."""
    for name, tensor in student.items():
        if name not in teacher:
            raise SpecError(AT, f"{where}: the teacher has no {name} (the models differ in architecture)")
        if teacher[name].shape != tensor.shape:
            raise SpecError(AT, f"{where}: {prefix}{name} is {_shape(tensor)} in the student, {_shape(teacher[name])} in "
                                "the teacher; copied layers need the teacher's width, heads and vocabulary")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict(keep_vars=True)


def init_from_teacher_layers(teacher: nn.Module, student: nn.Module, keep) -> str:
    """Copy teacher layer ``kept_layers(keep)[i]`` into student layer i and every tensor outside
    the decoder stack into the student; returns the plan's note. Raises SpecError (one line)
    before copying anything where the shapes, names or layer counts differ."""
    t_path, t_layers = decoder_layers(teacher, "teacher")
    s_path, s_layers = decoder_layers(student, "student")
    kept = kept_layers(keep, len(t_layers))
    if len(kept) != len(s_layers):
        raise SpecError(AT, f"{len(kept)} teacher layers kept ({kept}) for a student of {len(s_layers)} layers; "
                            f"set the student's num_hidden_layers to {len(kept)}")
    prefix = lambda path: path + "."  # noqa: E731
    s_rest = {k: v for k, v in _state(student).items() if not k.startswith(prefix(s_path))}
    t_rest = {k: v for k, v in _state(teacher).items() if not k.startswith(prefix(t_path))}
    _check(s_rest, t_rest, "outside the decoder layers")
    for i, j in enumerate(kept):
        _check(_state(s_layers[i]), _state(t_layers[j]), f"student layer {i} from teacher layer {j}",
               f"{s_path}.{i}.")
    if len({p.is_meta for p in [*teacher.parameters(), *student.parameters()]}) > 1:
        raise SpecError(AT, "the teacher is built without weights here (on the meta device), so its layers "
                            "cannot be copied into a student with weights")
    with torch.no_grad():
        for name, tensor in s_rest.items():
            tensor.copy_(t_rest[name])
        for i, j in enumerate(kept):
            t_state = _state(t_layers[j])
            for name, tensor in _state(s_layers[i]).items():
                tensor.copy_(t_state[name])
    return (f"student.from_teacher_layers: student layers 0..{len(kept) - 1} ({s_path}) start as teacher layers "
            f"{kept} ({t_path}); {len(s_rest)} other tensors (embedding, norm, head) copied from the teacher")
