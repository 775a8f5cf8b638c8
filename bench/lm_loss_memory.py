"""Peak CPU memory of the token losses, chunked against whole (issue 36's goal: chunked ≤ 1/4).

Forward and backward of one token loss (CE weight 0.5) at batch × sequence × vocabulary
(default 8 × 512 × 32000, float32 logits: 524 MB each for the student's and the teacher's),
the inputs made before measuring. "whole" is the same per-token formula
(``kdgraph.lm.token_losses.token_divergence``) on every token at once with plain autograd;
"chunked" is ``chunked_token_loss`` at ``--chunk`` tokens. The peak is the most bytes torch's
CPU allocator held at once while the step ran (torch.profiler's memory events, "Total
Allocated"), the gradient of the student's logits included (one logits-sized tensor: every
method returns it).

    python bench/lm_loss_memory.py                     # forward_kl, 8 x 512 x 32000
    python bench/lm_loss_memory.py --loss jsd --chunk 256
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from kdgraph.lm.token_losses import chunked_token_loss, token_divergence


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "skew_kl", "jsd"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    b, t, v = args.batch, args.seq, args.vocab
    s = torch.randn(b, t, v, requires_grad=True)
    te, y = torch.randn(b, t, v), torch.randint(0, v, (b, t))
    coefficient = 0.1 if args.loss == "skew_kl" else 0.5

    def whole():
        kd, ce = token_divergence(name=args.loss, s=s.reshape(-1, v), t=te.reshape(-1, v), y=y.reshape(-1),
                                  coefficient=coefficient, temperature=1.0, ce_weight=0.5, ignore_index=-100)
        torch.autograd.grad(kd + ce, s)

    def chunked():
        kd, ce = chunked_token_loss(args.loss, s, te, y, coefficient=coefficient, ce_weight=0.5, chunk=args.chunk)
        torch.autograd.grad(kd + ce, s)

    logits_mb = s.numel() * 4 / 2**20
    c = peak_bytes(chunked) / 2**20
    w = peak_bytes(whole) / 2**20
    print(f"{args.loss} at {b} x {t} x {v} (one logits tensor {logits_mb:,.0f} MB), chunk {args.chunk} tokens: "
          f"peak chunked {c:,.0f} MB, whole {w:,.0f} MB, ratio {c / w:.3f}")


if __name__ == "__main__":
    main()
