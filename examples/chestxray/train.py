"""NIH ChestX-ray14 pipeline: CoMCL pre-training, 14-label BCE fine-tuning, per-label AUC per image quality.

With no arguments it runs CoMCL on the built-in synthetic chest X-rays (``configs/default.yaml``)::

    python examples/chestxray/train.py                       # CoMCL, synthetic data, ~1.5 min on 2 CPU cores
    python examples/chestxray/train.py --out runs/x --method ce --set finetune.epochs=10
    python examples/chestxray/train.py --out runs/x --resume # continue an interrupted run
    python examples/chestxray/train.py --compare --seeds 3 --out runs/chest-compare
    python examples/chestxray/train.py --config examples/chestxray/configs/real_gpu.yaml \
        --set data.chestxray14.root=/data/ChestX-ray14

Writes ``OUT/metrics.json`` (``mean_auc``, ``per_label_auc``, ``per_quality`` good / usable / reject
with the same keys), ``OUT/scalars.csv``, TensorBoard events, ``OUT/config.yaml`` and
``OUT/checkpoint.pt`` (updated atomically after every epoch). ``--compare`` writes
``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare_auc.png``. See examples/chestxray/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS and torch ship separate OpenMP pools (see index.py)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.chestxray.data import LABELS, QUALITY_NAMES, ChestXrayDataConfig  # noqa: E402
from examples.common.checkpoint import CheckpointError  # noqa: E402
from examples.common.config import (  # noqa: E402
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    check,
    config_to_dict,
    load_config,
)
from examples.eyeq.train import METHOD_CHOICES, RunConfig, _cached_or_run  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
GROUPS = [q.lower() for q in QUALITY_NAMES]
METHOD_LABELS = {
    "ce": "BCE only",
    "simclr": "SimCLR pre-training",
    "supcon": "SupCon pre-training (any finding)",
    "comcl_no_spl": "CoMCL w/o self-paced",
    "comcl_no_quality": "CoMCL w/o quality level",
    "comcl": "CoMCL (full)",
}


@dataclass
class LossConfig:
    """The fine-tuning loss: ``BCEWithLogitsLoss``, optionally with ``pos_weight`` = negatives / positives."""

    pos_weight: bool = False
    max_pos_weight: float = 10.0

    def validate(self, key: str) -> None:
        check(self.max_pos_weight >= 1, f"{key}.max_pos_weight", "a number >= 1", self.max_pos_weight)


@dataclass
class ChestXrayConfig:
    """The whole ChestX-ray14 pipeline configuration (sections as in configs/default.yaml)."""

    data: ChestXrayDataConfig = field(default_factory=ChestXrayDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/chestxray"))

    def validate(self) -> None:
        self.data.validate("data")
        self.model.validate("model")
        self.pretrain.validate("pretrain")
        self.finetune.validate("finetune")
        self.loss.validate("loss")
        self.run.validate("run")
        check(
            self.pretrain.patch_size
            <= (self.data.image_size if self.data.source == "synthetic" else self.data.chestxray14.view_image_size),
            "pretrain.patch_size",
            "at most the image size the patches are cut from",
            self.pretrain.patch_size,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python examples/chestxray/train.py",
        description="CoMCL on ChestX-ray14-style X-rays: pre-train, fine-tune (14 labels), AUC per image quality.",
    )
    p.add_argument(
        "--config", type=Path, default=None, help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO)})"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set pretrain.epochs=3",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory (default: run.out of the config)")
    p.add_argument(
        "--method", choices=METHOD_CHOICES, default=None, help="method of a single run (default: run.method)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed (default: run.seed)")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt (with --compare: skip finished runs)"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="train every method with the same budget and seed(s); write compare.json/.md/.png",
    )
    p.add_argument("--methods", default=",".join(METHOD_CHOICES), help="comma-separated methods for --compare")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...); reports mean ± std")
    p.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)  # tests: interruption
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"run.method={args.method}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    cfg = load_config(ChestXrayConfig, args.config or DEFAULT_CONFIG, overrides)
    if args.seeds < 1:
        raise ConfigError(f"--seeds: expected an int >= 1, got {args.seeds}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_CHOICES]
    if bad or not methods:
        raise ConfigError(f"--methods: expected a comma-separated subset of {METHOD_CHOICES}, got {args.methods!r}")

    import torch

    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {cfg.run.device!r} requested but CUDA is not available")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(cfg.run.device == "cpu", warn_only=True)
    try:
        return _run(args, cfg, methods)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run(args: argparse.Namespace, cfg: ChestXrayConfig, methods: list[str]) -> int:
    import yaml

    from examples.chestxray.data import build_data
    from examples.chestxray.multilabel import multilabel_task, pos_weight_from_targets
    from examples.common.pipeline import RunOptions, run_pipeline
    from examples.common.runlog import write_json

    out = args.out or Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    identity = config_to_dict(cfg)
    identity.pop("run")
    identity["task"] = "multilabel-bce"
    data_cache: dict[int, Any] = {}

    def run_one(method: str, seed: int, run_dir: Path, resume: bool, stop: int | None = None) -> dict[str, Any] | None:
        if seed not in data_cache:
            data_cache.clear()
            data_cache[seed] = build_data(cfg, seed)
        data = data_cache[seed]
        pw = pos_weight_from_targets(data.train.targets, cfg.loss.max_pos_weight) if cfg.loss.pos_weight else None
        options = RunOptions(seed, cfg.run.device, cfg.run.num_workers, cfg.run.tensorboard, resume, stop)
        with multilabel_task(LABELS, pw):
            return run_pipeline(method, cfg.model, cfg.pretrain, cfg.finetune, data, run_dir, options, identity)

    def cached(m: str, s: int, d: Path) -> dict[str, Any]:
        return _cached_or_run(run_one, m, s, d, args.resume)

    start = time.perf_counter()
    seeds = [cfg.run.seed + i for i in range(args.seeds)]
    if not args.compare:
        if len(seeds) == 1:
            metrics = run_one(cfg.run.method, seeds[0], out, args.resume, args.stop_after_epochs)
            if metrics is None:
                print(f"stopped after {args.stop_after_epochs} epoch(s); continue with --resume --out {out}")
                return 0
            _print_summary(metrics)
        else:
            results = run_comparison(cached, [cfg.run.method], seeds, out)
            _print_summary(results[cfg.run.method])
    else:
        title = f"ChestX-ray14 ({cfg.data.source}), {len(seeds)} seed(s)"
        run_comparison(cached, methods, seeds, out, title)
        print((out / "compare.md").read_text(encoding="utf-8"))
        print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare_auc.png'}")
    write_json(out / "run_time.json", {"wall_s": time.perf_counter() - start})
    print(f"done in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# comparison (mean AUC instead of the multi-class figures of examples.common.compare)
# --------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[Any]) -> tuple[float, float]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of ``mean_auc``, ``per_label_auc``, ``per_quality`` and the Good→Reject drop; ``std``."""
    out: dict[str, Any] = {}
    std: dict[str, Any] = {}
    out["mean_auc"], std["mean_auc"] = _mean_std([r.get("mean_auc") for r in runs])
    out["per_label_auc"], std["per_label_auc"] = {}, {}
    for name in LABELS:
        out["per_label_auc"][name], std["per_label_auc"][name] = _mean_std([r["per_label_auc"].get(name) for r in runs])
    out["per_quality"], std["per_quality"] = {}, {}
    for g in GROUPS:
        m, s = _mean_std([r["per_quality"][g].get("mean_auc") for r in runs])
        out["per_quality"][g], std["per_quality"][g] = {"mean_auc": m}, {"mean_auc": s}
    drops = [
        r["per_quality"][GROUPS[0]]["mean_auc"] - r["per_quality"][GROUPS[-1]]["mean_auc"]
        for r in runs
        if r["per_quality"][GROUPS[0]].get("mean_auc") is not None
        and r["per_quality"][GROUPS[-1]].get("mean_auc") is not None
    ]
    out["auc_drop"], std["auc_drop"] = _mean_std(drops)
    out["std"] = std
    out["seeds"] = [r.get("seed") for r in runs]
    out["runs"] = list(runs)
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Two Markdown tables: mean AUC overall and per quality group; AUC per label."""
    head = ["method", "mean AUC", *[f"AUC {g}" for g in GROUPS], f"drop {GROUPS[0]}→{GROUPS[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        n, s = len(r["runs"]) or 1, r["std"]
        cells = [METHOD_LABELS.get(method, method), _fmt(r["mean_auc"], s["mean_auc"], n)]
        cells += [_fmt(r["per_quality"][g]["mean_auc"], s["per_quality"][g]["mean_auc"], n) for g in GROUPS]
        cells.append(_fmt(r["auc_drop"], s["auc_drop"], n))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | " + " | ".join(LABELS) + " |", "|" + "---|" * (len(LABELS) + 1)]
    for method, r in results.items():
        cells = [
            f"{r['per_label_auc'][name]:.2f}" if math.isfinite(r["per_label_auc"][name]) else "n/a" for name in LABELS
        ]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_auc(results: dict[str, dict[str, Any]], path: Path, title: str = "") -> None:
    """Grouped bars: mean AUC per quality group (x) per method (bars), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(GROUPS), 4.2), dpi=120)
    width = 0.8 / max(1, len(results))
    for j, (method, r) in enumerate(results.items()):
        means = [r["per_quality"][g]["mean_auc"] for g in GROUPS]
        stds = [r["std"]["per_quality"][g]["mean_auc"] for g in GROUPS]
        xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(GROUPS))]
        ax.bar(
            xs,
            [m if math.isfinite(m) else 0 for m in means],
            width,
            yerr=[s if math.isfinite(s) else 0 for s in stds],
            capsize=2,
            label=METHOD_LABELS.get(method, method),
        )
    ax.set_xticks(range(len(GROUPS)), [g.capitalize() for g in GROUPS])
    ax.set_xlabel("image quality (test set)")
    ax.set_ylabel("mean AUC over the 14 labels")
    ax.set_ylim(0.4, 1.15)
    ax.set_title(title or "mean AUC per image quality")
    ax.legend(fontsize=7, loc="upper center", ncols=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_comparison(
    run_one: Callable[[str, int, Path], dict[str, Any]],
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    title: str = "",
) -> dict[str, Any]:
    """Every method for every seed; ``compare.json`` / ``compare.md`` rewritten after each run, then the plot."""
    from examples.common.runlog import write_json

    results: dict[str, Any] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            runs.append(run_one(method, seed, out_dir / method / f"seed{seed}"))
            results[method] = aggregate(runs)
            write_json(out_dir / "compare.json", results)
            (out_dir / "compare.md").write_text(markdown_table(results), encoding="utf-8")
    plot_auc(results, out_dir / "compare_auc.png", title)
    return results


def _print_summary(m: dict[str, Any]) -> None:
    def f(x: Any) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    print(f"mean AUC {f(m['mean_auc'])}")
    for g in GROUPS:
        q = m["per_quality"][g]
        skipped = q.get("labels_skipped") or []
        note = f"  (skipped, no positive or no negative: {', '.join(skipped)})" if skipped else ""
        print(f"  {g:7s} mean AUC {f(q['mean_auc'])}{note}")


if __name__ == "__main__":
    sys.exit(main())
