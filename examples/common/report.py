"""The picture of one finished run: its headline metric per image-quality group and its loss curves.

:func:`plot_run` writes ``OUT/summary.png`` from the run's ``metrics.json`` content and
``OUT/scalars.csv``: kappa (EyeQ) or mean AUC (ChestX-ray14) per quality group with the overall
figure as a line, the pre-training loss per epoch and the fine-tuning loss and training accuracy per
epoch.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.common.task import Task

__all__ = ["epoch_curves", "plot_run"]


def epoch_curves(csv_path: Path, stage: str, name: str) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of scalar ``name`` of ``stage`` in a run's ``scalars.csv`` (1-based epochs)."""
    if not csv_path.is_file():
        return [], []
    points: dict[int, float] = {}
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["stage"] == stage and row["name"] == name:
                points[int(row["epoch"]) + 1] = float(row["value"])
    epochs = sorted(points)
    return epochs, [points[e] for e in epochs]


def plot_run(out: Path, metrics: dict[str, Any], groups: Sequence[str], task: Task, title: str = "") -> Path:
    """Write ``out/summary.png``; returns its path.

    Args:
        out: the run directory (its ``scalars.csv`` gives the curves).
        metrics: the run's metrics (``metrics.json`` content).
        groups: the group names of ``metrics["per_quality"]`` in order.
        task: names the headline metric.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    h = task.headline
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    ax = axes[0]
    values = [metrics["per_quality"][g].get(h) for g in groups]
    heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar([g.capitalize() for g in groups], heights, color="tab:blue")
    for bar, v in zip(bars, values, strict=True):
        label = "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    overall = metrics.get(h)
    if overall is not None and math.isfinite(overall):
        ax.axhline(overall, color="black", linestyle="--", linewidth=0.8, label=f"all images {overall:.3f}")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel(task.plot.ylabel)
    ax.set_xlabel("image quality (test set)")
    ax.set_title(f"{task.headline_title} per image quality")
    low = min([0.0, *heights])
    ax.set_ylim(low - 0.05 if low < 0 else 0.0, max(1.0, *heights) + 0.15)  # room for the legend
    ax.grid(axis="y", alpha=0.3)

    csv_path = out / "scalars.csv"
    ep, loss = epoch_curves(csv_path, "pretrain", "loss")
    ax = axes[1]
    if ep:
        ax.plot(ep, loss, marker="o", color="tab:purple")
    else:
        ax.text(0.5, 0.5, "no pre-training", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("pre-training loss")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)

    ax = axes[2]
    ep, loss = epoch_curves(csv_path, "finetune", "loss")
    ep_acc, acc = epoch_curves(csv_path, "finetune", "accuracy")
    ax.plot(ep, loss, marker="o", color="tab:red", label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fine-tuning loss")
    ax.set_title("fine-tuning")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(ep_acc, acc, marker="s", color="tab:green", label="train accuracy")
    twin.set_ylabel("train accuracy")
    twin.set_ylim(0, 1)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], fontsize=7, loc="center right")
    for a in axes[1:]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path)
    plt.close(fig)
    return path
