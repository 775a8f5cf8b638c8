"""kdgraph.runtime.curves: curves.png is drawn from the run's records.

Independent truth: the records given (hand-written epoch and step records) read back from the
figure's own lines and shaded spans (the figure is kept from ``plt.close`` to be inspected)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot as plt
import pytest

from kdgraph.runtime.curves import plot_curves

matplotlib.use("Agg")


def _kept(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    return figures


def test_the_figure_plots_the_records(tmp_path, monkeypatch):
    figures = _kept(monkeypatch)
    records = [{"kind": "step", "global_step": 1, "lr": 0.1}, {"kind": "step", "global_step": 2, "lr": 0.05},
               {"kind": "epoch", "epoch": 0, "train_ce": 2.0, "train_mse1": 0.5, "student_top1": 40.0},
               {"kind": "stability", "global_step": 2, "dtheta_block1": 1.0},
               {"kind": "epoch", "epoch": 1, "train_ce": 1.0, "train_mse1": 0.25, "student_top1": 60.0}]
    plan = SimpleNamespace(stages=[SimpleNamespace(index=0, epochs=1), SimpleNamespace(index=1, epochs=1)])
    path = plot_curves(records, plan, tmp_path / "curves.png", title="t", teacher_top1=70.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_loss, ax_acc, ax_lr = figures[0].axes
    assert {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax_loss.lines} == \
        {"ce": ([1, 2], [2.0, 1.0]), "mse1": ([1, 2], [0.5, 0.25])}
    student, teacher = ax_acc.lines
    assert (list(student.get_xdata()), list(student.get_ydata())) == ([1, 2], [40.0, 60.0])
    assert list(teacher.get_ydata()) == [70.0, 70.0]  # the teacher's reference line
    assert (list(ax_lr.lines[0].get_xdata()), list(ax_lr.lines[0].get_ydata())) == ([1, 2], [0.1, 0.05])
    spans = [p.get_x() for p in ax_acc.patches]  # each stage shaded over its epochs: 0.5-1.5, 1.5-2.5
    assert spans == pytest.approx([0.5, 1.5])


def test_a_run_with_no_logged_step_says_so(tmp_path, monkeypatch):
    figures = _kept(monkeypatch)
    plan = SimpleNamespace(stages=[SimpleNamespace(index=0, epochs=1)])
    plot_curves([{"kind": "epoch", "epoch": 0, "train_ce": 1.0, "student_top1": 10.0}], plan, tmp_path / "c.png")
    assert [t.get_text() for t in figures[0].axes[2].texts] == ["no step logged (runtime.log_every)"]
