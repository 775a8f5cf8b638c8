"""Pass 3's second front end: trace a model with ``torch.export`` where torch.fx cannot.

A Hugging Face decoder (``transformers:`` models, ``kdgraph.lm.source.CausalLM``) does not
trace with ``torch.fx.symbolic_trace`` (transformers removed its own fx tracer), but
``torch.export.export`` takes it: its ATen-level graph, unlifted with
``ExportedProgram.module()``, is a ``torch.fx.GraphModule`` whose parameters are the model's
own and whose nodes keep the module path they were called from (``nn_module_stack``) and a
fake value of their output (``val``). Everything after pass 3 reads only that, so the cut
finder, the split and the pairing work on it as on an fx trace.

A model says it takes token ids (``takes_tokens = True``): its input is a (B, T) integer
tensor, T = ``input_size[-1]`` (a sequence is a 1×T grid of tokens: its hidden states
(B, T, D) are ``tokens`` features of reduction 1). With the sequence length fixed, the
rotary tables, positions and masks a decoder computes are functions of constants, not of
the tokens: no cut counts them, and every block segment recomputes the ones it reads.
The model is exported in eval mode: dropout is frozen off in the graph (Llama-style configs
have none; GPT-2's default of 0.1 is not applied).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from kdgraph.compiler.repeat import shallow_export
from kdgraph.errors import TraceError
from kdgraph.ir import NodeInfo

if TYPE_CHECKING:
    from kdgraph.compiler.artifacts import TracedModel

__all__ = ["is_batch_read", "node_infos", "takes_tokens", "trace_exported"]


def node_infos(gm: torch.fx.GraphModule, primary: torch.fx.Node,
               side_nodes: list[torch.fx.Node]) -> dict[str, NodeInfo]:
    """Every node's NodeInfo (an fx trace's or an exported graph's): whether it depends on the
    input (``primary``; not through a batch read alone, ``is_batch_read``), or on the side
    inputs alone."""
    dependent: set[torch.fx.Node] = {primary}
    side: set[torch.fx.Node] = set(side_nodes)
    infos: dict[str, NodeInfo] = {}
    for index, node in enumerate(gm.graph.nodes):
        if node is not primary and not is_batch_read(node) and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
        elif any(a in side for a in node.all_input_nodes):
            side.add(node)
        meta = node.meta.get("tensor_meta")
        is_tensor = meta is not None and hasattr(meta, "shape")
        stack = node.meta.get("nn_module_stack") or {}
        infos[node.name] = NodeInfo(
            name=node.name,
            op=node.op,
            index=index,
            modules=tuple(path for path, _ in stack.values()),
            shape=tuple(meta.shape) if is_tensor else None,
            dtype=str(meta.dtype).replace("torch.", "") if is_tensor else None,
            input_dependent=node in dependent,
            side_dependent=node in side,
        )
    return infos


def takes_tokens(model: nn.Module) -> bool:
    """True for a model fed token ids (B, T), traced with torch.export."""
    return bool(getattr(model, "takes_tokens", False))


def _export(model: nn.Module, sample: torch.Tensor, role: str, symbolic_batch: bool) -> torch.fx.GraphModule:
    """``torch.export`` of ``model`` on ``sample``, in eval mode, without the per-node Python stack
    traces (kdgraph reads none; recording them is about a tenth of the export). ``symbolic_batch``:
    the batch dimension stays symbolic, so the blocks run on any batch (of 2 or more); without
    it (a plan whose graphs never run) every shape is the sample's, which traces in about half
    the time (no symbolic shape reasoning per op) and gives the same cuts, stages and pairs."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    emit = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        dynamic = ({0: torch.export.Dim.DYNAMIC},) if symbolic_batch else None
        program = torch.export.export(model, (sample,), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "not exportable"
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise TraceError(f"torch.export cannot trace the {role} ({type(model).__name__}): "
                         f"{type(exc).__name__}: {text}") from exc
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit
        for m, mode in modes.items():
            m.training = mode
    return program.module()


def _plain(gm: torch.fx.GraphModule) -> None:
    """The graph as an fx trace has it: no input-guard call (``ExportedProgram.module()``
    checks the sample's shape; the split's segments take other tensors), the input before the
    parameters' get_attr nodes, plain positional code instead of export's pytree in/out, and a
    single output returned as that tensor."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards"):
            delattr(gm, name)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    first = next(iter(gm.graph.nodes))
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        if node is not first:
            first.prepend(node)  # the input first, as fx traces it (the split feeds node 0)
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    gm.graph.lint()
    gm.recompile()


def is_batch_read(node: torch.fx.Node) -> bool:
    """``sym_size(x, 0)``: the batch size read from a tensor (export keeps the batch symbolic).
    It depends on the input's shape, not its values: every block reads it from its own input
    (``split``), so no cut counts it, nor what is computed from it and constants alone (the
    positions, rotary tables and masks expanded to the batch)."""
    return node.op == "call_function" and node.target is torch.ops.aten.sym_size.int and node.args[1:] == (0,)


def _module_stacks(gm: torch.fx.GraphModule, root: nn.Module, batch: int) -> None:
    """Module paths as fx gives them: export names every module from the root, the root itself
    '' (dropped); a path the model does not have is dropped."""
    paths = {name for name, _ in root.named_modules()}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        node.meta["nn_module_stack"] = {key: (path, cls) for key, (path, cls) in stack.items()
                                        if path and path in paths}
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):  # the symbolic batch as the sample's
            meta = _extract_tensor_metadata(val)
            node.meta["tensor_meta"] = meta._replace(shape=torch.Size(
                d if isinstance(d, int) else batch for d in val.shape))


def trace_exported(model: nn.Module, input_size: tuple[int, ...], role: str = "student",
                   batch_size: int = 2, lazy: bool = False) -> TracedModel:
    """``model`` (token ids (B, T) -> logits) traced with torch.export at T = ``input_size[-1]``.

    After: as ``trace.trace``: every node has a NodeInfo, tensor nodes their shapes, the
    GraphModule shares ``model``'s parameters; its one placeholder is the token ids. A model
    on the meta device is exported on meta tensors (no arithmetic). ``lazy`` (planning: the
    graph never runs): the batch is the static ``batch_size``, not symbolic (``_export``), and a
    decoder deeper than its layers' period is exported from a shallow copy (``repeat``)."""
    from kdgraph.compiler.artifacts import TracedModel  # here: split imports this module, keep it low

    meta = any(p.is_meta for p in model.parameters())
    sample = torch.zeros(batch_size, int(input_size[-1]), dtype=torch.long, device="meta" if meta else "cpu")
    # a plan's deep decoder: its shallow copy exported, the layers repeated (kdgraph.compiler.repeat)
    gm = (shallow_export(model, sample, role, _export) if lazy else None) \
        or _export(model, sample, role, symbolic_batch=not lazy)
    _plain(gm)
    _module_stacks(gm, model, batch_size)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"the {role}'s exported graph takes {len(placeholders)} inputs; kdgraph feeds token ids only")
    return TracedModel(role=role, model=model, gm=gm, input_size=tuple(input_size),
                       nodes=node_infos(gm, placeholders[0], []))
