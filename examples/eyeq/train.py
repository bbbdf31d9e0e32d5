"""EyeQ diabetic-retinopathy pipeline: CoMCL pre-training, fine-tuning, evaluation per image quality.

With no arguments it runs CoMCL on the built-in synthetic fundus data (``configs/default.yaml``)::

    python examples/eyeq/train.py                       # CoMCL, synthetic data, ~3 min on 2 CPU cores
    python examples/eyeq/train.py --out runs/x --set pretrain.epochs=5 --set model.width=0.5
    python examples/eyeq/train.py --out runs/x --resume # continue an interrupted run
    python examples/eyeq/train.py --compare --seeds 3 --out runs/compare
    python examples/eyeq/train.py --config examples/eyeq/configs/real_gpu.yaml --set data.eyeq.root=/data/EyeQ

Writes ``OUT/metrics.json`` (accuracy, quadratic kappa, macro-F1, macro AUC, and ``per_quality``
good / usable / reject), ``OUT/scalars.csv``, TensorBoard events, ``OUT/config.yaml`` and
``OUT/checkpoint.pt`` (updated atomically after every epoch). ``--compare`` writes
``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare_kappa.png``. See examples/eyeq/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS and torch ship separate OpenMP pools (see index.py)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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
from examples.eyeq.data import EyeQDataConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
METHOD_CHOICES = ("ce", "simclr", "supcon", "comcl_no_spl", "comcl_no_quality", "comcl")


@dataclass
class RunConfig:
    """Run-time settings."""

    method: str = "comcl"
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    torch_threads: int | None = None
    tensorboard: bool = True
    out: str = "runs/eyeq"

    def validate(self, key: str) -> None:
        check(self.method in METHOD_CHOICES, f"{key}.method", f"one of {METHOD_CHOICES}", self.method)
        check(self.num_workers >= 0, f"{key}.num_workers", "an int >= 0", self.num_workers)
        check(
            self.torch_threads is None or self.torch_threads >= 1,
            f"{key}.torch_threads",
            "null or an int >= 1",
            self.torch_threads,
        )
        check(
            self.device == "cpu" or self.device.startswith(("cuda", "mps")),
            f"{key}.device",
            "cpu, cuda, cuda:N or mps",
            self.device,
        )


@dataclass
class EyeQConfig:
    """The whole EyeQ pipeline configuration (sections as in configs/default.yaml)."""

    data: EyeQDataConfig = field(default_factory=EyeQDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        self.data.validate("data")
        self.model.validate("model")
        self.pretrain.validate("pretrain")
        self.finetune.validate("finetune")
        self.run.validate("run")
        check(
            self.pretrain.patch_size
            <= (self.data.image_size if self.data.source == "synthetic" else self.data.eyeq.view_image_size),
            "pretrain.patch_size",
            "at most the image size the patches are cut from",
            self.pretrain.patch_size,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python examples/eyeq/train.py",
        description="CoMCL on EyeQ-style fundus images: pre-train, fine-tune, evaluate per image quality.",
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
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow converting data.eyeq.boxes_pickle (unpickling runs code; trusted files only)",
    )
    p.add_argument(
        "--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS
    )  # simulate an interruption (tests)
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
    cfg = load_config(EyeQConfig, args.config or DEFAULT_CONFIG, overrides)
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


def _run(args: argparse.Namespace, cfg: EyeQConfig, methods: list[str]) -> int:
    import yaml

    from examples.common.compare import run_comparison
    from examples.common.pipeline import RunOptions, run_pipeline
    from examples.common.runlog import write_json
    from examples.eyeq.data import QUALITY_NAMES, build_data

    out = args.out or Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    identity = config_to_dict(cfg)
    identity.pop("run")
    groups = [q.lower() for q in QUALITY_NAMES]
    data_cache: dict[int, Any] = {}

    def run_one(method: str, seed: int, run_dir: Path, resume: bool, stop: int | None = None) -> dict[str, Any] | None:
        if seed not in data_cache:
            data_cache.clear()
            data_cache[seed] = build_data(cfg, seed, allow_pickle=args.allow_pickle)
        options = RunOptions(seed, cfg.run.device, cfg.run.num_workers, cfg.run.tensorboard, resume, stop)
        return run_pipeline(method, cfg.model, cfg.pretrain, cfg.finetune, data_cache[seed], run_dir, options, identity)

    start = time.perf_counter()
    if not args.compare:
        seeds = [cfg.run.seed + i for i in range(args.seeds)]
        if len(seeds) == 1:
            metrics = run_one(cfg.run.method, seeds[0], out, args.resume, args.stop_after_epochs)
            if metrics is None:
                print(f"stopped after {args.stop_after_epochs} epoch(s); continue with --resume --out {out}")
                return 0
            _print_summary(metrics, groups)
        else:
            results = run_comparison(
                lambda m, s, d: _cached_or_run(run_one, m, s, d, args.resume), [cfg.run.method], seeds, out, groups
            )
            _print_summary(results[cfg.run.method], groups)
    else:
        seeds = [cfg.run.seed + i for i in range(args.seeds)]
        title = f"EyeQ ({cfg.data.source}), {len(seeds)} seed(s)"
        run_comparison(
            lambda m, s, d: _cached_or_run(run_one, m, s, d, args.resume), methods, seeds, out, groups, title
        )
        print((out / "compare.md").read_text(encoding="utf-8"))
        print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare_kappa.png'}")
    write_json(out / "run_time.json", {"wall_s": time.perf_counter() - start})
    print(f"done in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


def _cached_or_run(run_one: Any, method: str, seed: int, run_dir: Path, resume: bool) -> dict[str, Any]:
    """With --resume, reuse a finished run's metrics.json, or resume its checkpoint."""
    import json

    if resume and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    metrics = run_one(method, seed, run_dir, resume and (run_dir / "checkpoint.pt").is_file())
    if metrics is None:  # pragma: no cover - only --stop-after-epochs stops a run early
        raise RuntimeError(f"run {run_dir} stopped before evaluation")
    return metrics


def _print_summary(m: dict[str, Any], groups: list[str]) -> None:
    def f(x: Any) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    print(f"accuracy {f(m['accuracy'])}  kappa {f(m['kappa'])}  macro-F1 {f(m['macro_f1'])}  AUC {f(m['auc'])}")
    for g in groups:
        q = m["per_quality"][g]
        print(f"  {g:7s} kappa {f(q['kappa'])}  accuracy {f(q['accuracy'])}  AUC {f(q['auc'])}")


if __name__ == "__main__":
    sys.exit(main())
