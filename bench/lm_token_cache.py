"""The top-k token cache of a causal-LM pair: its bytes per token on disk, and how far its
top-k reconstruction (FKD's spread-the-rest) is from the teacher's full distribution.

For each config it

1. trains the teacher ``--steps`` steps of next-token CE (`kdgraph train`, a supervised spec)
   on the text, so that its distribution is not the uniform one of random weights;
2. builds the pair's top-``--k`` cache of one epoch (`build_cache`, what `kdgraph cache SPEC
   --epochs 1 --top-k K` does) and measures its shard file: bytes on disk / tokens;
3. runs the trained teacher again on the cached epoch's windows (the task's own loader) and
   takes, at each k of ``--ks``, the mean over those tokens of KL(p || p~), p = softmax(z_t),
   p~ its top-k reconstruction from fp16 probabilities (``kdgraph.lm.token_losses.topk_kl``).

Configs (Llama teachers over UTF-8 bytes; a vocabulary past 256 holds ids the byte text never
uses, which the trained teacher learns to give almost no mass):

    toy   the shapes of specs/shakespeare-lm*.yaml: teacher 4 x 256, vocab 256, 128-token windows
    32k   teacher 2 x 256, vocab 32,000 (uint16 ids), 128-token windows
    128k  teacher 2 x 128, vocab 128,256 (uint32 ids), 64-token windows

    python bench/lm_token_cache.py                       # all three, text: data/shakespeare/texts
    python bench/lm_token_cache.py --configs toy --steps 100

Text: ``--text`` (a folder of .txt files); where it is missing, the first ``--fallback-bytes``
of the Python standard library's own .py sources, copied to a temporary folder. One JSON line
per config goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kdgraph.compiler import compile_spec
from kdgraph.lm.token_losses import topk_kl
from kdgraph.runtime.cache import build_cache
from kdgraph.runtime.loop import train
from kdgraph.runtime.techniques import DistInfo
from kdgraph.spec import load_spec
from kdgraph.tasks.create import create_task
from kdgraph.teacher_cache import shard_path

CONFIGS = {
    "toy": {"teacher": (256, 688, 4, 4), "student": (128, 344, 2, 4), "vocab": 256, "seq": 128, "batch": 32},
    "32k": {"teacher": (256, 688, 2, 4), "student": (128, 344, 1, 4), "vocab": 32_000, "seq": 128, "batch": 8},
    "128k": {"teacher": (128, 344, 2, 4), "student": (64, 172, 1, 4), "vocab": 128_256, "seq": 64, "batch": 4},
}


def llama(shape: tuple[int, int, int, int], vocab: int, seq: int) -> dict:
    width, ffn, layers, heads = shape
    return {"vocab_size": vocab, "hidden_size": width, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 2 * seq}


def text_folder(args, work: Path) -> Path:
    if args.text.is_dir():
        return args.text
    folder, left = work / "text", args.fallback_bytes
    folder.mkdir()
    for path in sorted(Path(json.__file__).parent.parent.glob("*.py")):
        if left <= 0:
            break
        data = path.read_bytes()[:left]
        (folder / f"{path.stem}.txt").write_bytes(data)
        left -= len(data)
    return folder


def specs(args, cfg: dict, text: Path, work: Path, windows: int) -> tuple:
    """(the teacher's supervised spec, the pair's spec naming the cache)."""
    data = {"dataset": "text", "root": str(text), "seq_len": cfg["seq"], "batch_size": cfg["batch"]}
    runtime = {"device": "cpu", "num_threads": args.threads, "log_every": 1000, "eval_every": 1000000}
    teacher = {"name": "tc-teacher", "seed": 0, "output": str(work / "teacher"),
               "student": {"model": "transformers:llama", "kwargs": llama(cfg["teacher"], cfg["vocab"], cfg["seq"])},
               "data": {**data, "fraction": min(1.0, args.steps * cfg["batch"] / windows)},
               "decompose": {"blocks": 1}, "schedule": {"method": "supervised", "epochs": 1},
               "optim": {"name": "adamw", "lr": 3e-3, "lr_schedule": "constant"}, "runtime": runtime}
    pair = {"name": "tc-pair", "seed": 0, "output": str(work / "pair"),
            "teacher": {"model": "transformers:llama", "kwargs": llama(cfg["teacher"], cfg["vocab"], cfg["seq"]),
                        "checkpoint": str(work / "teacher" / "student.safetensors"), "cache": str(work / "cache")},
            "student": {"model": "transformers:llama", "kwargs": llama(cfg["student"], cfg["vocab"], cfg["seq"])},
            "data": {**data, "fraction": min(1.0, args.cache_batches * cfg["batch"] / windows)},
            "decompose": {"blocks": 1}, "schedule": {"method": "kd", "epochs": 1},
            "loss": {"token": "forward_kl", "ce_weight": 0.5},
            "optim": {"name": "adamw", "lr": 3e-3}, "runtime": runtime}
    return load_spec(teacher), load_spec(pair)


def mean_kls(pair, ks: list[int]) -> tuple[dict[int, float], int]:
    """Mean KL(p || p~) at each k over the cached epoch's tokens, and how many tokens."""
    torch.manual_seed(0)
    base = pair.model_copy(update={"teacher": pair.teacher.model_copy(update={"cache": None})})
    compiled = compile_spec(base, fetch=("teacher",))
    task = create_task(base, compiled)
    task.writes_output = False
    loader = task.build_data(base, compiled.data, torch.device("cpu"), DistInfo()).train
    teacher = compiled.teacher.model.eval()
    sums, tokens = dict.fromkeys(ks, 0.0), 0
    with torch.no_grad():
        for x, _ in loader.epoch(0):
            z = teacher(x).flatten(0, 1)
            for k in ks:
                sums[k] += float(topk_kl(z, k)[0].double().sum())
            tokens += len(z)
    return {k: s / tokens for k, s in sums.items()}, tokens


def run(args, name: str, text: Path) -> dict:
    cfg = CONFIGS[name]
    work = Path(tempfile.mkdtemp(prefix=f"kdgraph-tokcache-{name}-"))
    try:
        from kdgraph.lm.text import ByteTokenizer, Windows, token_file

        windows = Windows(token_file(text, ByteTokenizer(), work / "tokens"), cfg["seq"], 0.05).count("train")
        teacher_spec, pair = specs(args, cfg, text, work, windows)
        t0 = time.perf_counter()
        summary = train(teacher_spec, quiet=True)
        trained_s = time.perf_counter() - t0
        cache = build_cache(pair, 1, top_k=args.k, quiet=True)
        tokens = cache.rows_per_epoch * cfg["seq"]
        on_disk = shard_path(work / "cache", 0, 0).stat().st_size
        kls, kl_tokens = mean_kls(pair, [k for k in args.ks if k <= cfg["vocab"]])
        steps = int(windows * teacher_spec.data.fraction) // cfg["batch"]
        return {"config": name, "vocab": cfg["vocab"], "seq_len": cfg["seq"], "teacher_steps": steps,
                "teacher_train_s": round(trained_s, 1),
                "teacher_heldout_bpb": summary.get("student_bpb"), "k": args.k, "cached_tokens": tokens,
                "shard_bytes": on_disk, "bytes_per_token": on_disk / tokens, "goal_bytes_per_token": 6 * args.k + 16,
                "full_fp32_bytes_per_token": 4 * cfg["vocab"], "build_topk_kl": cache.topk_kl,
                "mean_kl_by_k": kls, "kl_tokens": kl_tokens}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="toy,32k,128k")
    ap.add_argument("--text", type=Path, default=Path("data/shakespeare/texts"))
    ap.add_argument("--fallback-bytes", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=60, help="teacher training steps")
    ap.add_argument("--cache-batches", type=int, default=8, help="batches in the cached epoch")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--ks", default="1,4,16,64,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/lm-token-cache.jsonl"))
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kdgraph-tokcache-text-") as tmp:
        text = text_folder(args, Path(tmp))
        print(f"text: {text if args.text.is_dir() else f'{args.fallback_bytes:,} bytes of the stdlib sources'}")
        print(f"{'config':>6} {'vocab':>7} {'teacher bpb':>11} {'k':>3} {'bytes/token':>11} {'goal':>5} "
              f"{'full fp32':>9}  mean KL(p || top-k p~) in nats/token at k = " + ", ".join(map(str, args.ks)))
        for name in args.configs.split(","):
            row = run(args, name, text)
            with args.out.open("a") as f:
                f.write(json.dumps({**row, "text": str(text) if args.text.is_dir() else "stdlib"}) + "\n")
            kl = ", ".join(f"{row['mean_kl_by_k'][k]:.4g}" if k in row["mean_kl_by_k"] else "-" for k in args.ks)
            bpb = row["teacher_heldout_bpb"]
            print(f"{name:>6} {row['vocab']:>7} {bpb if bpb is None else round(bpb, 3):>11} {row['k']:>3} "
                  f"{row['bytes_per_token']:>11.2f} {row['goal_bytes_per_token']:>5} "
                  f"{row['full_fp32_bytes_per_token']:>9}  {kl}  ({row['kl_tokens']:,} tokens)", flush=True)


if __name__ == "__main__":
    main()
