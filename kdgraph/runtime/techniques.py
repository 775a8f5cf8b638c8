"""Runtime techniques, each one small function, applied in one fixed order by the loop:
device -> distributed -> cuDNN autotuning -> channels_last -> teacher sharding (FSDP2) -> autocast
(+ gradient scaler) -> compile -> DDP wrap."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdgraph.errors import SpecError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpecError("runtime.device", f"'{name}' asked for, but no CUDA device is visible; use auto or cpu")
        if name == "cuda":
            name = f"cuda:{dist_info.local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def init_distributed() -> DistInfo:
    """DDP when launched by torchrun (RANK and WORLD_SIZE set): nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def use_cudnn_benchmark(device: torch.device, deterministic: bool) -> bool:
    """cuDNN autotuning (``torch.backends.cudnn.benchmark``) on CUDA unless the run asks for
    determinism (``deterministic``, or deterministic algorithms already switched on in torch).

    Autotuning times several convolution algorithms per new input shape and keeps the fastest:
    a one-off cost per shape, then faster convolutions for the rest of the run (a training run
    sees one or two shapes). The algorithm it picks may change between runs, so results are
    not bit-reproducible with it on. Never on the CPU, where the flag does nothing."""
    return device.type == "cuda" and not deterministic and not torch.are_deterministic_algorithms_enabled()


def apply_cudnn_benchmark(device: torch.device, deterministic: bool) -> bool:
    """Set ``torch.backends.cudnn.benchmark`` as ``use_cudnn_benchmark`` decides; returns it.

    Only ever switches it on for CUDA, or off for a deterministic CUDA run: on the CPU the
    process's setting is left as it was (a caller's choice, not the spec's)."""
    on = use_cudnn_benchmark(device, deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = on
    return on


def use_channels_last(setting, model: nn.Module, device: torch.device) -> bool:
    """auto: on CUDA for conv nets (tensor cores want NHWC); never on CPU, where it is slower.
    Never for a model fed token ids (a causal LM): they have no channels to lay out."""
    if getattr(model, "takes_tokens", False):
        return False
    if setting == "auto":
        return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    return bool(setting)


def to_channels_last(module: nn.Module) -> nn.Module:
    """channels_last for every rank-4 parameter and buffer, nothing else.

    ``nn.Module.to(memory_format=torch.channels_last)`` also tries its rank-5 tensors and
    fails ("required rank 4 tensor to use channels_last format"): Swin keeps rank-5
    buffers. Values are unchanged; only the strides of conv-shaped tensors change.
    """
    return module._apply(channels_last_tensor)


def channels_last_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels_last where it is rank 4 (conv-shaped), else ``t`` itself."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (auto or bf16), fp16 where asked for (with a gradient scaler), else fp32
    (None). bf16 on the CPU stays fp32: slow and lossy there, and a GPU spec run on a laptop
    should not pay for it."""
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device):
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scaler for fp16 (a disabled one, which passes everything through, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def use_deterministic_algorithms(enabled: bool) -> None:
    """torch's deterministic algorithms for a run that asks for them (an error names any op
    without a deterministic kernel). cuBLAS needs its workspace fixed for that, before its
    first call on the device."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def maybe_compile(module: nn.Module, enabled: bool):
    """``torch.compile`` with static shapes: a batch of another size (an uneven micro-batch, a
    partial last batch) gets a graph of its own, not a recompile of every graph with dynamic
    shapes (slower kernels, and one more cache entry per stage). The training loader drops the
    last partial batch wherever a full one exists, so a stage sees at most two sizes: the
    micro-batches of ``tensor_split`` differ by at most one sample."""
    return torch.compile(module, dynamic=False) if enabled else module


def reset_compile_caches() -> None:
    """Forget every compiled graph and its guards (``torch._dynamo.reset()``).

    Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) cache entries per code
    object; entries of earlier models (another Distiller, another benchmark runner) count
    against that limit for the next one, which then silently runs eager. Reset between
    independent compiled programs in one process."""
    torch._dynamo.reset()


class RecompileWatch(logging.Handler):
    """Counts the times Dynamo hit its recompile limit while attached: ``with
    RecompileWatch() as watch: ...``, then ``watch.hits`` and ``watch.functions``.

    At the limit, Dynamo logs one warning ("torch._dynamo hit config.recompile_limit") and
    runs that function eager from then on: a compiled run quietly becomes an eager one. That
    warning is Dynamo's one signal by default (the flag that raises instead is off, and was
    renamed between versions), so the watch reads the log record. ``strict`` also sets
    ``fail_on_recompile_limit_hit`` where this torch has it, so a hit raises at once (tests);
    without it the run goes on and the count is there to report. Dynamo warns once per
    function (then skips it for good), so ``hits`` counts functions gone eager, not calls."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self, strict: bool = False):
        super().__init__(level=logging.WARNING)
        self.strict = strict
        self.hits = 0
        self.functions: list[str] = []
        self._patch = contextlib.ExitStack()

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("torch._dynamo hit config."):
            self.hits += 1
            args = record.args if isinstance(record.args, tuple) else ()
            self.functions.append(str(args[2]) if len(args) > 2 else "?")

    def __enter__(self) -> RecompileWatch:
        logging.getLogger(self.LOGGER).addHandler(self)
        config = torch._dynamo.config
        if self.strict and hasattr(config, "fail_on_recompile_limit_hit"):
            self._patch.enter_context(config.patch(fail_on_recompile_limit_hit=True))
        return self

    def __exit__(self, *exc) -> None:
        self._patch.close()
        logging.getLogger(self.LOGGER).removeHandler(self)


def shard_teacher(teacher, info: DistInfo, device: torch.device) -> None:
    """teacher.shard: the frozen teacher's parameters sharded over the run's ranks with FSDP2
    (``FrozenTeacher.shard_``), after every move and cast of it and outside DDP, which wraps
    the student alone. A run of one process has nothing to shard over: refused."""
    if not info.enabled:
        raise SpecError("teacher.shard", "shards the teacher across torchrun's ranks, and this run is one "
                        "process: launch it with torchrun --nproc_per_node N (N >= 2), or set teacher.shard: false")
    from torch.distributed.device_mesh import init_device_mesh

    teacher.shard_(init_device_mesh(device.type, (info.world_size,)))


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device, find_unused: bool) -> nn.Module:
    if not info.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def decay_groups(named_params, weight_decay: float, skip: set[str] = frozenset()) -> list[dict]:
    """timm's rule: no weight decay on 1-d parameters (norm scales and shifts, biases) or on
    the names in ``skip`` (a model's ``no_weight_decay()``: position embeddings, class tokens)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        short = name.split(".", 1)[1] if name.startswith("student.") else name
        (no_decay if p.ndim <= 1 or short in skip else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """The model's own list of parameters to keep out of weight decay (timm's convention)."""
    fn = getattr(model, "no_weight_decay", None)
    try:
        return set(fn()) if callable(fn) else set()
    except Exception:  # a model's hook is its own business; without it, the 1-d rule applies
        return set()


def build_optimizer(spec_optim, params, device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW; fused kernels on CUDA, foreach elsewhere (one launch per group, not per tensor).

    ``params``: parameters, or parameter groups (see ``decay_groups``)."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if spec_optim.name == "sgd":
        return torch.optim.SGD(params, lr=spec_optim.lr, momentum=spec_optim.momentum,
                               nesterov=spec_optim.nesterov and spec_optim.momentum > 0,
                               weight_decay=spec_optim.weight_decay, **fast)
    return torch.optim.AdamW(params, lr=spec_optim.lr, betas=tuple(spec_optim.betas),
                             weight_decay=spec_optim.weight_decay, **fast)
