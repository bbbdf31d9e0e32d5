"""The command line both pipelines share: run settings, the argument parser and the run / compare driver.

A pipeline's ``train.py`` describes itself with a :class:`PipelineCLI` (its config class, data, task
and names) and calls :func:`main`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.common.checkpoint import CheckpointError
from examples.common.compare import COMPARE_METHODS
from examples.common.config import ConfigError, check, config_to_dict, load_config
from examples.common.seeds import SEED_LIMIT, training_seeds

__all__ = ["METHOD_CHOICES", "PipelineCLI", "RunConfig", "build_parser", "cached_or_run", "main"]

METHOD_CHOICES = COMPARE_METHODS
REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunConfig:
    """Run-time settings (the ``run`` section; not part of the experiment's identity)."""

    method: str = "comcl"
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    torch_threads: int | None = None
    tensorboard: bool = True
    out: str = "runs/eyeq"

    def validate(self, key: str) -> None:
        check(self.method in METHOD_CHOICES, f"{key}.method", f"one of {METHOD_CHOICES}", self.method)
        check(0 <= self.seed < SEED_LIMIT, f"{key}.seed", f"an int in [0, 2**31 = {SEED_LIMIT})", self.seed)
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
class PipelineCLI:
    """What differs between the pipelines' command lines.

    Attributes:
        prog: program name in the usage line.
        description: ``--help`` description.
        name: dataset name in comparison titles (``"EyeQ"``).
        config_cls: the whole configuration (sections ``data``, ``model``, ``pretrain``, ``finetune``, ``run``).
        default_config: YAML file read without ``--config``.
        group_names: the groups of ``per_quality``, in order (e.g. Good, Usable, Reject).
        build_data: ``(cfg, seed, args) -> PipelineData``.
        make_task: ``(cfg, data) -> Task``; ``data`` is ``None`` for the task that prints summaries.
        identity: extra entries of the run's identity (checkpoint fingerprint).
        add_arguments: adds pipeline-specific options to the parser.
    """

    prog: str
    description: str
    name: str
    config_cls: type
    default_config: Path
    group_names: Sequence[str]
    build_data: Callable[[Any, int, argparse.Namespace], Any]
    make_task: Callable[[Any, Any], Any]
    identity: dict[str, Any] = field(default_factory=dict)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def build_parser(spec: PipelineCLI) -> argparse.ArgumentParser:
    """The shared options (``--config``, ``--set``, ``--out``, ``--method``, ``--seed``, ``--resume``, ...)."""
    try:
        shown = spec.default_config.relative_to(REPO)
    except ValueError:
        shown = spec.default_config
    p = argparse.ArgumentParser(prog=spec.prog, description=spec.description)
    p.add_argument("--config", type=Path, default=None, help=f"YAML config (default: {shown})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set pretrain.epochs=3",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: run.out of the config, or the next free run.out-2, -3, ... "
        "when it holds a run)",
    )
    p.add_argument(
        "--method", choices=METHOD_CHOICES, default=None, help="method of a single run (default: run.method)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed (default: run.seed)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt (with --compare: skip finished runs)"
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT (its checkpoint, metrics and logs are deleted)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="train every method with the same budget and seed(s); write compare.json/.md/.png",
    )
    p.add_argument("--methods", default=",".join(METHOD_CHOICES), help="comma-separated methods for --compare")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of repeats (seed, seed+1, ...; each its own data draw; default 1); mean ± std and paired "
        "differences",
    )
    p.add_argument(
        "--seed-list",
        default=None,
        metavar="SEEDS",
        help="explicit training seeds instead of --seed/--seeds, comma-separated, with ranges: 0-5,8-13 "
        "(e.g. to aggregate the finished repeats of comparisons run in parallel, with --resume)",
    )
    p.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="with --compare/--seeds: folder of the pre-trained encoders to reuse or fill (default: OUT/pretrain)",
    )
    p.add_argument(
        "--probes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compare/--seeds: probe each pre-trained encoder, frozen (linear probe, artefact retrieval, "
        "quality invariance; OUT/probes.json)",
    )
    if spec.add_arguments is not None:
        spec.add_arguments(p)
    p.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)  # tests: interruption
    return p


def main(spec: PipelineCLI, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; exit status 2 with a one-line message on a configuration or data error,
    130 with the command that continues the run on Ctrl-C."""
    args = build_parser(spec).parse_args(argv)
    try:
        try:
            return _main(spec, args)
        except BaseException:
            args.kept = _keep_or_undo(args)
            raise
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        out = getattr(args, "chosen_out", None)
        hint = (
            f" ({out} keeps what finished: once the cause is fixed, --resume continues it, --overwrite starts again)"
            if getattr(args, "kept", None) and not args.resume
            else ""
        )
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "chosen_out", None)
        if out is None:
            where = "nothing was written"
        elif args.kept:
            instead = ", without --overwrite" if args.overwrite else ""
            where = (
                f"{out} keeps what finished (a checkpoint after every epoch); to continue, run the same command "
                f"with --resume --out {out}{instead}"
            )
        else:
            where = f"stopped before the first checkpoint, so {out} keeps nothing; run the same command to start again"
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130


def _keep_or_undo(args: argparse.Namespace) -> bool | None:
    """After a failed or interrupted command: whether OUT keeps a run (``None``: no OUT chosen yet).

    A command that wrote no checkpoint, metrics or encoder removes the run files it created (its
    ``config.yaml``, logs), so that the same command can run again.
    """
    from examples.common.rundir import holds_run, remove_new_files

    out = getattr(args, "chosen_out", None)
    if out is None:
        return None
    if holds_run(out):
        return True
    if getattr(args, "is_main", True):
        remove_new_files(out, args.before)
    return False


def _main(spec: PipelineCLI, args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"run.method={args.method}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    cfg: Any = load_config(spec.config_cls, args.config or spec.default_config, overrides)  # the pipeline's class
    args.seed_values = training_seeds(cfg.run.seed, args.seeds, args.seed_list, args.seed is not None)
    args.seeds = len(args.seed_values)
    if args.seed_list is not None:
        cfg.run.seed = args.seed_values[0]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_CHOICES]
    if bad or not methods:
        raise ConfigError(f"--methods: expected a comma-separated subset of {METHOD_CHOICES}, got {args.methods!r}")

    import torch

    from examples.common import ddp

    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {cfg.run.device!r} requested but CUDA is not available")
    job, cfg.run.device = ddp.setup(cfg.run.device)  # under torchrun: join the job, take this rank's GPU
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(cfg.run.device == "cpu", warn_only=True)
    try:
        return _run(spec, args, cfg, methods, job.is_main)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        ddp.teardown()


def _header(spec: PipelineCLI, args: argparse.Namespace, cfg: Any, out: Path) -> str:
    import torch

    config = args.config or spec.default_config
    try:
        config = Path(config).resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    sets = f" (+ --set {' --set '.join(args.overrides)})" if args.overrides else ""
    method = f"compare {args.methods}" if args.compare else cfg.run.method
    seeds = ",".join(map(str, args.seed_values)) if args.seed_list is not None else str(cfg.run.seed)
    if args.seed_list is None and args.seeds > 1:
        seeds = f"{cfg.run.seed}..{cfg.run.seed + args.seeds - 1}"
    return "\n".join(
        [
            f"{spec.name} pipeline ({spec.prog})",
            f"  config         {config}{sets}",
            f"  method         {method}",
            f"  seed           {seeds}",
            f"  device         {cfg.run.device}",
            f"  torch threads  {torch.get_num_threads()}",
            f"  output         {out}{'  (resuming)' if args.resume else ''}",
        ]
    )


def _run(spec: PipelineCLI, args: argparse.Namespace, cfg: Any, methods: list[str], is_main: bool = True) -> int:
    import yaml

    from examples.common import ddp
    from examples.common.compare import run_comparison
    from examples.common.pipeline import (
        RunOptions,
        check_resumable,
        encoder_fingerprint,
        run_fingerprint,
        run_pipeline,
    )
    from examples.common.protocol import machine_description, pretrain_folder, pretrain_identity
    from examples.common.report import plot_run
    from examples.common.rundir import CONFIG_HEADER, choose_out, clear_run, snapshot
    from examples.common.runlog import write_json

    say = print if is_main else (lambda *_args, **_kwargs: None)  # under torchrun rank 0 speaks and writes
    chosen = choose_out(args, cfg, say)
    ddp.barrier()  # every rank has chosen the directory before rank 0 writes into it
    if chosen is None:
        return 0
    args.is_main, args.before = is_main, snapshot(chosen)  # what a failure before the first checkpoint undoes
    out = args.chosen_out = chosen  # named on Ctrl-C, with the command that continues
    say(_header(spec, args, cfg, out))
    if is_main:
        if args.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if not (args.resume and (out / "config.yaml").is_file()):  # a resumed run keeps its configuration file
            text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
            (out / "config.yaml").write_text(f"{CONFIG_HEADER}\n{text}", encoding="utf-8")
    ddp.barrier()
    identity = config_to_dict(cfg)
    identity.pop("run")
    identity.update(spec.identity)
    groups = [q.lower() for q in spec.group_names]
    data_cache: dict[int, Any] = {}
    task = spec.make_task(cfg, None)  # the task of the summaries (pos_weight etc. are set per run)

    def run_one(
        method: str, seed: int, run_dir: Path, resume: bool, stop: int | None = None, encoder: Path | None = None
    ) -> dict[str, Any] | None:
        if resume:  # another run's checkpoint is refused before any data is rendered
            start_from = None if encoder is None else encoder_fingerprint(encoder)
            check_resumable(run_dir / "checkpoint.pt", method, seed, identity, encoder=start_from)
        if seed not in data_cache:
            data_cache.clear()
            with ddp.main_first():  # rank 0 renders and caches synthetic data, the others read the cache
                data_cache[seed] = spec.build_data(cfg, seed, args)
        data = data_cache[seed]
        options = RunOptions(seed, cfg.run.device, cfg.run.num_workers, cfg.run.tensorboard, resume, stop)
        run_task = spec.make_task(cfg, data)
        return run_pipeline(
            method, cfg.model, cfg.pretrain, cfg.finetune, data, run_dir, options, identity, run_task, encoder
        )

    encoders = args.pretrained or out / "pretrain"

    def pretrain(method: str, seed: int) -> Path:
        """Pre-train once per (method, repeat): every fine-tuning cell reuses ``encoder.pt``."""
        pre_identity = pretrain_identity(identity, method)
        run_dir = encoders / pretrain_folder(method, cfg.finetune) / f"seed{seed}"
        expected = run_fingerprint(method, seed, pre_identity, pretrain_only=True)
        found = encoder_fingerprint(run_dir / "encoder.pt")
        if found == expected:
            return run_dir / "encoder.pt"
        if found is not None:
            raise CheckpointError(
                f"{run_dir / 'encoder.pt'} was pre-trained with another configuration; "
                "use another --out or --pretrained"
            )
        options = RunOptions(seed, cfg.run.device, cfg.run.num_workers, cfg.run.tensorboard, False, None)
        options.resume = args.resume and (run_dir / "checkpoint.pt").is_file()
        if options.resume:  # before any data is rendered
            check_resumable(run_dir / "checkpoint.pt", method, seed, pre_identity, pretrain_only=True)
        if seed not in data_cache:
            data_cache.clear()
            with ddp.main_first():
                data_cache[seed] = spec.build_data(cfg, seed, args)
        info = run_pipeline(
            method,
            cfg.model,
            cfg.pretrain,
            cfg.finetune,
            data_cache[seed],
            run_dir,
            options,
            pre_identity,
            pretrain_only=True,
        )
        if info is None:  # pragma: no cover - only --stop-after-epochs stops a run early
            raise RuntimeError(f"pre-training {run_dir} stopped early")
        return run_dir / "encoder.pt"

    def finetuned(m: str, s: int, d: Path) -> dict[str, Any]:
        if args.resume and (d / "metrics.json").is_file():
            return json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        encoder = None if m == "ce" else pretrain(m, s)
        return cached_or_run(functools.partial(run_one, encoder=encoder), m, s, d, args.resume)

    def cached(m: str, s: int, d: Path) -> dict[str, Any]:
        metrics = finetuned(m, s, d)
        if args.probes and not ddp.info().enabled:  # probes of the frozen encoder (one process)
            from examples.common.probe_report import probe_encoder, probe_initial

            encoder_file = None if m == "ce" else pretrain(m, s)  # the cached encoder (its data draw loaded)
            if s not in data_cache:
                data_cache.clear()
                data_cache[s] = spec.build_data(cfg, s, args)
            data, device = data_cache[s], cfg.run.device
            if data.probe_views is not None:  # a pipeline with held-out probe patches (EyeQ)
                probes = (
                    probe_initial(s, cfg.model, data, d / "probes.json", device)  # ce: the initial encoder
                    if encoder_file is None
                    else probe_encoder(encoder_file, m, s, cfg.model, data, device)
                )
                metrics = dict(metrics, probes=probes)
        return metrics

    start = time.perf_counter()
    seeds = list(args.seed_values)
    meta = {
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("train.py") else spec.prog,
        "machine": machine_description(),
        "pretrained": str(encoders),
        "label_fraction": cfg.finetune.label_fraction,
        "label_qualities": cfg.finetune.label_qualities,
        "config": config_to_dict(cfg),
    }
    if not args.compare:
        if len(seeds) == 1:
            metrics = run_one(cfg.run.method, seeds[0], out, args.resume, args.stop_after_epochs)
            if metrics is None:
                say(f"stopped after {args.stop_after_epochs} epoch(s); continue with --resume --out {out}")
                return 0
            say(task.summary(metrics, groups))
            if is_main:
                plot_run(out, metrics, groups, task, title=f"{spec.name}: {cfg.run.method}, seed {seeds[0]}")
                say(f"wrote {out / 'summary.png'} ({task.headline_title} per image quality, loss curves)")
        else:
            results = run_comparison(cached, [cfg.run.method], seeds, out, groups, task=task, write=is_main, meta=meta)
            say(task.summary(results[cfg.run.method], groups))
    else:
        title = f"{spec.name} ({cfg.data.source}), {len(seeds)} seed(s)"
        run_comparison(cached, methods, seeds, out, groups, title, task, write=is_main, meta=meta)
        if is_main:
            print((out / "compare.md").read_text(encoding="utf-8"))
            print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / task.plot.filename}")
    if is_main:
        write_json(out / "run_time.json", {"wall_s": time.perf_counter() - start})
    say(f"done in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


def cached_or_run(
    run_one: Callable[..., dict[str, Any] | None], method: str, seed: int, run_dir: Path, resume: bool
) -> dict[str, Any]:
    """With ``resume``, reuse a finished run's ``metrics.json``, or resume its checkpoint; else run."""
    if resume and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    metrics = run_one(method, seed, run_dir, resume and (run_dir / "checkpoint.pt").is_file())
    if metrics is None:  # pragma: no cover - only --stop-after-epochs stops a run early
        raise RuntimeError(f"run {run_dir} stopped before evaluation")
    return metrics
