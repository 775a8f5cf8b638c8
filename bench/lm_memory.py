"""How large a causal-LM student and teacher fit per device, from kdgraph.lm.memory's model
(arithmetic, no device needed): for 24 / 80 / 141 GiB devices at 1, 2 and 8 ranks, the largest
Qwen2.5-shaped student that trains beside a larger teacher of the family, and the largest such
teacher, with and without activation checkpointing of the student's layers, and the per-rank
budget of one pair. Student: float32 weights, gradients and AdamW, bfloat16 compute (sharded with
runtime.shard_student at 2 and 8 ranks); teacher: bfloat16 (teacher.dtype), sharded at 2 and 8.

    python bench/lm_memory.py                 # 4096 tokens per rank per step
    python bench/lm_memory.py --tokens 8192
"""

from __future__ import annotations

import argparse

from kdgraph.lm.memory import GIB, QWEN25, Pair, largest_pair, per_rank

DEVICES = (24, 80, 141)
RANKS = (1, 2, 8)


def cell(device: int, ranks: int, tokens: int, checkpointing: bool) -> str:
    pair = largest_pair(device, ranks, tokens, checkpointing)
    if pair is None:
        return "none"
    total = per_rank(Pair(QWEN25[pair[0]], QWEN25[pair[1]]), ranks, tokens, checkpointing).total
    return f"{pair[0]} + {pair[1]} ({total / GIB:.1f} GiB)"


def budget_rows(student: str, teacher: str, tokens: int) -> list[str]:
    pair = Pair(QWEN25[student], QWEN25[teacher])
    rows = []
    for ranks in RANKS:
        for ckpt in (False, True):
            b = per_rank(pair, ranks, tokens, ckpt)
            parts = [b.student_weights, b.gradients, b.optimizer, b.teacher_weights, b.activations, b.total]
            rows.append(f"| {ranks} | {'yes' if ckpt else 'no'} | " + " | ".join(f"{v / GIB:.1f}" for v in parts) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step (batch x sequence)")
    args = parser.parse_args()
    print(f"Largest student + teacher (Qwen2.5 shapes), {args.tokens} tokens per rank, within 90 % of the device:\n")
    print("| device | ranks | without checkpointing | with checkpointing |")
    print("|---|---|---|---|")
    for device in DEVICES:
        for ranks in RANKS:
            print(f"| {device} GiB | {ranks} | {cell(device, ranks, args.tokens, False)} | "
                  f"{cell(device, ranks, args.tokens, True)} |")
    print(f"\nPer-rank GiB of one pair, 1.5B student + 7B teacher, {args.tokens} tokens per rank:\n")
    print("| ranks | checkpointing | student weights | gradients | AdamW | teacher weights | activations | total |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(budget_rows("1.5B", "7B", args.tokens)))


if __name__ == "__main__":
    main()
