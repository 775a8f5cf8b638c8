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
    s = c.spec
    t = Table(title=f"spec: {s.name}", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("teacher", _model_row(s.teacher) + _teacher_numerics(c.plan) if s.teacher else "none (supervised)")
    t.add_row("student", _model_row(s.student))
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


def stages_table(art: ModelArtifacts) -> Table:
    chosen = {b.cut.node: b.rule for b in art.boundaries}
    t = Table(title=f"{art.role} stages ({type(art.model).__name__}, {len(art.cuts)} cuts)",
              title_justify="left")
    for col in ("#", "ends at", "node", "shape", "layout", "ch", "red.", "cuts", "block end"):
        t.add_column(col)
    for st in art.stages:
        e = st.end
        t.add_row(str(st.index), e.description, e.node, _cut_shape(e), e.layout, str(e.channels),
                  str(e.reduction or "-"), str(len(st.cuts)), chosen.get(e.node, ""))
    for b in art.boundaries:  # depth splits end inside a stage: list them too
        if b.cut.node not in {st.end.node for st in art.stages}:
            e = b.cut
            t.add_row("", e.description, e.node, _cut_shape(e), e.layout, str(e.channels),
                      str(e.reduction or "-"), "", b.rule)
    return t


def _cut_shape(cut) -> str:
    """A cut's shape; a multi-tensor cut's shapes joined by ' + '."""
    return " + ".join(_fmt_shape(m.shape) for m in cut.members)


def blocks_table(c: Compiled) -> Table:
    t = Table(title="blocks (teacher ↔ student)", title_justify="left")
    for col in ("block", "teacher ends at", "student ends at", "shape T / S", "adapter", "params", "rule"):
        t.add_column(col)
    active = c.plan.uses_adapters
    for b in c.pairing.blocks:
        if b.is_head:
            logits = (f"{c.num_classes}-channel noise prediction" if c.spec.denoise is not None
                      else f"{c.num_classes} logits" + (" per pixel" if c.student.dense else ""))
            t.add_row(str(b.index), "head" if c.teacher else "-", "head", logits, "", "", "head")
            continue
        a = b.adapter
        adapter = a.describe() if a else (f"frozen {b.projection.describe()}" if b.projection else "-")
        if a and a.student_format is not None:
            adapter += f" ({a.student_format.layout} {a.student_format.hw[0]}² ↔ " \
                       f"{a.teacher_format.layout} {a.teacher_format.hw[0]}²)"
        if a and not active:
            adapter += " (unused by this method)"
        shapes = f"{_cut_shape(b.teacher)} / {_cut_shape(b.student)}" if b.teacher else _cut_shape(b.student)
        t.add_row(str(b.index), b.teacher.description if b.teacher else "-", b.student.description, shapes, adapter,
                  f"{a.params:,}" if a else "", b.rule)
    for p in c.pairing.pairs:  # loss.pairs: feature losses inside blocks, read by taps
        a = p.adapter
        t.add_row(f"{p.name} ({p.loss})", f"{p.teacher.label} (block {p.teacher_block})",
                  f"{p.student.label} (block {p.student_block})", f"{_cut_shape(p.teacher)} / {_cut_shape(p.student)}",
                  f"lift {a.kind} {a.lift[0]}→{a.lift[1]}" if a else "-", f"{a.lift_params:,}" if a else "", "explicit")
    return t


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
    cache = c.spec.teacher is not None and c.spec.teacher.cache is not None
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
            "proxy": 2.8, "tap": 1.4, "cache": 2.5}
    pos = {}
    for n, d in g.nodes(data=True):
        digits = "".join(ch for ch in n if ch.isdigit())
        x = float(digits) if digits else (0.0 if n == "input" else len(g) / 2)
        if n in ("head_loss", "labels", "tpp_loss"):
            x = max((float("".join(c for c in m if c.isdigit()) or 0) for m in g.nodes), default=1) + 0.6
        offset = {"lift": -0.15, "lower": 0.25, "mse": 0.45, "tpp": 0.6}
        x += next((v for k, v in offset.items() if n.startswith(k)), 0.0)
        pos[n] = (x, rows.get(d["kind"], 1.0) + (0.35 if n.startswith("lower") else 0))
    colors = {"teacher": "#f4a261", "student": "#2a9d8f", "adapter": "#e9c46a", "loss": "#e76f51",
              "input": "#cccccc", "labels": "#cccccc", "proxy": "#f4d3b0", "tap": "#b8e0d2", "cache": "#f4d3b0"}
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
