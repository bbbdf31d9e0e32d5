"""Paired differences between methods over repeats, with 95 % t-intervals: ``paired.json``, table, plot.

Every repeat (training seed) of a comparison draws its own data and labelled subset and runs every
method on them, so the per-repeat difference ``method - baseline`` removes the draw's difficulty,
which moves all methods together. The interval is Student's t over the repeats
(``scipy.stats.ttest_1samp(d).confidence_interval(0.95)``): it treats the repeats as independent
draws of the whole experiment (data, labelled subset, initialisation) and the test images of a repeat
as fixed; it needs at least two repeats.

Quantities compared (``QUANTITIES``): the headline metric over the whole test set, per quality group,
and the drop from the first group to the last (lower is more robust, so a negative difference
favours the method).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from examples.common.task import SingleLabelTask, Task

__all__ = ["comparison_pairs", "paired_differences", "paired_table", "plot_paired"]

CONFIDENCE = 0.95


def comparison_pairs(methods: Sequence[str], baseline: str = "ce") -> list[tuple[str, str]]:
    """``(method, reference)`` pairs: every method against ``baseline``, then CoMCL against SimCLR and SupCon.

    Examples:
        >>> comparison_pairs(["ce", "simclr", "comcl"])
        [('simclr', 'ce'), ('comcl', 'ce'), ('comcl', 'simclr')]
    """
    pairs = [(m, baseline) for m in methods if m != baseline and baseline in methods]
    pairs += [("comcl", ref) for ref in ("simclr", "supcon") if "comcl" in methods and ref in methods]
    return pairs


def _quantities(run: dict[str, Any], groups: Sequence[str], task: Task) -> dict[str, float | None]:
    h = task.headline
    out: dict[str, float | None] = {"overall": run.get(h)}
    for g in groups:
        out[g] = run["per_quality"][g].get(h)
    first, last = out[groups[0]], out[groups[-1]]
    out["drop"] = None if first is None or last is None else first - last
    return out


def _interval(diffs: list[float]) -> tuple[float, float]:
    if len(diffs) < 2:
        return math.nan, math.nan
    if max(diffs) == min(diffs):  # no spread: scipy's t statistic is undefined; the interval is the point
        return diffs[0], diffs[0]
    from scipy import stats

    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def paired_differences(
    runs: Mapping[str, Sequence[dict[str, Any]]],
    groups: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    task: Task | None = None,
) -> dict[str, Any]:
    """Per-repeat differences of each pair and their mean with a 95 % t-interval.

    Args:
        runs: method -> its ``metrics.json`` per repeat (each with ``seed``).
        groups: the quality groups; the drop is first minus last.
        pairs: ``(method, reference)``; repeats are matched by ``seed`` (only seeds both ran).
        task: which headline (default :class:`~examples.common.task.SingleLabelTask`: kappa).

    Returns:
        ``{"method - reference": {"method", "reference", "seeds", quantity: {"mean", "low", "high", "n",
        "per_repeat", "method_mean", "reference_mean"}}}`` for quantity in ``overall``, each group and
        ``drop``; ``low``/``high`` are NaN with fewer than two repeats.
    """
    task = task if task is not None else SingleLabelTask()
    out: dict[str, Any] = {}
    for method, ref in pairs:
        if method not in runs or ref not in runs:
            continue
        by_seed = {r.get("seed"): r for r in runs[ref]}
        matched = [(r, by_seed[r.get("seed")]) for r in runs[method] if r.get("seed") in by_seed]
        entry: dict[str, Any] = {"method": method, "reference": ref, "seeds": [a.get("seed") for a, _ in matched]}
        for q in ["overall", *groups, "drop"]:
            pairs_q = [(_quantities(a, groups, task)[q], _quantities(b, groups, task)[q]) for a, b in matched]
            valid = [(x, y) for x, y in pairs_q if x is not None and y is not None and math.isfinite(x - y)]
            diffs = [x - y for x, y in valid]
            low, high = _interval(diffs)
            entry[q] = {
                "mean": sum(diffs) / len(diffs) if diffs else math.nan,
                "low": low,
                "high": high,
                "n": len(diffs),
                "per_repeat": diffs,
                "method_mean": sum(x for x, _ in valid) / len(valid) if valid else math.nan,
                "reference_mean": sum(y for _, y in valid) / len(valid) if valid else math.nan,
            }
        out[f"{method} - {ref}"] = entry
    return out


def _num(x: float | None) -> float:
    """A number of ``paired.json`` (JSON writes NaN as ``null``)."""
    return math.nan if x is None else float(x)


def _ci(d: dict[str, Any]) -> str:
    if not math.isfinite(_num(d["mean"])):
        return "n/a"
    if not math.isfinite(_num(d["low"])):
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def paired_table(paired: dict[str, Any], groups: Sequence[str], task: Task | None = None) -> str:
    """Markdown table: one row per pair, mean paired difference [95 % t-interval] per quantity."""
    task = task if task is not None else SingleLabelTask()
    labels = task.method_labels
    head = [
        "difference",
        "repeats",
        task.metric_titles.get(task.headline, task.headline),
        *[f"{task.headline_title} {g}" for g in groups],
        f"{task.gap_title} {groups[0]}→{groups[-1]}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in paired.values():
        name = f"{labels.get(entry['method'], entry['method'])} − {labels.get(entry['reference'], entry['reference'])}"
        cells = [name, str(entry["overall"]["n"]), _ci(entry["overall"])]
        cells += [_ci(entry[g]) for g in groups]
        cells.append(_ci(entry["drop"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_paired(
    paired: dict[str, Any], groups: Sequence[str], path: str | Path, task: Task | None = None, title: str = ""
) -> None:
    """Dot-and-interval plot: each pair's mean difference and 95 % interval, overall and per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = task if task is not None else SingleLabelTask()
    labels = task.method_labels
    quantities = ["overall", *groups]
    names = list(paired)
    fig, ax = plt.subplots(figsize=(2.0 + 1.8 * len(quantities), 4.2), dpi=120)
    width = 0.8 / max(1, len(names))
    for j, key in enumerate(names):
        entry = paired[key]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(quantities))]
        means = [_num(entry[q]["mean"]) for q in quantities]
        lows = [_num(entry[q]["low"]) for q in quantities]
        highs = [_num(entry[q]["high"]) for q in quantities]
        err = [
            [m - lo if math.isfinite(lo) else 0.0 for m, lo in zip(means, lows, strict=True)],
            [hi - m if math.isfinite(hi) else 0.0 for m, hi in zip(means, highs, strict=True)],
        ]
        label = f"{labels.get(entry['method'], entry['method'])} − {labels.get(entry['reference'], entry['reference'])}"
        ax.errorbar(xs, means, yerr=err, fmt="o", capsize=3, markersize=4, label=label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(quantities)), [q.capitalize() for q in quantities])
    ax.set_xlabel("test images")
    ax.set_ylabel(f"paired difference in {task.metric_titles.get(task.headline, task.headline)} (95 % t-interval)")
    ax.set_title(title or "paired differences over repeats")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
