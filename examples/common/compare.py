"""Comparison of methods over seeds: ``compare.json``, a Markdown table and a plot of the headline per group.

What is aggregated, tabulated and plotted comes from the :class:`~examples.common.task.Task`: its
scalar ``metrics``, its ``group_metrics`` per group, its ``headline`` (per-group columns, plot, and the
drop ``gap`` from the first to the last group) and, for a multi-label task, the per-label AUC.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from examples.common.paired import comparison_pairs, paired_differences, paired_table, plot_paired
from examples.common.probe_report import probe_section
from examples.common.runlog import write_json
from examples.common.task import METHOD_LABELS, SingleLabelTask, Task

__all__ = ["COMPARE_METHODS", "METHOD_LABELS", "aggregate", "markdown_table", "plot_groups", "run_comparison"]

COMPARE_METHODS = ("ce", "simclr", "supcon", "comcl_no_spl", "comcl_no_quality", "comcl")


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: Sequence[dict[str, Any]], groups: Sequence[str], task: Task | None = None) -> dict[str, Any]:
    """Mean of each metric over seeds (top level, as ``metrics.json``), ``std`` and the per-seed ``runs``.

    Args:
        runs: ``metrics.json`` of each seed.
        groups: group names (keys of ``per_quality``), first and last define the drop.
        task: which metrics (default :class:`~examples.common.task.SingleLabelTask`).
    """
    task = task if task is not None else SingleLabelTask()
    out: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for m in task.metrics:
        out[m], std[m] = _mean_std([r.get(m) for r in runs])
    if task.label_key is not None:
        key = task.label_key
        out[key], std[key] = {}, {}
        for name in task.label_names:
            out[key][name], std[key][name] = _mean_std([r[key].get(name) for r in runs])
    out["per_quality"], std["per_quality"] = {}, {}
    for g in groups:
        out["per_quality"][g], std["per_quality"][g] = {}, {}
        for m in task.group_metrics:
            out["per_quality"][g][m], std["per_quality"][g][m] = _mean_std([r["per_quality"][g].get(m) for r in runs])
    h = task.headline
    drops = [
        r["per_quality"][groups[0]][h] - r["per_quality"][groups[-1]][h]
        for r in runs
        if r["per_quality"][groups[0]].get(h) is not None and r["per_quality"][groups[-1]].get(h) is not None
    ]
    out[task.gap], std[task.gap] = _mean_std(drops)
    out["std"] = std
    out["seeds"] = [r.get("seed") for r in runs]
    out["runs"] = list(runs)
    return out


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None or std is None or not math.isfinite(mean):  # JSON keeps NaN as null
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def markdown_table(results: dict[str, dict[str, Any]], groups: Sequence[str], task: Task | None = None) -> str:
    """Markdown table: one row per method, overall metrics and the headline per group; then AUC per label."""
    task = task if task is not None else SingleLabelTask()
    h = task.headline
    head = [
        "method",
        *[task.metric_titles[m] for m in task.metrics],
        *[f"{task.headline_title} {g}" for g in groups],
        f"{task.gap_title} {groups[0]}→{groups[-1]}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        n = len(r.get("runs", [])) or 1
        s = r["std"]
        cells = [task.method_labels.get(method, method)]
        cells += [_fmt(r[m], s[m], n) for m in task.metrics]
        cells += [_fmt(r["per_quality"][g][h], s["per_quality"][g][h], n) for g in groups]
        cells.append(_fmt(r[task.gap], s[task.gap], n))
        lines.append("| " + " | ".join(cells) + " |")
    if task.label_key is not None:
        names = task.label_names
        lines += ["", "| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for method, r in results.items():
            values = [r[task.label_key][name] for name in names]
            cells = [f"{v:.2f}" if math.isfinite(v) else "n/a" for v in values]
            lines.append(f"| {task.method_labels.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_groups(
    results: dict[str, dict[str, Any]],
    groups: Sequence[str],
    path: str | Path,
    task: Task | None = None,
    title: str = "",
) -> None:
    """Grouped bar chart: the task's headline per group (x) per method (bars), error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    task = task if task is not None else SingleLabelTask()
    h, plot = task.headline, task.plot
    methods = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(groups), 4.2), dpi=120)
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        r = results[method]
        means = [r["per_quality"][g][h] for g in groups]
        stds = [r["std"]["per_quality"][g][h] for g in groups]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(
            xs,
            [0 if not math.isfinite(m) else m for m in means],
            width,
            yerr=[0 if not math.isfinite(s) else s for s in stds],
            capsize=2,
            label=task.method_labels.get(method, method),
        )
    ax.set_xticks(range(len(groups)), [g.capitalize() for g in groups])
    ax.set_xlabel("image quality (test set)")
    ax.set_ylabel(plot.ylabel)
    if plot.zero_line:
        ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(title or plot.title)
    if plot.ylim is not None:
        ax.set_ylim(*plot.ylim)
    else:
        low = min([0.0] + [b.get_height() for b in ax.patches if isinstance(b, Rectangle)])  # the bars
        ax.set_ylim(low - 0.05 if low < 0 else 0.0, 1.3)  # room above the bars for the legend
    ax.legend(fontsize=7, loc="upper center", ncols=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_comparison(
    run_one: Callable[[str, int, Path], dict[str, Any]],
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    groups: Sequence[str],
    title: str = "",
    task: Task | None = None,
    write: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method for every seed (``run_one(method, seed, run_dir)``) and write the summaries.

    Repeats come first (seed 0 for every method, then seed 1, ...), so an interrupted comparison has
    whole repeats to pair. Writes ``OUT/compare.json`` (method -> mean metrics, ``std``, per-seed
    ``runs``), ``OUT/paired.json`` (:func:`~examples.common.paired.paired_differences` of
    :func:`~examples.common.paired.comparison_pairs`), ``OUT/compare.md`` (both tables),
    ``OUT/protocol.json`` (``meta``, the seeds done, wall time, torch threads) and the plots
    ``OUT/<task.plot.filename>`` and ``OUT/paired_<headline>.png``; rewritten after each run, so
    partial results are visible. With ``write=False`` (ranks other than 0 of a multi-process run)
    nothing is written.
    """
    import torch

    task = task if task is not None else SingleLabelTask()
    out = Path(out_dir)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    results: dict[str, Any] = {}
    pairs = comparison_pairs(methods)
    start = time.perf_counter()
    for i, seed in enumerate(seeds):
        for method in methods:
            runs[method].append(run_one(method, seed, out / method / f"seed{seed}"))
            results = {m: aggregate(r, groups, task) for m, r in runs.items() if r}
            if write:
                paired = paired_differences(runs, groups, pairs, task)
                write_json(out / "compare.json", results)
                write_json(out / "paired.json", paired)
                table = markdown_table(results, groups, task)
                if paired:
                    table += "\nPaired differences over repeats, mean [95 % t-interval]:\n\n"
                    table += paired_table(paired, groups, task)
                table += probe_section(runs, out, task.method_labels)  # probes.json and its plot ("" unprobed)
                (out / "compare.md").write_text(table, encoding="utf-8")
                info = dict(meta or {})
                info |= {
                    "seeds_done": list(seeds[:i]) + ([seed] if method == methods[-1] else []),
                    "wall_s": time.perf_counter() - start,
                    "torch_threads": torch.get_num_threads(),
                }
                write_json(out / "protocol.json", info)
        if write:
            plot_groups(results, groups, out / task.plot.filename, task, title)
            if pairs and i >= 1:
                plot_paired(paired, groups, out / f"paired_{task.headline}.png", task, title)
    return results
