"""Human-readable renderings of compiler artifacts: rich tables and a PNG of the block graph."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
from rich.console import Group
from rich.table import Table
from rich.text import Text

from kdgraph.compiler.blockgraph import node_label
from kdgraph.errors import KDGraphError
from kdgraph.paths import path_problem
from kdgraph.registry import METHODS
from kdgraph.tasks.create import task_class

if TYPE_CHECKING:
    from kdgraph.compiler import Compiled, ModelArtifacts


def _fmt_shape(shape) -> str:
    return "×".join(map(str, shape)) if shape else "-"


def _model_row(m) -> str:
    weights = f" <- {m.checkpoint}" if m.checkpoint else (" <- pretrained" if m.pretrained else "")
    return f"{m.model} {m.kwargs or ''}{weights}"


def _teacher_numerics(plan) -> str:
    """What the teacher's weights are kept and computed in, and where."""
    return f"; runs in {plan.teacher_dtype}" + (", sharded over torchrun's ranks (FSDP2)" if plan.teacher_shard else "")


def spec_table(c: Compiled) -> Table:
    s = c.run
    t = Table(title=f"spec: {s.name}", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("teacher", _model_row(s.teacher) + _teacher_numerics(c.plan) if s.teacher else "none (supervised)")
    t.add_row("student", _model_row(s.student))
    t.add_row("task", c.task + ("" if s.task else " (inferred)"))
    m = s.data.mixup
    t.add_row("data", f"{s.data.dataset}, input {_fmt_shape(c.input_size)}, batch {s.data.batch_size}, "
                      f"fraction {s.data.fraction}" + (
                          f"; mixup α {m.mixup_alpha} / cutmix α {m.cutmix_alpha} (p {m.prob}, switch {m.switch_prob}) "
                          "on the batch teacher and student both see" if m else ""))
    t.add_row("loader", str(c.data) + (f", runtime.num_workers {s.runtime.num_workers}" if c.data.loader == "stream" else ""))
    t.add_row("method", f"{s.schedule.method}, {s.schedule.epochs} epochs, {s.decompose.blocks} blocks"
                        + (f", {s.schedule.recompositions} recompositions" if METHODS.get(s.schedule.method).decomposes else ""))
    for nodes, entry, params in loss_nodes(c.graph):
        t.add_row("loss" if nodes == "head_loss" else "", f"{nodes}: {entry}" + (f" ({params})" if params else ""))
    t.add_row("optim", f"{s.optim.name} lr {s.optim.lr} wd {s.optim.weight_decay}, {s.optim.lr_schedule}")
    r = s.runtime
    t.add_row("runtime", f"device {r.device}, precision {r.precision}, compile {r.compile}, "
                         f"channels_last {r.channels_last}")
    t.add_row("output", str(s.output_dir))
    return t


def loss_nodes(g: nx.DiGraph) -> list[tuple[str, str, str]]:
    """(loss nodes, their LOSSES entry, its params) of the block graph, head first; the feature
    losses of every block end with the same params on one row (``mse1..mse3``)."""
    rows: dict[tuple[str, str], list[str]] = {}
    for n, d in sorted(g.nodes(data=True), key=lambda nd: (nd[1].get("loss") != "head", nd[1].get("block", 0))):
        if d["kind"] == "loss":
            params = ", ".join(f"{k} {v}" for k, v in d["params"].items() if k != "fmt")
            rows.setdefault((d["entry"], params), []).append(n)
    return [(names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}", entry, params)
            for (entry, params), names in rows.items()]


STAGE_ROWS = 12  # more stages than this and the stages table keeps only the block ends


def stages_table(art: ModelArtifacts) -> Table:
    """One row per stage; where there are more than ``STAGE_ROWS`` (a U-Net's cuts inside every
    residual block), one per block end and a row that counts the rest: `kdgraph plan --format
    json` lists every cut."""
    if len(art.stages) > STAGE_ROWS:
        return _block_ends_table(art)
    chosen = {b.cut.node: b.rule for b in art.boundaries}
    t = Table(title=f"{art.role} stages ({type(art.model).__name__}, {len(art.cuts)} cuts)",
              title_justify="left")
    for col in ("#", "ends at", "node", "shape", "layout", "ch", "red.", "cuts", "block end"):
        t.add_column(col)
    for st in art.stages:
        e = st.end
        t.add_row(str(st.index), cut_name(e), e.node, cut_shape(e), e.layout, str(e.channels),
                  str(e.reduction or "-"), str(len(st.cuts)), chosen.get(e.node, ""))
    for b in art.boundaries:  # depth splits end inside a stage: list them too
        if b.cut.node not in {st.end.node for st in art.stages}:
            e = b.cut
            t.add_row("", cut_name(e), e.node, cut_shape(e), e.layout, str(e.channels),
                      str(e.reduction or "-"), "", b.rule)
    return t


def _block_ends_table(art: ModelArtifacts) -> Table:
    """The stages table of a model with many: the block ends, then the other stages as a count."""
    stage_of = {c.node: st for st in art.stages for c in st.cuts}
    t = Table(title=f"{art.role} block ends ({type(art.model).__name__}: {len(art.cuts)} cuts in "
                    f"{len(art.stages)} stages)", title_justify="left")
    for col in ("#", "ends at", "tensors", "red.", "cuts", "block end"):
        t.add_column(col)
    for b in art.boundaries:
        e, st = b.cut, stage_of.get(b.cut.node)
        t.add_row(str(st.index) if st else "", cut_name(e), cut_shape(e) if e.multi else _square(e.shape),
                  str(e.reduction or "-"), str(len(st.cuts)) if st else "", b.rule)
    ends = {stage_of[b.cut.node].index for b in art.boundaries if b.cut.node in stage_of}
    rest = [st for st in art.stages if st.index not in ends]
    t.add_row("", f"{len(rest)} other stages", "(--format json)", "", str(sum(len(st.cuts) for st in rest)),
              "")
    return t


def _square(shape) -> str:
    """``16×28²`` for a square map, else ``16×28×14``."""
    if len(shape) == 3 and shape[1] == shape[2]:
        return f"{shape[0]}×{shape[1]}²"
    return _fmt_shape(shape)


def cut_shape(cut) -> str:
    """A cut's shape; for a multi-tensor cut the count and its tensors' shapes in graph order,
    a run of one shape written once with its count: ``7 tensors: 8×16² (2), 16×8² (2), 64×2²``."""
    if not cut.multi:
        return _fmt_shape(cut.shape)
    return f"{len(cut.tensors)} tensors: {_shape_list(cut)}"


def _shape_list(cut) -> str:
    runs: list[list] = []
    for m in cut.tensors:
        if runs and runs[-1][0] == m.shape:
            runs[-1][1] += 1
        else:
            runs.append([m.shape, 1])
    return ", ".join(_square(shape) + (f" ({n})" if n > 1 else "") for shape, n in runs)


MANY_TENSORS = 4  # a block end carrying more is summarised in the blocks table: the block-ends tables list it


def pair_shapes(teacher, student) -> str:
    """``T / S`` shapes of a block end, the tensor count said once; ``(both)`` when they agree;
    only the counts where either carries more than ``MANY_TENSORS``."""
    if teacher is None:
        return cut_shape(student)
    if max(len(teacher.members), len(student.members)) > MANY_TENSORS:
        return f"{len(teacher.members)} / {len(student.members)} tensors (shapes above)"
    t, s = cut_shape(teacher), cut_shape(student)
    if t == s:
        return f"{t} (both)"
    if teacher.multi and student.multi and len(teacher.tensors) == len(student.tensors):
        return f"{len(teacher.tensors)} tensors: {_shape_list(teacher)} / {_shape_list(student)}"
    return f"{t} / {s}"


def cut_name(cut) -> str:
    """A cut's label; a multi-tensor cut's with its tensors' (``enc2 (+ enc1)``), the first and
    last three where it carries more than four."""
    if not cut.multi:
        return cut.label
    others = [m.label for m in cut.tensors[:-1]]
    if len(others) > 4:
        others = others[:1] + ["…"] + others[-2:]
    return f"{cut.label} (+ {', '.join(others)})"


def _token_logits(c: Compiled) -> str:
    """A causal LM's head: its vocabulary per token (the teacher's where it differs, a padded one)."""
    vocab = [a.output_shape[-1] for a in (c.teacher, c.student) if a is not None]
    return f"{' / '.join(map(str, dict.fromkeys(vocab)))} logits per token"


def blocks_table(c: Compiled) -> Table:
    t = Table(title="blocks (teacher ↔ student)", title_justify="left")
    for col in ("block", "teacher ends at", "student ends at", "shape T / S", "adapter", "rule"):
        t.add_column(col)
    active = c.plan.uses_adapters
    heads = task_class(c.task).render_heads(c)  # a task's own rows for its named heads (None: one head row)
    for b in c.pairing.blocks:
        if b.is_head and heads is not None:
            for name, text in heads:
                only_teacher = text.endswith("(teacher only)")
                t.add_row(str(b.index), f"head {name}" if c.teacher and not text.endswith("(student only)") else "-",
                          "-" if only_teacher else f"head {name}", text, "", "head")
            continue
        if b.is_head:
            logits = (f"{c.num_classes}-channel noise prediction" if c.run.denoise is not None
                      else _token_logits(c) if c.num_classes is None and c.student.output_shape
                      else f"{c.num_classes} logits")
            t.add_row(str(b.index), "head" if c.teacher else "-", "head", logits, "", "head")
            continue
        a = b.adapter
        adapter = _adapter_text(a) if a else (f"frozen {b.projection.describe()}" if b.projection else "-")
        if a and a.student_format is not None:
            adapter += f" ({a.student_format.layout} {a.student_format.hw[0]}² ↔ " \
                       f"{a.teacher_format.layout} {a.teacher_format.hw[0]}²)"
        if a:
            adapter += f", {a.params:,} params" + (" (unused by this method)" if not active else "")
        shapes = pair_shapes(b.teacher, b.student)
        t.add_row(str(b.index), b.teacher.label if b.teacher else "-", b.student.label, shapes, adapter, b.rule)
    for p in c.pairing.pairs:  # loss.pairs: feature losses inside blocks, read by taps
        a = p.adapter
        t.add_row(f"{p.name} ({p.loss})", f"{p.teacher.label} (block {p.teacher_block})",
                  f"{p.student.label} (block {p.student_block})", f"{cut_shape(p.teacher)} / {cut_shape(p.student)}",
                  f"lift {a.kind} {a.lift[0]}→{a.lift[1]}, {a.lift_params:,} params" if a else "-", "explicit")
    return t


def _adapter_text(a) -> str:
    """The adapter's description; at a multi-tensor cut its parts in runs of one width, the kind
    said once where they share it (``conv1x1 per tensor: 4→8→4 (2), 8→16→8 (2), …``; ``-`` for a
    tensor with none)."""
    parts = getattr(a, "parts", None)
    if parts is None:
        return a.describe()
    kinds = {p.kind for p in parts if p}
    shared = len(kinds) == 1
    runs: list[list] = []
    for part in parts:
        text = "-" if not part else (f"{part.lift[0]}→{part.lift[1]}→{part.lower[1]}" if shared else part.describe())
        if runs and runs[-1][0] == text:
            runs[-1][1] += 1
        else:
            runs.append([text, 1])
    return (f"{kinds.pop()} per tensor: " if shared else f"{a.kind}: ") + \
        ", ".join(text + (f" ({n})" if n > 1 else "") for text, n in runs)


def side_table(c: Compiled) -> Table | None:
    """The side inputs and, per block, the side tensors it reads (None without side inputs)."""
    models = [a for a in (c.teacher, c.student) if a is not None and a.traced is not None and a.traced.side]
    if not models:
        return None
    t = Table(title="side inputs (no cut carries them: every block receives the side tensors it reads)",
              title_justify="left")
    for col in ("model", "inputs", "block", "side tensors"):
        t.add_column(col)
    for art in models:
        inputs = ", ".join(f"{s.name}: {s.kind} < {s.high}" for s in art.traced.side)
        for i, tensors in enumerate(art.side_tensors(), start=1):
            shapes = sorted({_fmt_shape(d["shape"]) for d in tensors})
            modules = ", ".join(dict.fromkeys(d["module"] or d["node"] for d in tensors))
            what = f"{len(tensors)} ({' / '.join(shapes)}): {modules}" if tensors else "-"
            t.add_row(art.role if i == 1 else "", inputs if i == 1 else "", str(i), what)
    return t


def schedule_table(c: Compiled) -> Table:
    p = c.plan
    title = f"schedule: {p.method}" + (f"-{p.k}/{p.n}" if METHODS.get(p.method).decomposes else "") + (
        f", TPP proxy path from block {p.tpp_block}" if p.tpp_block else "")
    t = Table(title=title, title_justify="left")
    cache = c.run.teacher is not None and c.run.teacher.cache is not None
    for col in ("stage", "epochs", "groups", "losses") + (("teacher",) if cache else ()):
        t.add_column(col)
    if p.projection_fit is not None:  # a stage of its own: no epochs, teacher features of a few batches
        t.add_row("fit", "-", f"PCA of the teacher at block ends {', '.join(map(str, p.projection_fit.blocks))} "
                  f"({p.projection_fit.batches} batches), then frozen", "")
    for st in p.stages:
        groups = "  ".join("[" + ",".join(map(str, g)) + "]" for g in st.groups)
        losses = "  ".join("+".join(terms) for terms in st.losses)
        teacher = ("cache" if st.program.reads_cache else "live") if cache else None
        t.add_row(str(st.index), str(st.epochs), groups, losses, *((teacher,) if cache else ()))
    return t


def plan_view(c: Compiled) -> Group:
    parts = [spec_table(c)]
    if c.teacher:
        parts.append(stages_table(c.teacher))
    side = side_table(c)
    parts += [stages_table(c.student), blocks_table(c), *([side] if side is not None else []), schedule_table(c)]
    parts += [Text(f"note: {note}") for note in c.notes]
    return Group(*parts)


def draw_block_graph(g: nx.DiGraph, path: Path, title: str = "") -> Path:
    """A left-to-right drawing: teacher row on top, adapters and losses between, student below.

    ``path`` may be a folder (the drawing goes in as ``<title>.png``); returns the file written.
    Raises KDGraphError when it cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"teacher": 2.0, "adapter": 1.0, "loss": 0.5, "student": 0.0, "input": 1.0, "labels": -0.6,
            "proxy": 2.8, "tap": 1.4, "cache": 2.5, "projection": 1.0}
    pos = {}
    for n, d in g.nodes(data=True):
        digits = "".join(ch for ch in n if ch.isdigit())
        x = float(digits) if digits else (0.0 if n == "input" else len(g) / 2)
        if n in ("head_loss", "labels", "tpp_loss"):
            x = max((float("".join(c for c in m if c.isdigit()) or 0) for m in g.nodes), default=1) + 0.6
        offset = {"lift": -0.15, "lower": 0.25, "project": 0.25, "mse": 0.45, "tpp": 0.6}
        x += next((v for k, v in offset.items() if n.startswith(k)), 0.0)
        pos[n] = (x, rows.get(d["kind"], 1.0) + (0.35 if n.startswith("lower") else 0))
    colors = {"teacher": "#f4a261", "student": "#2a9d8f", "adapter": "#e9c46a", "loss": "#e76f51",
              "input": "#cccccc", "labels": "#cccccc", "proxy": "#f4d3b0", "tap": "#b8e0d2", "cache": "#f4d3b0",
              "projection": "#e9c46a"}
    fig, ax = plt.subplots(figsize=(max(8, len(g) * 1.1), 6))
    styles = {"adapted": "dashed", "decompose": "solid", "loss": "dotted", "proxy": "dashed", "tap": "dotted",
              "cache": "dashed"}
    for kind in ("teacher", "student", "adapted", "decompose", "loss", "proxy", "tap", "cache"):
        edges = [(u, v) for u, v, d in g.edges(data=True) if d["kind"] == kind]
        nx.draw_networkx_edges(g, pos, edgelist=edges, ax=ax, style=styles.get(kind, "solid"),
                               alpha=0.7, arrows=True, arrowsize=10)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=[colors[d["kind"]] for _, d in g.nodes(data=True)],
                           node_size=900, node_shape="s", alpha=0.85)
    # the labels DOT and Mermaid show: name, module or adapter kind and widths, output shape
    labels = {n: node_label(n, d).replace("\\n", "\n") for n, d in g.nodes(data=True)}
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=6)
    ax.set_title(title)
    ax.axis("off")
    path = Path(path)
    if path_problem(path) is None and path.is_dir():
        path = path / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', title)[:200] or 'block-graph'}.png"
    if (problem := path_problem(path)) is not None:
        plt.close(fig)
        raise KDGraphError(f"cannot write --png {str(path)[:200]}: the path {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise KDGraphError(f"cannot write --png {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an extension matplotlib has no writer for
        raise KDGraphError(f"cannot write --png {path}: {str(exc).splitlines()[0]}") from None
    finally:
        plt.close(fig)
    return path
