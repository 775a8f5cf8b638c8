"""Plots and markdown tables from the convergence study's JSON lines (bench/convergence.py)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def aggregate(rows: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(pair, fraction, method, budget) -> (mean, std, n) of final top-1 over seeds."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("track"):
            continue
        groups[(r["pair"], r["fraction"], r["method"], r["budget"])].append(r["top1"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def _order(methods) -> list[str]:
    known = ["supervised", "kd", "kd+mse", "stablekd-4/0", "stablekd-4/1", "stablekd-4/2"]
    return [m for m in known if m in methods] + sorted(set(methods) - set(known))


def table(agg: dict) -> str:
    out = []
    for pair, fraction in sorted({(k[0], k[1]) for k in agg}):
        budgets = sorted({k[3] for k in agg if k[:2] == (pair, fraction)})
        methods = _order({k[2] for k in agg if k[:2] == (pair, fraction)})
        out.append(f"\n**pair `{pair}`, {int(fraction * 100)} % of the training data** (test top-1 %, mean ± std over seeds)\n")
        out.append("| method | " + " | ".join(f"{b} ep" for b in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        for m in methods:
            cells = []
            for b in budgets:
                v = agg.get((pair, fraction, m, b))
                cells.append(f"{v[0]:.2f} ± {v[1]:.2f} ({v[2]})" if v else "–")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def speedups(agg: dict) -> str:
    """Smallest budget at which each method's mean reaches vanilla KD's best mean."""
    out = ["| pair | data | KD best (budget) | " + " | ".join(_order({k[2] for k in agg})) + " |"]
    methods = _order({k[2] for k in agg})
    out.append("|---|---|---|" + "---|" * len(methods))
    for pair, fraction in sorted({(k[0], k[1]) for k in agg}):
        kd = {k[3]: v[0] for k, v in agg.items() if k[:3] == (pair, fraction, "kd")}
        if not kd:
            continue
        best_budget = max(kd, key=lambda b: (kd[b], -b))
        target = kd[best_budget]
        cells = []
        for m in methods:
            ok = sorted(k[3] for k, v in agg.items() if k[:3] == (pair, fraction, m) and v[0] >= target)
            cells.append(f"{ok[0]} ep ({best_budget / ok[0]:.1f}×)" if ok else "not reached")
        out.append(f"| {pair} | {int(fraction * 100)} % | {target:.2f} ({best_budget} ep) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_accuracy(agg: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(k[0], k[1]) for k in agg})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (pair, fraction) in zip(axes[0], panels):
        for m in _order({k[2] for k in agg if k[:2] == (pair, fraction)}):
            pts = sorted((k[3], v) for k, v in agg.items() if k[:3] == (pair, fraction, m))
            ax.errorbar([b for b, _ in pts], [v[0] for _, v in pts], yerr=[v[1] for _, v in pts],
                        marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        budgets = sorted({k[3] for k in agg if k[:2] == (pair, fraction)})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("epoch budget")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{pair}, {int(fraction * 100)} % data", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stability(rows: list[dict], path: Path, title: str) -> Path | None:
    tracked = [r for r in rows if r.get("track") and r.get("stability")]
    if not tracked:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in tracked:
        ax_s.plot(range(1, len(r["stability"]) + 1), r["stability"], lw=0.8, label=r["method"])
        ax_a.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", label=r["method"])
    ax_s.set_yscale("log")
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("||Δθ_head|| per step")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("test top-1 (%)")
    for ax in (ax_s, ax_a):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stability_numbers(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("track") and r.get("stability"):
            s = r["stability"]
            q = max(1, len(s) // 4)
            out.append(f"- {r['method']}: median ||Δθ_head|| {statistics.median(s):.4f} over {len(s)} steps "
                       f"(first quarter {statistics.median(s[:q]):.4f}, last quarter {statistics.median(s[-q:]):.4f}); "
                       f"top-1 per epoch {', '.join(f'{a:.1f}' for a in r['curve'])}")
    return "\n".join(out)


def sweep_table(rows: list[dict]) -> str:
    if not rows:
        return "(no sweep)"
    lrs = sorted({r["lr"] for r in rows})
    out = ["| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in _order({r["method"] for r in rows}):
        vals = {r["lr"]: r["top1"] for r in rows if r["method"] == m}
        best = max(vals, key=vals.get)
        out.append(f"| {m} | " + " | ".join(
            (f"**{vals[lr]:.2f}**" if lr == best else f"{vals[lr]:.2f}") if lr in vals else "–" for lr in lrs) + " |")
    return "\n".join(out)


def write_report(results: Path, results_sweep: Path, outdir: Path, dataset: str) -> str:
    rows = load(results)
    agg = aggregate(rows)
    outdir = Path(outdir)
    acc_png = plot_accuracy(agg, outdir / f"accuracy-vs-epochs-{dataset}.png", f"{dataset}: top-1 vs epoch budget")
    stab_png = plot_stability(rows, outdir / f"stability-{dataset}.png", f"{dataset}: head parameter steps")
    wall = sum(r["wall_s"] for r in rows)
    parts = [f"### {dataset}: {len(rows)} runs, {wall / 60:.1f} min of training wall time",
             f"![accuracy vs epochs]({acc_png.name})", table(agg),
             "\n**Epochs needed to reach vanilla KD's best accuracy**\n", speedups(agg),
             "\n**Learning-rate sweep** (smallest budget, all data, seed 0, pair narrow)\n",
             sweep_table(load(results_sweep))]
    if stab_png:
        parts += [f"\n![stability]({stab_png.name})\n", stability_numbers(rows)]
    return "\n".join(parts)
