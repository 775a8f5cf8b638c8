"""Plan time of causal-LM pairs per family on the meta device (issue 36's goal: ≤ 3 s beyond imports).

For each family (transformers model types), a teacher of ``--teacher-layers`` layers and width
``--width`` and a student of half of each (vocabulary ``--vocab``, windows of ``--seq`` tokens,
kd+mse, one block per student layer and the head) is planned in this process with
``compile_spec(materialize=False)``, as `kdgraph plan` plans it. torch, transformers and
kdgraph are imported first, and each family is planned once before it is timed (the first
torch.export of a process also imports and warms its own modules); the figure is the median
of ``--repeats`` further plans, with the per-pass split of the last one (build, trace, rest).

    python bench/lm_plan.py
    python bench/lm_plan.py --families llama gemma2 --teacher-layers 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch  # noqa: F401  (imports first: the goal is the time beyond them)
import transformers  # noqa: F401

from kdgraph.compiler import compile_spec
from kdgraph.spec import Spec

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "gemma2")


def spec(family: str, layers: int, width: int, vocab: int, seq: int) -> Spec:
    def kwargs(w: int, n: int) -> dict:
        return {"vocab_size": vocab, "hidden_size": w, "intermediate_size": 4 * w, "num_hidden_layers": n,
                "num_attention_heads": max(w // 64, 2), "num_key_value_heads": max(w // 128, 1),
                "head_dim": w // max(w // 64, 2), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

    return Spec.model_validate({
        "name": f"{family}-plan", "data": {"dataset": "text", "seq_len": seq},
        "teacher": {"model": f"transformers:{family}", "kwargs": kwargs(width, layers)},
        "student": {"model": f"transformers:{family}", "kwargs": kwargs(width // 2, layers // 2)},
        "schedule": {"method": "kd+mse"}, "decompose": {"blocks": layers // 2 + 1}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for family in args.families:
        s = spec(family, args.teacher_layers, args.width, args.vocab, args.seq)
        compile_spec(s, materialize=False)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            compiled = compile_spec(s, materialize=False)
            times.append(time.perf_counter() - t0)
        t = compiled.timings
        rest = sum(t.values()) - t["build"] - t["trace"]
        print(f"{family:8s} plan {statistics.median(times):.2f} s (build {t['build']:.2f}, trace {t['trace']:.2f}, "
              f"rest {rest:.2f}); cuts {len(compiled.teacher.cuts)}/{len(compiled.student.cuts)}, "
              f"{len(compiled.pairing.blocks)} blocks", flush=True)


if __name__ == "__main__":
    main()
