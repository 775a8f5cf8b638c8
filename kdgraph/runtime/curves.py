"""curves.png: training losses and test top-1 per epoch, the training stages shaded."""

from __future__ import annotations

from pathlib import Path


def plot_curves(records: list[dict], plan, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in records if r["kind"] == "epoch"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["epoch"] + 1 for r in epochs]
    names = sorted({k for r in epochs for k in r if k.startswith("train_")})
    for name in names:
        ax_loss.plot(x, [r.get(name) for r in epochs], marker=".", label=name[6:])
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=7)
    ax_acc.plot(x, [r.get("student_top1") for r in epochs], marker="o", color="#2a9d8f", label="student")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    at = 0
    for st in plan.stages:
        for ax in (ax_loss, ax_acc):
            ax.axvspan(at + 0.5, at + st.epochs + 0.5, alpha=0.08 if st.index % 2 == 0 else 0.16, color="grey")
        ax_acc.text(at + 0.6, 0.02, f"stage {st.index}", transform=ax_acc.get_xaxis_transform(), fontsize=7)
        at += st.epochs
    ax_acc.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
