"""Comparison of methods over seeds: ``compare.json``, a Markdown table and a kappa-per-quality plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from examples.common.evaluate import METRICS
from examples.common.runlog import write_json

__all__ = ["COMPARE_METHODS", "METHOD_LABELS", "aggregate", "markdown_table", "plot_kappa", "run_comparison"]

COMPARE_METHODS = ("ce", "simclr", "supcon", "comcl_no_spl", "comcl_no_quality", "comcl")
METHOD_LABELS = {
    "ce": "cross-entropy only",
    "simclr": "SimCLR pre-training",
    "supcon": "SupCon pre-training",
    "comcl_no_spl": "CoMCL w/o self-paced",
    "comcl_no_quality": "CoMCL w/o quality level",
    "comcl": "CoMCL (full)",
}


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: Sequence[dict[str, Any]], groups: Sequence[str]) -> dict[str, Any]:
    """Mean of each metric over seeds (top level, as ``metrics.json``), ``std`` and the per-seed ``runs``."""
    out: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for m in METRICS:
        out[m], std[m] = _mean_std([r.get(m) for r in runs])
    out["per_quality"], std["per_quality"] = {}, {}
    for g in groups:
        out["per_quality"][g], std["per_quality"][g] = {}, {}
        for m in METRICS:
            out["per_quality"][g][m], std["per_quality"][g][m] = _mean_std([r["per_quality"][g].get(m) for r in runs])
    drops = [
        r["per_quality"][groups[0]]["kappa"] - r["per_quality"][groups[-1]]["kappa"]
        for r in runs
        if r["per_quality"][groups[0]].get("kappa") is not None
        and r["per_quality"][groups[-1]].get("kappa") is not None
    ]
    out["kappa_drop"], std["kappa_drop"] = _mean_std(drops)
    out["std"] = std
    out["seeds"] = [r.get("seed") for r in runs]
    out["runs"] = list(runs)
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def markdown_table(results: dict[str, dict[str, Any]], groups: Sequence[str]) -> str:
    """Markdown table: one row per method, overall metrics and kappa per quality group."""
    head = [
        "method",
        "accuracy",
        "kappa",
        "macro-F1",
        "AUC",
        *[f"kappa {g}" for g in groups],
        f"kappa drop {groups[0]}→{groups[-1]}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        n = len(r.get("runs", [])) or 1
        s = r["std"]
        cells = [METHOD_LABELS.get(method, method)]
        cells += [_fmt(r[m], s[m], n) for m in METRICS]
        cells += [_fmt(r["per_quality"][g]["kappa"], s["per_quality"][g]["kappa"], n) for g in groups]
        cells.append(_fmt(r["kappa_drop"], s["kappa_drop"], n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_kappa(results: dict[str, dict[str, Any]], groups: Sequence[str], path: str | Path, title: str = "") -> None:
    """Grouped bar chart: quadratic kappa per quality group (x) per method (bars), error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(groups), 4.2), dpi=120)
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        r = results[method]
        means = [r["per_quality"][g]["kappa"] for g in groups]
        stds = [r["std"]["per_quality"][g]["kappa"] for g in groups]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(
            xs,
            [0 if not math.isfinite(m) else m for m in means],
            width,
            yerr=[0 if not math.isfinite(s) else s for s in stds],
            capsize=2,
            label=METHOD_LABELS.get(method, method),
        )
    ax.set_xticks(range(len(groups)), [g.capitalize() for g in groups])
    ax.set_xlabel("image quality (test set)")
    ax.set_ylabel("quadratic-weighted kappa")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(title or "kappa per image quality")
    low = min([0.0] + [b.get_height() for b in ax.patches])
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
) -> dict[str, Any]:
    """Run every method for every seed (``run_one(method, seed, run_dir)``) and write the summaries.

    Writes ``OUT/compare.json`` (method -> mean metrics, ``std``, per-seed ``runs``), ``OUT/compare.md``
    and ``OUT/compare_kappa.png``; rewritten after each run, so partial results are visible.
    """
    out = Path(out_dir)
    results: dict[str, Any] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            runs.append(run_one(method, seed, out / method / f"seed{seed}"))
            results[method] = aggregate(runs, groups)
            write_json(out / "compare.json", results)
            (out / "compare.md").write_text(markdown_table(results, groups), encoding="utf-8")
    plot_kappa(results, groups, out / "compare_kappa.png", title)
    return results
