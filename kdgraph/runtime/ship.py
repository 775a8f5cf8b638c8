"""A student anyone can load: a folder in timm's (and the Hugging Face hub's) layout.

    OUT/                     what `kdgraph export --to OUT` writes
      model.safetensors      the student's own state_dict (when its architecture carries it)
      model.pt2              a torch.export program (when adapters stay that cannot fold)
      config.json            timm's config: architecture, num_classes, model_args, pretrained_cfg
                             (input_size, mean, std, interpolation, crop_pct) and a kdgraph block
      README.md              the model card: pair, method, plan, accuracy, data, command

A StableKD student whose widths differ from its teacher's keeps an adapter F = lower∘lift
(one exact Cs -> Cs affine map) at every cut. ``fold_into_student`` pushes each F into the
layers that consume the cut when every consumer is a 1x1 convolution without padding (its
missing bias goes into the BatchNorm that follows) or a Linear reached through average
pooling and flattening; the folded student has exactly its architecture's keys, so
``timm.create_model("local-dir:OUT", pretrained=True)`` loads it. Otherwise (3x3 convs,
identity shortcuts, norms first) no exact fold exists and the student is exported as a
``torch.export`` program, with the reason in the card. Either way the written file is
loaded back and checked against the distiller's inference path before the export succeeds.

A task whose students ship in another library's layout writes it itself (``Task.ship``) and
names it as a ``FolderLayout`` (the denoise task's: diffusers', ``kdgraph.tasks.denoise.layout``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from kdgraph.errors import KDGraphError
from kdgraph.paths import INCOMPLETE, path_problem
from kdgraph.runtime.chain import ExportedStudent

@dataclass(frozen=True)
class FolderLayout:
    """An export folder of another library's layout that a task's students ship in (the task's
    ``layouts()``): the files that mark it, what it is called in errors, and ``read(compiled,
    folder)``, its weights as the spec's student's state_dict (refusing a folder of another model)."""

    name: str
    files: tuple[str, ...]
    description: str
    read: Callable[[Any, Path], dict]

    def __post_init__(self) -> None:  # an export of another layout over this one removes these files
        LAYOUT_FILES[self.name] = tuple(f for f in self.files if f != CONFIG)

    def holds(self, folder: Path) -> bool:
        return all((folder / f).is_file() for f in self.files)


WEIGHTS = "model.safetensors"
PROGRAM = "model.pt2"
CONFIG = "config.json"
CARD = "README.md"

# Ops through which a per-position affine channel map commutes: x -> A x + b stays
# A (op x) + b (average pooling and reshapes are linear and average constants to themselves).
_COMMUTING_MODULES = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_COMMUTING_FUNCTIONS = {torch.flatten, torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.dropout}
_COMMUTING_METHODS = {"flatten", "view", "reshape", "contiguous"}


class ExportError(KDGraphError):
    """The student could not be exported as asked."""


@dataclass
class Folded:
    model: nn.Module | None  # the student with every adapter folded in, or None
    reason: str | None  # why not, where ``model`` is None


def _commutes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod).__name__ == "SelectAdaptivePool2d":  # timm's head pooling
            return getattr(mod, "pool_type", "") == "avg"
        return isinstance(mod, _COMMUTING_MODULES)
    if node.op == "call_function":
        return node.target in _COMMUTING_FUNCTIONS
    if node.op == "call_method":
        if node.target == "mean":  # a spatial mean, never over channels (dim 1)
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            return bool(dims) and 1 not in dims and -3 not in dims
        return node.target in _COMMUTING_METHODS
    return False


def _consumers(gm: fx.GraphModule, start: fx.Node) -> tuple[list[str], str | None]:
    """The linear layers the value of ``start`` reaches first, through commuting ops only
    (qualified module names), or a reason why F cannot be pushed past every user."""
    found, todo = [], list(start.users)
    while todo:
        node = todo.pop()
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Conv2d) and (mod.kernel_size != (1, 1) or mod.padding not in ((0, 0), 0)
                                               or mod.groups != 1 or mod.padding_mode != "zeros"):
                return [], (f"the cut feeds {node.target}, a {mod.kernel_size[0]}x{mod.kernel_size[1]} "
                            "convolution with padding or groups (a constant does not stay constant at its borders)")
            found.append(node.target)
            continue
        if node.op == "output":
            return [], "the cut's value is also a model output"
        if not _commutes(gm, node):
            what = node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)
            return [], f"the cut feeds {what} ({node.op}), which a channel map does not commute with"
        todo.extend(node.users)
    return found, None


def _bn_after(gm: fx.GraphModule, target: str) -> str | None:
    """The BatchNorm that is the only user of the convolution ``target``, if any."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if len(nodes) != 1 or len(nodes[0].users) != 1:
        return None
    user = next(iter(nodes[0].users))
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.modules.batchnorm._BatchNorm):
        return user.target
    return None


@torch.no_grad()
def fold_into_student(compiled, maps: dict[int, nn.Module]) -> Folded:
    """A copy of the (trained) student with each adapter map ``maps[i]`` (the folded
    lower∘lift after block i) pushed into the layers that consume cut i, or why that
    cannot be done exactly."""
    if not maps:
        return Folded(compiled.student.model, None)
    traced = compiled.student.traced.gm
    model = copy.deepcopy(compiled.student.model).eval()
    calls: dict[str, int] = {}
    for n in traced.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    boundaries = [b.cut.node for b in compiled.student.boundaries]
    by_name = {n.name: n for n in traced.graph.nodes}
    for key, f in sorted(maps.items()):
        if hasattr(f, "maps"):  # adapters.TupleMap: one map per tensor of a multi-tensor cut
            return Folded(None, f"cut {key} carries {f.size} tensors (a multi-tensor cut: the skips of a "
                                "non-sequential network), whose maps are not pushed into the student's layers")
        if not isinstance(f, (nn.Conv2d, nn.Linear)):
            return Folded(None, f"the adapter at cut {key} changes the feature's format (cross-architecture), "
                                "which no layer of the student can absorb")
        a = f.weight.reshape(f.weight.shape[0], -1)
        bias = f.bias
        consumers, reason = _consumers(traced, by_name[boundaries[int(key) - 1]])
        if reason is not None:
            return Folded(None, f"cut {key}: {reason}")
        for target in consumers:
            if calls.get(target, 0) != 1:
                return Folded(None, f"cut {key}: {target} is called {calls.get(target, 0)} times")
            layer = model.get_submodule(target)
            w = layer.weight.reshape(layer.weight.shape[0], -1)
            shift = w @ bias
            layer.weight.copy_((w @ a).reshape(layer.weight.shape))
            if layer.bias is not None:
                layer.bias.add_(shift)
                continue
            bn = _bn_after(traced, target)
            if bn is None:
                return Folded(None, f"cut {key}: {target} has no bias and no BatchNorm after it to take "
                                    "the adapter's offset")
            norm = model.get_submodule(bn)
            norm.running_mean.sub_(shift)
    return Folded(model, None)


def _student_ref(run) -> tuple[str, str]:
    source, _, name = run.student.model.partition(":")
    return source, name


def timm_config(compiled, preprocessing: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """config.json in timm's hub layout (``timm.create_model('local-dir:OUT')`` reads it)."""
    run = compiled.run
    source, name = _student_ref(run)
    kwargs = dict(run.student.kwargs)
    num_classes = kwargs.pop("num_classes", compiled.num_classes)
    model = compiled.student.model
    pretrained_cfg = {
        "input_size": list(preprocessing["input_size"]),
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "interpolation": preprocessing.get("interpolation", "bilinear"),
        "crop_pct": preprocessing.get("crop_pct", 1.0),
        "crop_mode": "center",
        "num_classes": num_classes,
    }
    own = getattr(model, "pretrained_cfg", None) or {}
    for key in ("first_conv", "classifier"):
        if own.get(key):
            pretrained_cfg[key] = own[key]
    if preprocessing.get("label_names"):
        pretrained_cfg["label_names"] = list(preprocessing["label_names"])
    config = {
        "architecture": name if source == "timm" else run.student.model,
        "num_classes": num_classes,
        "num_features": getattr(model, "num_features", None),
        "model_args": kwargs,
        "pretrained_cfg": pretrained_cfg,
        "kdgraph": {"source": run.student.model, **card},
    }
    return config


def model_card(config: dict[str, Any], compiled, card: dict[str, Any]) -> str:
    run, plan = compiled.run, compiled.plan
    pre = config["pretrained_cfg"]
    fmt = card["format"]
    teacher = run.teacher.model if run.teacher else "none"
    lines = [
        f"# {run.name}: {run.student.model}",
        "",
        f"Distilled by kdgraph from `{teacher}` with {plan.method} "
        f"(k = {plan.k} blocks, {plan.n} recompositions, {plan.epochs} epochs).",
        "",
        "| | |", "|---|---|",
        f"| student | `{run.student.model}` {json.dumps(run.student.kwargs)} |",
        f"| teacher | `{teacher}` |",
        f"| top-1 | {_pct(card.get('top1'))} |",
        f"| top-5 | {_pct(card.get('top5'))} |",
        f"| teacher top-1 | {_pct(card.get('teacher_top1'))} |",
        f"| data | {run.data.dataset} (fraction {run.data.fraction}) |",
        f"| input | {pre['input_size']}, mean {_floats(pre['mean'])}, std {_floats(pre['std'])} (on pixels in [0, 1]), "
        f"{card.get('resize', 'resample')} |",
        f"| command | `{card.get('command', 'kdgraph train')}` |",
        "",
        "Training stages:", "",
    ]
    for st in plan.stages:
        groups = " ".join("[" + ",".join(map(str, g)) + "]" for g in st.groups)
        lines.append(f"- stage {st.index}: {st.epochs} epochs, blocks {groups}")
    lines += ["", "## Load it", ""]
    if fmt == "state_dict" and config["architecture"] == _student_ref(run)[1] and run.student.model.startswith("timm:"):
        lines += ["```python", "import timm",
                  "model = timm.create_model('local-dir:PATH/TO/THIS/FOLDER', pretrained=True).eval()",
                  "cfg = timm.data.resolve_data_config(model=model)",
                  "transform = timm.data.create_transform(**cfg)", "```"]
    elif fmt == "state_dict":
        lines += [f"`{WEIGHTS}` is the state_dict of `{run.student.model}` built with the kwargs above "
                  "(`load_state_dict(safetensors.torch.load_file(...))`)."]
    else:
        lines += [f"The student keeps adapters its architecture cannot absorb ({card['reason']}), so it is "
                  f"a `torch.export` program:", "", "```python", "import torch",
                  f"model = torch.export.load('PATH/TO/THIS/FOLDER/{PROGRAM}').module()", "```"]
    lines += ["", f"Normalise inputs with the mean and std above (pixels scaled to [0, 1]); `{CONFIG}` "
              "records them in timm's `pretrained_cfg`.", ""]
    return "\n".join(lines)


def _pct(v) -> str:
    return f"{v:.2f} %" if isinstance(v, (int, float)) else "not measured"


def _floats(v) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in v) + "]"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_destination(folder: Path) -> Path:
    """``folder`` if an export may be written there: absent, empty, or an earlier kdgraph
    export (its config.json carries a kdgraph block). Export replaces README.md and
    config.json, so any other folder (a repository, a user's own model) is refused."""
    folder = Path(folder)
    if (problem := path_problem(folder)) is not None:
        raise ExportError(f"export --to {str(folder)[:200]} {problem}")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"export --to {folder}: a file is there; name a folder (it will hold "
                          f"{WEIGHTS}, {CONFIG} and {CARD})")
    if not folder.is_dir() or not any(folder.iterdir()) or _is_export(folder):
        return folder
    raise ExportError(f"export --to {folder}: the folder holds files and is not a kdgraph export (no {CONFIG} "
                      f"with a kdgraph block); export writes {WEIGHTS} or {PROGRAM}, {CONFIG} and {CARD}, "
                      "replacing files of those names: name a new or empty folder")


# INCOMPLETE (kdgraph.paths): while an export writes (left by a killed one: a rerun writes over it)


def _begin_export(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INCOMPLETE).write_text("kdgraph export was writing this folder; run it again\n")
    return folder


def _is_export(folder: Path) -> bool:
    from kdgraph.lm.hf_export import RECORD as HF_RECORD

    if (folder / INCOMPLETE).is_file():
        return True
    try:
        record = json.loads((folder / HF_RECORD).read_text())  # a causal LM's Hugging Face folder
    except (OSError, ValueError, UnicodeDecodeError):
        record = None
    if isinstance(record, dict) and "weights_from" in record:
        return True
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and (isinstance(config.get("kdgraph"), dict)
                                         or isinstance(config.get("_kdgraph"), dict))


LAYOUT_FILES: dict[str, tuple[str, ...]] = {}  # every FolderLayout's files but config.json, by layout name


def _register_every_layout() -> None:
    """Ask every registered task for its layouts: a ``FolderLayout`` registers its files when
    it is made, and a task's layout module may not be imported yet in this process (an export
    of one layout over another's, the first thing a process does)."""
    from kdgraph.registry import TASKS

    for name in TASKS:
        TASKS.get(name).layouts()


def clear_earlier_export(folder: Path) -> None:
    """Remove what an earlier kdgraph export in ``folder`` wrote, by its config's block (timm's
    layout, a ``kdgraph`` block: weights or program and card; another library's layout, a
    ``_kdgraph`` block: the files of the registered ``FolderLayout``s), so that an export of the
    other layout leaves none of it beside its own files; nothing else there is touched."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return
    block = config.get("kdgraph") if isinstance(config, dict) else None
    theirs = config.get("_kdgraph") if isinstance(config, dict) else None
    if isinstance(theirs, dict):
        _register_every_layout()
    ours = (WEIGHTS, PROGRAM, CARD) if isinstance(block, dict) else \
        tuple(f for files in LAYOUT_FILES.values() for f in files) if isinstance(theirs, dict) else ()
    for name in ours:
        (folder / name).unlink(missing_ok=True)


@torch.no_grad()
def ship_student(compiled, maps: dict[int, nn.Module], folder: Path, preprocessing: dict[str, Any],
                 card: dict[str, Any] | None = None, *, atol: float = 1e-4) -> dict[str, Any]:
    """Write the shippable student to ``folder`` and check it against the trained inference
    path (``compiled.student.model`` holding the trained weights, ``maps`` the folded
    adapter after each block that keeps one).

    Returns what was written: {"folder", "format" (state_dict | torch.export), "reason"}.
    """
    from safetensors.torch import save_file

    folder = _begin_export(check_destination(folder))

    card = dict(card or {})
    c, h, w = compiled.input_size
    probe = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(0))
    device = next(compiled.student.model.parameters()).device
    probe = probe.to(device)
    trained = (ExportedStudent.of(compiled, maps) if maps else compiled.student.model).eval()
    reference = trained(probe).float()
    folded = fold_into_student(compiled, maps)
    clear_earlier_export(folder)  # a diffusers export's weights too
    for stale in (WEIGHTS, PROGRAM):
        (folder / stale).unlink(missing_ok=True)
    if folded.model is not None:
        model = folded.model.eval()
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        check = copy.deepcopy(compiled.student.model).to(device).eval()
        from safetensors.torch import load_file

        check.load_state_dict({k: v.to(device) for k, v in load_file(str(folder / WEIGHTS)).items()}, strict=True)
        got = check(probe).float()
        card.update(format="state_dict", reason=None)
    else:
        module = trained
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        try:
            program = torch.export.export(module, (probe,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:  # torch.export's errors name no common base class
            raise ExportError(f"the student keeps adapters that cannot fold ({folded.reason}) and "
                              f"torch.export could not capture it: {str(exc).splitlines()[0]}") from None
        torch.export.save(program, str(folder / PROGRAM))
        got = torch.export.load(str(folder / PROGRAM)).module()(probe).float()
        card.update(format="torch.export", reason=folded.reason)
    err = (got - reference).abs().max().item()
    scale = reference.abs().max().item() + 1e-6
    if err > atol * max(1.0, scale):
        raise ExportError(f"the exported student differs from the trained one by {err:.3g} "
                          f"(max |logit| {scale:.3g}); nothing usable was written to {folder}")
    config = timm_config(compiled, preprocessing, card)
    _write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    _write_text(folder / CARD, model_card(config, compiled, card))
    (folder / INCOMPLETE).unlink()
    return {"folder": str(folder), "format": card["format"], "reason": card["reason"], "max_abs_diff": err}
