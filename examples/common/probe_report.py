"""Probes of a comparison: run them on each (method, repeat)'s frozen encoder, pair them, tabulate and plot.

:func:`probe_encoder` runs the three probes of :mod:`examples.common.probes` on one pre-trained
encoder and caches the result as ``probes.json`` beside its ``encoder.pt`` (keyed by the encoder's
fingerprint). :func:`probe_summary` aggregates the probes of a comparison's runs (each run's
``metrics["probes"]``) per method and pairs them, as the benchmark protocol pairs fine-tuning
scores: per repeat the difference CoMCL − reference (SimCLR, SupCon, the ablations), its mean and a
95 % Student's t-interval over the repeats (``scipy.stats.ttest_1samp``); :func:`probe_table` and
:func:`plot_probe_pairs` show them. Cross-entropy only has no pre-trained encoder: its row is the
encoder every method of the repeat starts from (:func:`initial_encoder`), the reference without
pre-training.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from examples.common.finetune import GradingDataset
from examples.common.models import build_encoder
from examples.common.pipeline import PipelineData, load_encoder
from examples.common.probes import (
    PROBE_KEYS,
    artefact_retrieval,
    encode,
    encode_views,
    linear_probe,
    quality_invariance,
)
from examples.common.runlog import write_json

__all__ = [
    "INITIAL_LABEL",
    "PROBE_TITLES",
    "initial_encoder",
    "plot_probe_pairs",
    "probe_encoder",
    "probe_initial",
    "probe_pairs",
    "probe_section",
    "probe_summary",
    "probe_table",
    "run_probes",
]

PROBE_TITLES = {
    "linear_kappa": "linear probe κ",
    "artefact_auroc": "artefact retrieval AUROC",
    "artefact_precision_at_k": "artefact retrieval precision@k",
    "invariance_auroc": "quality invariance AUROC",
    "invariance_margin": "quality invariance margin",
}
INITIAL_LABEL = "initial encoder (no pre-training)"
CONFIDENCE = 0.95
RETRIEVAL_K = 10


def _single_label(*datasets: GradingDataset) -> bool:
    return all(isinstance(t, int) for d in datasets for t in d.targets)


def run_probes(encoder: torch.nn.Module, data: PipelineData, device: str = "cpu") -> dict[str, Any]:
    """The three probes on a frozen ``encoder``: ``{"linear", "artefact", "invariance"}`` and :data:`PROBE_KEYS`.

    The linear probe needs single-class integer targets (skipped otherwise); the patch probes need
    ``data.probe_views`` (held-out four views; skipped when ``None``). A skipped probe's scalars are NaN.
    """
    out: dict[str, Any] = dict.fromkeys(PROBE_KEYS, math.nan)
    train = data.train
    test = data.test
    if isinstance(train, GradingDataset) and isinstance(test, GradingDataset) and _single_label(train, test):
        plain = GradingDataset(train.load, train.targets, train.groups, augment=False)
        x_train, x_test = encode(encoder, plain, device), encode(encoder, test, device)
        out["linear"] = linear_probe(
            x_train,
            torch.tensor(train.targets),
            x_test,
            torch.tensor(test.targets),
            torch.tensor(test.groups),
            data.group_names,
            data.num_classes,
        )
        out["linear_kappa"] = out["linear"]["kappa"]
    if data.probe_views is not None:
        feats, tags = encode_views(encoder, data.probe_views, device)
        out["artefact"] = artefact_retrieval(feats, tags, k=RETRIEVAL_K)
        out["invariance"] = quality_invariance(feats, tags)
        out["artefact_auroc"] = out["artefact"]["auroc"]
        out["artefact_precision_at_k"] = out["artefact"]["precision_at_k"]
        out["invariance_auroc"] = out["invariance"]["auroc"]
        out["invariance_margin"] = out["invariance"]["margin"]
    return out


def _cached(cache: Path, fingerprint: str, make: Any, data: PipelineData, device: str, info: dict) -> dict[str, Any]:
    if cache.is_file():
        found = json.loads(cache.read_text(encoding="utf-8"))
        if found.get("fingerprint") == fingerprint:
            return dict(found["probes"])
    probes = run_probes(make().to(device), data, device)
    write_json(cache, {"fingerprint": fingerprint, **info, "probes": probes})
    return json.loads(cache.read_text(encoding="utf-8"))["probes"]  # NaN as null, as every reader sees it


def probe_encoder(
    encoder_file: Path,
    method: str,
    seed: int,
    model_cfg: Any,
    data: PipelineData,
    device: str = "cpu",
    cache: Path | None = None,
) -> dict[str, Any]:
    """:func:`run_probes` of the encoder in ``encoder_file`` (read weights-only; method and seed checked).

    The result is cached in ``cache`` (default ``probes.json`` beside the encoder) with the encoder's
    fingerprint, and read from there while the fingerprint matches.
    """
    state = load_encoder(encoder_file, method, seed)

    def make() -> torch.nn.Module:
        encoder = build_encoder(model_cfg.arch, model_cfg.width, None)
        encoder.load_state_dict(state["encoder"])
        return encoder

    cache = Path(encoder_file).with_name("probes.json") if cache is None else Path(cache)
    return _cached(cache, str(state["fingerprint"]), make, data, device, {"method": method, "seed": seed})


def initial_encoder(model_cfg: Any, seed: int) -> torch.nn.Module:
    """The encoder every method of repeat ``seed`` starts from (``torch.manual_seed(seed)``, then built).

    The pipeline seeds everything with the run's seed and builds the encoder first, so this is the
    initialisation of every method's pre-training in that repeat (and of cross-entropy only's
    fine-tuning): the probes' reference without pre-training. The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(model_cfg.arch, model_cfg.width, model_cfg.weights)


def probe_initial(seed: int, model_cfg: Any, data: PipelineData, cache: Path, device: str = "cpu") -> dict[str, Any]:
    """:func:`run_probes` of :func:`initial_encoder`, cached in ``cache`` (keyed by the model config and seed)."""
    key = json.dumps({"initial": True, "seed": seed, "model": vars(model_cfg)}, sort_keys=True, default=str)
    return _cached(Path(cache), key, lambda: initial_encoder(model_cfg, seed), data, device, {"seed": seed})


def probe_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """CoMCL against each other method present (``ce``: the initial encoder), then SimCLR against ``ce``.

    Examples:
        >>> probe_pairs(["ce", "simclr", "comcl_no_spl", "comcl"])
        [('comcl', 'ce'), ('comcl', 'simclr'), ('comcl', 'comcl_no_spl'), ('simclr', 'ce')]
    """
    refs = ("ce", "simclr", "supcon", "comcl_no_spl", "comcl_no_quality")
    pairs = [("comcl", r) for r in refs if "comcl" in methods and r in methods]
    return pairs + ([("simclr", "ce")] if "simclr" in methods and "ce" in methods else [])


def _value(run: dict[str, Any], key: str) -> float | None:
    v = run.get("probes", {}).get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _interval(diffs: list[float]) -> tuple[float, float]:
    if len(diffs) < 2:
        return math.nan, math.nan
    if max(diffs) == min(diffs):  # no spread: the t statistic is undefined; the interval is the point
        return diffs[0], diffs[0]
    from scipy import stats

    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def probe_summary(runs: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Per method the mean, std and per-repeat values of each probe; per pair the paired differences.

    Args:
        runs: method -> its runs' metrics (each with ``seed`` and, when probed, ``probes``).

    Returns:
        ``{"methods": {method: {key: {"mean", "std", "n", "per_repeat"}}}, "paired": {"comcl - ref":
        {"method", "reference", "seeds", key: {"mean", "low", "high", "n", "per_repeat"}}}, "linear_per_quality":
        {method: {group: {"mean", "std", "n"}}}}`` (the linear probe's kappa per quality group); empty
        ``methods`` when no run was probed.
    """
    methods: dict[str, Any] = {}
    for m, rs in runs.items():
        if not any("probes" in r for r in rs):
            continue
        methods[m] = {}
        for key in PROBE_KEYS:
            xs = [v for v in (_value(r, key) for r in rs) if v is not None]
            methods[m][key] = {
                "mean": statistics.fmean(xs) if xs else math.nan,
                "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
                "n": len(xs),
                "per_repeat": xs,
            }
    per_quality: dict[str, Any] = {}
    for m, rs in runs.items():
        linear = [r["probes"]["linear"] for r in rs if isinstance(r.get("probes", {}).get("linear"), dict)]
        if linear:
            per_quality[m] = {}
            for g in linear[0]["per_quality"]:
                ks = [q["per_quality"].get(g, {}).get("kappa") for q in linear]
                xs = [float(v) for v in ks if isinstance(v, int | float) and math.isfinite(v)]
                per_quality[m][g] = {
                    "mean": statistics.fmean(xs) if xs else math.nan,
                    "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
                    "n": len(xs),
                }
    paired: dict[str, Any] = {}
    for m, ref in probe_pairs(list(methods)):
        by_seed = {r.get("seed"): r for r in runs[ref]}
        matched = [(a, by_seed[a.get("seed")]) for a in runs[m] if a.get("seed") in by_seed]
        entry: dict[str, Any] = {"method": m, "reference": ref, "seeds": [a.get("seed") for a, _ in matched]}
        for key in PROBE_KEYS:
            values = [(_value(a, key), _value(b, key)) for a, b in matched]
            diffs = [x - y for x, y in values if x is not None and y is not None]
            low, high = _interval(diffs)
            mean = statistics.fmean(diffs) if diffs else math.nan
            entry[key] = {"mean": mean, "low": low, "high": high, "n": len(diffs), "per_repeat": diffs}
        paired[f"{m} - {ref}"] = entry
    return {"methods": methods, "paired": paired, "linear_per_quality": per_quality}


def _cell(d: dict[str, Any], paired: bool) -> str:
    """One table cell; a value read back from JSON may be ``null`` (NaN written by ``write_json``)."""
    mean, low, high, std = (math.nan if d.get(k) is None else float(d[k]) for k in ("mean", "low", "high", "std"))
    if not math.isfinite(mean):
        return "n/a"
    if paired:
        if not math.isfinite(low):
            return f"{mean:+.3f}"
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def probe_table(summary: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """Markdown: probes per method (mean ± std over repeats), then paired differences [95 % t-interval]."""
    labels = labels or {}
    if not summary["methods"]:
        return ""
    head = ["method", "repeats", *[PROBE_TITLES[k] for k in PROBE_KEYS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, vals in summary["methods"].items():
        n = max(v["n"] for v in vals.values())
        lines.append(f"| {labels.get(m, m)} | {n} | " + " | ".join(_cell(vals[k], False) for k in PROBE_KEYS) + " |")
    if summary["paired"]:
        lines += ["", "| difference | repeats | " + " | ".join(PROBE_TITLES[k] for k in PROBE_KEYS) + " |"]
        lines.append("|" + "---|" * (len(PROBE_KEYS) + 2))
        for e in summary["paired"].values():
            name = f"{labels.get(e['method'], e['method'])} − {labels.get(e['reference'], e['reference'])}"
            n = max(e[k]["n"] for k in PROBE_KEYS)
            lines.append(f"| {name} | {n} | " + " | ".join(_cell(e[k], True) for k in PROBE_KEYS) + " |")
    by_group = summary.get("linear_per_quality") or {}
    if by_group:
        groups = list(next(iter(by_group.values())))
        lines += ["", "| method | " + " | ".join(f"linear probe κ {g}" for g in groups) + " |"]
        lines.append("|" + "---|" * (len(groups) + 1))
        for m, vals in by_group.items():
            lines.append(f"| {labels.get(m, m)} | " + " | ".join(_cell(vals[g], False) for g in groups) + " |")
    return "\n".join(lines) + "\n"


def plot_probe_pairs(summary: dict[str, Any], path: str | Path, labels: dict[str, str] | None = None) -> None:
    """Dot-and-interval plot: each pair's mean difference per probe with its 95 % t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    names = list(summary["paired"])
    fig, ax = plt.subplots(figsize=(2.0 + 1.7 * len(PROBE_KEYS), 4.2), dpi=120)
    width = 0.8 / max(1, len(names))
    for j, key in enumerate(names):
        e = summary["paired"][key]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(PROBE_KEYS))]
        means = [e[k]["mean"] for k in PROBE_KEYS]
        err = [
            [m - e[k]["low"] if math.isfinite(e[k]["low"]) else 0.0 for m, k in zip(means, PROBE_KEYS, strict=True)],
            [e[k]["high"] - m if math.isfinite(e[k]["high"]) else 0.0 for m, k in zip(means, PROBE_KEYS, strict=True)],
        ]
        label = f"{labels.get(e['method'], e['method'])} − {labels.get(e['reference'], e['reference'])}"
        ax.errorbar(xs, means, yerr=err, fmt="o", capsize=3, markersize=4, label=label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(PROBE_KEYS)), [PROBE_TITLES[k].replace(" ", "\n", 1) for k in PROBE_KEYS], fontsize=7)
    ax.set_ylabel("paired difference (95 % t-interval)")
    ax.set_title("probes of the frozen encoder: paired differences over repeats")
    if names:
        ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def probe_section(runs: Mapping[str, Sequence[dict[str, Any]]], out: str | Path, labels: dict[str, str]) -> str:
    """Write ``OUT/probes.json`` (:func:`probe_summary`) and ``OUT/paired_probes.png``; the Markdown section.

    Returns ``""`` (and writes nothing) when no run was probed; the plot needs two paired repeats.
    """
    summary = probe_summary(runs)
    if not summary["methods"]:
        return ""
    labels = labels | {"ce": INITIAL_LABEL}
    out = Path(out)
    write_json(out / "probes.json", summary)
    if any(e[k]["n"] >= 2 for e in summary["paired"].values() for k in PROBE_KEYS):
        plot_probe_pairs(summary, out / "paired_probes.png", labels)
    head = "\nProbes of the frozen pre-trained encoders (held-out test images), mean ± std over repeats; "
    head += "paired differences, mean [95 % t-interval]:\n\n"
    return head + probe_table(summary, labels)
