"""A causal-LM pair trained a few steps on R ranks with the student under DDP (whole on every
rank) and sharded with FSDP2 (``runtime.shard_student``, and the teacher with ``teacher.shard``),
side by side: per rank, the bytes of the student's parameters, gradients and AdamW moments
(measured from the tensors the rank holds: its local shards where sharded) beside
``kdgraph.lm.memory``'s arithmetic for them, the teacher's parameter bytes, the process's peak
memory (peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA), tokens/s of the
whole run and the ranks' mean loss of the last step.

Each mode runs in its own ranks (``torchrun --standalone``, launched here): gloo on the CPU
(``--device cpu``, CUDA hidden from the ranks), nccl on CUDA (``--device cuda``, one GPU per
rank). The steps are the real ``Trainer``'s (``train_step``: the teacher's forward, the loss,
the backward, the optimizer step), over random printable text (the byte tokenizer), after one
warm-up step that the timing leaves out (it allocates the optimizer's state).

Configs (Llama shapes over UTF-8 bytes; a vocabulary past 256 holds ids the text never uses):

    tiny   student and teacher 2 x 32, vocab 256, 8-token windows, 2 per rank (the test's)
    toy    the shapes of specs/shakespeare-lm*.yaml: teacher 4 x 256, student 2 x 128, vocab
           256, 128-token windows, 16 per rank
    large  teacher 8 x 768, student 8 x 512, vocab 32,000, 256-token windows, 4 per rank

    python bench/lm_shard.py                                  # toy and large, 2 gloo ranks
    python bench/lm_shard.py --configs tiny --steps 2
    python bench/lm_shard.py --device cuda --ranks 2          # two GPUs, nccl

Timings are only meaningful on a machine running nothing else, or on GPUs. One JSON line per
(config, mode) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {  # shapes: (width, MLP width, layers, heads); batch: windows per rank per step
    "tiny": {"teacher": (32, 64, 2, 2), "student": (32, 64, 2, 2), "vocab": 256, "seq": 8, "batch": 2},
    "toy": {"teacher": (256, 688, 4, 4), "student": (128, 344, 2, 4), "vocab": 256, "seq": 128, "batch": 16},
    "large": {"teacher": (768, 2048, 8, 12), "student": (512, 1376, 8, 8), "vocab": 32_000, "seq": 256, "batch": 4},
}
MODES = ("ddp", "sharded")
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's two moments (its scalar step counters are not counted)


def llama(shape: tuple[int, int, int, int], vocab: int, seq: int) -> dict:
    width, ffn, layers, heads = shape
    return {"vocab_size": vocab, "hidden_size": width, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 2 * seq}


def decoder(shape: tuple[int, int, int, int], vocab: int):
    """The memory model's shape of a ``llama`` of ``shape`` (untied head, as transformers' default)."""
    from kdgraph.lm.memory import Decoder

    width, ffn, layers, heads = shape
    return Decoder(vocab=vocab, hidden=width, intermediate=ffn, layers=layers, heads=heads, kv_heads=heads)


def model_bytes(cfg: dict, ranks: int) -> dict[str, int]:
    """``kdgraph.lm.memory``'s per-rank bytes of the student's float32 weights (its shard: the
    gathered units aside), gradients and AdamW moments, and of a float32 teacher's shard, for
    the student unsharded (``ranks`` = 1) or sharded over ``ranks``."""
    from kdgraph.lm.memory import Pair, per_rank, weight_bytes

    pair = Pair(decoder(cfg["student"], cfg["vocab"]), decoder(cfg["teacher"], cfg["vocab"]),
                compute_dtype="float32", teacher_dtype="float32")
    whole_student, whole_teacher = weight_bytes(pair, 1)
    budget = per_rank(pair, ranks, cfg["batch"] * cfg["seq"])
    return {"weights": -(-whole_student // ranks), "gradients": budget.gradients, "optimizer": budget.optimizer,
            "teacher": -(-whole_teacher // ranks)}


def write_text(folder: Path, cfg: dict, ranks: int, steps: int) -> Path:
    """Random printable ASCII, enough windows for the steps (and a warm-up) on every rank."""
    folder.mkdir(parents=True, exist_ok=True)
    windows = (steps + 2) * cfg["batch"] * ranks
    size = int(windows * (cfg["seq"] + 1) / 0.9) + 4096
    rng = np.random.default_rng(0)
    (folder / "random.txt").write_bytes(rng.integers(32, 127, size, dtype=np.uint8).tobytes())
    return folder


def spec_of(args, cfg: dict, text: Path, out: Path, mode: str) -> dict:
    sharded = mode == "sharded"
    runtime = {"device": args.device, "num_threads": args.threads, "log_every": 1000,
               "shard_student": sharded, "activation_checkpointing": args.checkpointing}
    if sharded:
        runtime["shard_dtype"] = args.shard_dtype
    return {"name": f"lm-shard-{mode}", "seed": 0, "output": str(out),
            "teacher": {"model": "transformers:llama", "kwargs": llama(cfg["teacher"], cfg["vocab"], cfg["seq"]),
                        "shard": sharded},
            "student": {"model": "transformers:llama", "kwargs": llama(cfg["student"], cfg["vocab"], cfg["seq"])},
            "data": {"dataset": "text", "root": str(text), "seq_len": cfg["seq"], "batch_size": cfg["batch"]},
            "decompose": {"blocks": 1}, "schedule": {"method": "kd", "epochs": 1},
            "loss": {"token": "forward_kl", "ce_weight": 0.5},
            "optim": {"name": "adamw", "lr": 3e-3, "lr_schedule": "constant"}, "runtime": runtime}


# -- one rank (under torchrun) ---------------------------------------------------------------------

def _local_bytes(tensors) -> int:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def held_bytes(trainer) -> dict[str, int]:
    """What this rank holds of the student (weights, gradients, AdamW moments) and the teacher."""
    params = list(trainer.distiller.student.parameters())
    state = trainer.optimizer.state
    return {"weights": _local_bytes(params), "gradients": _local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _local_bytes(v for p in params for k, v in state.get(p, {}).items() if k in MOMENTS),
            "teacher": trainer.distiller.teacher.parameter_bytes()}


def peak_bytes(device) -> int:
    """CUDA: the most allocated since the reset before the timed steps. CPU: the process's peak
    RSS over its life (building the whole student and teacher before sharding included)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_bytes() -> int:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rank_main(args) -> None:
    """One rank of one mode: ``args.steps`` timed steps after a warm-up one, to WORK/rank{r}.json."""
    import torch
    import torch.distributed as dist

    from kdgraph.runtime.loop import Trainer
    from kdgraph.spec import load_spec

    spec = json.loads(Path(args.spec).read_text())
    trainer = Trainer.from_spec(load_spec(spec))
    device, n = trainer.config.device, len(trainer.data.train)
    trainer.distiller.train()

    def step(g: int):
        xb, yb, _ = next(iter(trainer.batches(*divmod(g, n))))
        return trainer.train_step(xb, yb)[1]

    def settle() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    step(0)
    settle()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for g in range(1, args.steps + 1):
        loss = step(g)
    settle()
    wall = time.perf_counter() - t0
    mean = loss.detach().float().clone()
    dist.all_reduce(mean)
    world = dist.get_world_size()
    result = {"rank": dist.get_rank(), "world_size": world, "wall_s": wall, "loss": float(mean) / world,
              "tokens": args.steps * world * spec["data"]["batch_size"] * spec["data"]["seq_len"],
              "held": held_bytes(trainer), "peak_bytes": peak_bytes(device), "rss_end_bytes": rss_bytes()}
    Path(args.result).with_name(f"rank{result['rank']}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# -- the launcher ----------------------------------------------------------------------------------

def launch(args, spec: dict, work: Path) -> list[dict]:
    """One mode's ranks under torchrun; their results, by rank."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo: kdgraph picks nccl wherever CUDA is visible
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
           str(Path(__file__).resolve()), "--rank-of", str(work / "spec.json"), "--result", str(work / "rank.json"),
           "--steps", str(args.steps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"the {spec['name']} ranks failed (exit {res.returncode}):\n{res.stdout[-3000:]}"
                         f"{res.stderr[-3000:]}")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(args.ranks)]


def rows_of(args, name: str, mode: str, ranks: list[dict]) -> dict:
    cfg = CONFIGS[name]
    wall = max(r["wall_s"] for r in ranks)
    return {"config": name, "mode": mode, "ranks": args.ranks, "device": args.device, "steps": args.steps,
            "vocab": cfg["vocab"], "seq_len": cfg["seq"], "batch_per_rank": cfg["batch"],
            "shard_dtype": args.shard_dtype if mode == "sharded" else "float32",
            "activation_checkpointing": args.checkpointing,
            "held": [r["held"] for r in ranks], "model": model_bytes(cfg, args.ranks if mode == "sharded" else 1),
            "peak_bytes": [r["peak_bytes"] for r in ranks],
            "peak_kind": "cuda_max_allocated" if args.device == "cuda" else "peak_rss",
            "rss_end_bytes": [r["rss_end_bytes"] for r in ranks],
            "wall_s": wall, "tokens_per_s": ranks[0]["tokens"] / wall, "loss": ranks[0]["loss"]}


HEADER = ("| config | mode | rank | student weights B | gradients B | AdamW moments B | memory model w / g / o B "
          "| teacher weights B | memory model teacher B | {peak} MiB | tokens/s | last loss |")


def table_rows(row: dict) -> list[str]:
    m = row["model"]
    lines = []
    for rank, (held, peak) in enumerate(zip(row["held"], row["peak_bytes"])):
        lines.append(f"| {row['config']} | {row['mode']} | {rank} | {held['weights']} | {held['gradients']} | "
                     f"{held['optimizer']} | {m['weights']} / {m['gradients']} / {m['optimizer']} | "
                     f"{held['teacher']} | {m['teacher']} | {peak / 2 ** 20:.1f} | {row['tokens_per_s']:.1f} | "
                     f"{row['loss']:.5f} |")
    return lines


def ratio_row(ddp: dict, sharded: dict) -> str:
    """The sharded run's largest per-rank peak and its tokens/s over the DDP run's."""
    peak = max(sharded["peak_bytes"]) / max(ddp["peak_bytes"])
    cells = [ddp["config"], "sharded / ddp", "", "", "", "", "", "", "", f"{peak:.2f} x",
             f"{sharded['tokens_per_s'] / ddp['tokens_per_s']:.2f} x", ""]
    return "| " + " | ".join(cells) + " |"


def run_config(args, name: str, root: Path) -> list[dict]:
    cfg = CONFIGS[name]
    text = write_text(root / name / "text", cfg, args.ranks, args.steps)
    rows = []
    for mode in MODES:
        work = root / name / mode
        ranks = launch(args, spec_of(args, cfg, text, work / "run", mode), work)
        rows.append(rows_of(args, name, mode, ranks))
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="toy,large", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shard-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="runtime.shard_dtype of the sharded student")
    ap.add_argument("--checkpointing", action="store_true", help="runtime.activation_checkpointing in both modes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per mode")
    ap.add_argument("--out", type=Path, default=Path("bench/results/lm-shard.jsonl"))
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)  # internal: run one rank of the spec in this file
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad or args.ranks < 2 or args.steps < 1:
        ap.error(f"unknown config {bad}" if bad else "--ranks needs 2 or more and --steps 1 or more")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rank_of:
        args.spec = args.rank_of
        rank_main(args)
        return
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.ranks:
            raise SystemExit(f"--device cuda --ranks {args.ranks} needs {args.ranks} GPUs (one per rank); "
                             f"{torch.cuda.device_count()} visible")
    peak = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    print(f"{args.ranks} ranks on {args.device} ({'nccl' if args.device == 'cuda' else 'gloo'}), {args.steps} timed "
          f"steps; bytes per rank measured from the tensors it holds, beside kdgraph.lm.memory's arithmetic\n")
    print(HEADER.format(peak=peak))
    print("|" + "---|" * (HEADER.count("|") - 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdgraph-lm-shard-") as tmp:
        for name in args.configs.split(","):
            rows = run_config(args, name, Path(tmp))
            with args.out.open("a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            for row in rows:
                print("\n".join(table_rows(row)), flush=True)
            print(ratio_row(*rows), flush=True)


if __name__ == "__main__":
    main()
