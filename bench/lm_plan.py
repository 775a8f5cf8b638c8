"""Plan time of causal-LM pairs per family on the meta device (issue 36's goal: ≤ 3 s beyond imports).

For each family (transformers model types), a teacher of ``--teacher-layers`` layers and width
``--width`` and a student of half of each (vocabulary ``--vocab``, windows of ``--seq`` tokens,
kd+mse, one block per student layer and the head) is planned with
``compile_spec(materialize=False)``, as `kdgraph plan` plans it, once per fresh process: the
first plan of that pair in the process, nothing cached from an earlier one. Each process first
imports what a plan imports (torch, torch.export's tracing modules, transformers, the family's
modeling module, kdgraph; timed apart as "imports"), then times the plan. The figure is the median
over ``--repeats`` processes (a shared machine's times are noisy: min and max are printed too),
with the per-pass split (build, trace, the other passes) of the median run.

    python bench/lm_plan.py
    python bench/lm_plan.py --families llama gemma2 --teacher-layers 16 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "gemma2")


def spec(family: str, layers: int, width: int, vocab: int, seq: int):
    from kdgraph.spec import Spec

    def kwargs(w: int, n: int) -> dict:
        return {"vocab_size": vocab, "hidden_size": w, "intermediate_size": 4 * w, "num_hidden_layers": n,
                "num_attention_heads": max(w // 64, 2), "num_key_value_heads": max(w // 128, 1),
                "head_dim": w // max(w // 64, 2), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

    return Spec.model_validate({
        "name": f"{family}-plan", "data": {"dataset": "text", "seq_len": seq},
        "teacher": {"model": f"transformers:{family}", "kwargs": kwargs(width, layers)},
        "student": {"model": f"transformers:{family}", "kwargs": kwargs(width // 2, layers // 2)},
        "schedule": {"method": "kd+mse"}, "decompose": {"blocks": layers // 2 + 1}})


def one(args) -> dict:
    """In this (fresh) process: the imports, then one plan of the family's pair."""
    t0 = time.perf_counter()
    for module in ("torch", "torch.export", "torch._dynamo", "torch._export.non_strict_utils",
                   "torch.fx.experimental.proxy_tensor", "torch._functorch.aot_autograd", "transformers",
                   f"transformers.models.{args.one}.modeling_{args.one}", "kdgraph.compiler", "kdgraph.lm.source"):
        importlib.import_module(module)
    imports = time.perf_counter() - t0
    from kdgraph.compiler import compile_spec

    s = spec(args.one, args.teacher_layers, args.width, args.vocab, args.seq)
    t0 = time.perf_counter()
    compiled = compile_spec(s, materialize=False)
    plan = time.perf_counter() - t0
    return {"family": args.one, "imports": imports, "plan": plan, "timings": compiled.timings,
            "cuts": [len(compiled.teacher.cuts), len(compiled.student.cuts)], "blocks": len(compiled.pairing.blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one family, one plan, JSON out
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    sizes = ["--teacher-layers", str(args.teacher_layers), "--width", str(args.width), "--vocab", str(args.vocab),
             "--seq", str(args.seq)]
    for family in args.families:
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--one", family, *sizes], check=True,
                                          capture_output=True, text=True).stdout.splitlines()[-1])
                for _ in range(args.repeats)]
        runs.sort(key=lambda r: r["plan"])
        mid = runs[len(runs) // 2]
        t = mid["timings"]
        rest = sum(t.values()) - t["build"] - t["trace"]
        print(f"{family:8s} plan {statistics.median(r['plan'] for r in runs):.2f} s median of {len(runs)} processes "
              f"(min {runs[0]['plan']:.2f}, max {runs[-1]['plan']:.2f}; build {t['build']:.2f}, trace {t['trace']:.2f}, "
              f"rest {rest:.2f}; imports {mid['imports']:.1f} s apart); cuts {mid['cuts'][0]}/{mid['cuts'][1]}, "
              f"{mid['blocks']} blocks", flush=True)


if __name__ == "__main__":
    main()
