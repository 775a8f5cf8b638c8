"""curves.png: training losses, test top-1 per epoch (the teacher's as a reference line) and
the learning rate per logged step, the training stages shaded."""

from __future__ import annotations

from pathlib import Path

from kdgraph.schedules import stage_starts


def plot_curves(records: list[dict], plan, path: Path, title: str = "", teacher_top1: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in records if r["kind"] == "epoch"]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 3.8))
    x = [r["epoch"] + 1 for r in epochs]
    names = sorted({k for r in epochs for k in r if k.startswith("train_")})
    for name in names:
        ax_loss.plot(x, [r.get(name) for r in epochs], marker=".", label=name[6:])
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=7)
    ax_acc.plot(x, [r.get("student_top1") for r in epochs], marker="o", color="#2a9d8f", label="student")
    if teacher_top1 is not None:
        ax_acc.axhline(teacher_top1, ls="--", lw=1, color="#e76f51", label=f"teacher {teacher_top1:.2f}%")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    for st, at in zip(plan.stages, stage_starts([st.epochs for st in plan.stages])):
        for ax in (ax_loss, ax_acc):
            ax.axvspan(at + 0.5, at + st.epochs + 0.5, alpha=0.08 if st.index % 2 == 0 else 0.16, color="grey")
        ax_acc.text(at + 0.6, 0.02, f"stage {st.index}", transform=ax_acc.get_xaxis_transform(), fontsize=7)
    ax_acc.legend(fontsize=7)
    steps = [r for r in records if r["kind"] == "step" and "lr" in r]
    ax_lr.plot([r["global_step"] for r in steps], [r["lr"] for r in steps], lw=1, color="#264653")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    if not steps:
        ax_lr.text(0.5, 0.5, "no step logged (runtime.log_every)", ha="center", transform=ax_lr.transAxes, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
