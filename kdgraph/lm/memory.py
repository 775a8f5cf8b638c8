"""A memory model of a causal-LM distillation run: per-rank bytes of weights, gradients, AdamW
state and activations for a teacher/student pair of decoder-only transformers (Llama-shaped:
RMSNorm, grouped-query attention, a SwiGLU MLP, no biases) at N ranks, as kdgraph runs it:

    the student: float32 weights, float32 gradients, AdamW's two float32 moments; at N >= 2
        sharded with FSDP2 (runtime.shard_student): each rank 1/N of each, plus the units
        gathered in the compute dtype (``shard_dtype``): the root (embeddings, final norm,
        head: FSDP2 keeps a root gathered from forward to backward) and two layers (the one
        running and the one prefetched);
    the teacher: frozen, in ``teacher.dtype``, at N >= 2 sharded (teacher.shard) as the
        student is: each rank 1/N, plus its root and two layers gathered while it runs;
    activations: per rank, what autograd saves for the backward of each student layer, or only
        each layer's input with activation checkpointing (plus one layer's whole set while it
        is recomputed); the student's and the teacher's float32 logits for the loss.

Left out: the CUDA context and allocator fragmentation (``fits`` keeps a margin for them),
temporary buffers (all-gather and reduce-scatter staging, an op's workspace, the loss's chunk
of softmax), the optimizer's foreach temporaries, the data, a KV cache (training uses none),
the teacher's own activations (it runs without autograd: one layer's at a time), and attention
kernels that materialise the T x T scores (the model assumes a fused, flash-style kernel).

    pair = Pair(student=QWEN25["0.5B"], teacher=QWEN25["7B"])
    per_rank(pair, ranks=8, tokens=4096)  -> Budget(weights=..., gradients=..., ...)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

GIB = 1024 ** 3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Decoder:
    """A decoder-only transformer's shape (transformers' Llama/Qwen2 config fields)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False  # the head shares the input embedding's matrix

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_parameters(self) -> int:
        """One decoder layer: q and o (d x d), k and v (d x kv_heads * head_dim), gate, up and
        down (3 d f), two RMSNorm scales (2 d)."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * d * d + 2 * d * kv + 3 * d * self.intermediate + 2 * d

    def root_parameters(self) -> int:
        """What is outside the layers: the embedding, the head (unless tied), the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.root_parameters()

    def layer_activations(self, tokens: int) -> int:
        """Elements one layer saves for its backward, for ``tokens`` tokens: the input and output
        of each norm (2 x 2d), q and the attention output (2d), k and v (2 kv), the MLP's gate,
        silu(gate), up and their product (4f)."""
        return tokens * (6 * self.hidden + 2 * self.kv_heads * self.head_dim + 4 * self.intermediate)


@dataclass(frozen=True)
class Pair:
    student: Decoder
    teacher: Decoder
    compute_dtype: str = "bfloat16"  # shard_dtype / autocast: gathered weights and activations
    teacher_dtype: str = "bfloat16"  # teacher.dtype


@dataclass(frozen=True)
class Budget:
    """Bytes one rank holds at the step's peak, by kind."""

    student_weights: int
    gradients: int
    optimizer: int
    teacher_weights: int
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def weight_bytes(pair: Pair, ranks: int) -> tuple[int, int]:
    """(student, teacher) weight bytes one rank holds at the peak: float32 shards and the gathered
    units: the root and two layers, in the compute dtype (student) or the teacher's dtype."""
    s, t = pair.student, pair.teacher
    tb = BYTES[pair.teacher_dtype]
    if ranks == 1:
        return 4 * s.parameters(), tb * t.parameters()
    gathered = BYTES[pair.compute_dtype] * (s.root_parameters() + 2 * s.layer_parameters())
    teacher_gathered = tb * (t.root_parameters() + 2 * t.layer_parameters())
    return _ceil(4 * s.parameters(), ranks) + gathered, _ceil(tb * t.parameters(), ranks) + teacher_gathered


def activation_bytes(pair: Pair, tokens: int, checkpointing: bool) -> int:
    """Saved activations of the student's layers (all, or each layer's input and one layer's
    whole set under checkpointing) in the compute dtype, and the student's and teacher's
    float32 logits."""
    s = pair.student
    per_layer = s.layer_activations(tokens)
    saved = s.layers * tokens * s.hidden + per_layer if checkpointing else s.layers * per_layer
    return BYTES[pair.compute_dtype] * saved + 4 * tokens * (s.vocab + pair.teacher.vocab)


def per_rank(pair: Pair, ranks: int, tokens: int, checkpointing: bool = False) -> Budget:
    """The peak bytes of one rank of ``ranks`` training ``pair`` on ``tokens`` tokens per rank."""
    student, teacher = weight_bytes(pair, ranks)
    n = pair.student.parameters()
    return Budget(student_weights=student, gradients=_ceil(4 * n, ranks), optimizer=_ceil(8 * n, ranks),
                  teacher_weights=teacher, activations=activation_bytes(pair, tokens, checkpointing))


def fits(budget: Budget, device_gib: float, margin: float = 0.9) -> bool:
    """The budget within ``margin`` of the device (the rest: the CUDA context, fragmentation)."""
    return budget.total <= margin * device_gib * GIB


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# Qwen2.5's published shapes (config.json of each size), a family of one vocabulary.
QWEN25 = {
    "0.5B": Decoder(151936, 896, 4864, 24, 14, 2, tied=True),
    "1.5B": Decoder(151936, 1536, 8960, 28, 12, 2, tied=True),
    "3B": Decoder(151936, 2048, 11008, 36, 16, 2, tied=True),
    "7B": Decoder(152064, 3584, 18944, 28, 28, 4),
    "14B": Decoder(152064, 5120, 13824, 48, 40, 8),
    "32B": Decoder(152064, 5120, 27648, 64, 40, 8),
    "72B": Decoder(152064, 8192, 29568, 80, 64, 8),
}


def largest_pair(device_gib: float, ranks: int, tokens: int, checkpointing: bool,
                 family: dict[str, Decoder] = QWEN25) -> tuple[str, str] | None:
    """The largest student of ``family`` that fits with a larger teacher of it, and the largest
    such teacher (names); None where no pair fits."""
    names = list(family)
    best = None
    for i, s in enumerate(names):
        for t in names[i + 1:]:
            if fits(per_rank(Pair(family[s], family[t]), ranks, tokens, checkpointing), device_gib):
                best = (s, t) if best is None or names.index(s) > names.index(best[0]) or (
                    s == best[0] and names.index(t) > names.index(best[1])) else best
    return best
