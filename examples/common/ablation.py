"""Ablation in a comparison's setting: CoMCL variants (``--set`` overrides) against the default, paired by repeat.

Each variant is CoMCL with a few configuration keys changed (a level switched off, another pace,
temperature, bank size, ``k``, pre-training length). Every variant runs the same repeats as the
reference -- the same data draw, labelled subset and initialisation per training seed -- so the
per-repeat difference ``variant - default`` removes the draw's difficulty, as in
:mod:`examples.common.paired`. The variants come from a YAML file::

    default: {label: CoMCL (benchmark configuration), set: []}     # the reference, required
    no_lesion: {label: w/o lesion level, set: [pretrain.levels.lesion=0]}

Run, resumable (each variant is a ``--compare --methods comcl --resume`` of the pipeline's
``train.py`` in ``OUT/<variant>``; its log in ``OUT/<variant>.log``), then aggregate and write a
RESULTS.md section::

    python -m examples.common.ablation run --pipeline eyeq --config examples/eyeq/configs/benchmark.yaml \\
        --variants examples/eyeq/configs/ablation.yaml --seeds 8 --out runs/ablation \\
        [--reference runs/benchmark] [--jobs 2] [--set run.torch_threads=1]
    python -m examples.common.ablation render runs/ablation examples/eyeq/RESULTS.md --name ablation

With ``--reference`` the default's repeats are read from a finished comparison (its ``comcl``
runs) instead of being run again. Before anything runs, every variant's configuration is loaded
as its run will load it, so a bad override stops the command at once
(:func:`~examples.common.ablation_variants.check_run`). Aggregation checks that each variant's
configuration differs from the reference's only in the keys the variant sets (and in run-time
settings), so a stray difference can not pass as the variant's effect. ``run`` writes
``OUT/ablation.json`` (per variant: label, overrides, mean metrics, pre-training loss per epoch,
the paired differences with 95 % t-intervals), ``OUT/ablation.md`` and
``OUT/ablation_<headline>.png`` (the paired differences of the task's headline metric:
``ablation_kappa.png`` for EyeQ, ``ablation_mean_auc.png`` for ChestX-ray14).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from examples.common.ablation_variants import METHOD, REFERENCE, REPO, Variant, check_run, load_variants, train_script
from examples.common.paired import paired_differences, paired_table, plot_paired
from examples.common.results_md import epoch_losses, replace_section, run_seconds, task_of

__all__ = [
    "Variant",
    "aggregate",
    "check_run",
    "config_differences",
    "load_variants",
    "main",
    "render_section",
    "run_variants",
]

# keys that may differ between a variant and the reference: where and how a run ran, not what it computed
RUNTIME_KEYS = ("run.", "data.synthetic.cache_dir", "data.synthetic.workers")


def _command(
    train: Path, config: Path, variant: Variant, seed: int, seeds: int, out: Path, sets: Sequence[str]
) -> list[str]:
    cmd = [sys.executable, str(train), "--config", str(config), "--compare", "--methods", METHOD]
    cmd += ["--seed", str(seed), "--seeds", str(seeds), "--no-probes", "--out", str(out / variant.name), "--resume"]
    for s in [*sets, *variant.overrides]:
        cmd += ["--set", s]
    return cmd


def run_variants(
    pipeline: str,
    config: Path,
    variants: dict[str, Variant],
    seed: int,
    seeds: int,
    out: Path,
    sets: Sequence[str] = (),
    jobs: int = 1,
    skip_reference: bool = False,
) -> list[str]:
    """Run every variant (``jobs`` at a time); returns the names of those that failed (see their logs)."""
    train = train_script(pipeline)
    if jobs < 1:
        raise ValueError(f"`jobs`: expected an int >= 1, but got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    todo = [v for v in variants.values() if v.method is None and not (skip_reference and v.name == REFERENCE)]
    failed: list[str] = []

    def one(i: int, v: Variant) -> None:
        cmd = _command(train, config, v, seed, seeds, out, sets)
        print(f"[{i}/{len(todo)}] {v.name}: {v.label} ({' '.join(v.overrides) or 'no overrides'})", flush=True)
        start = time.perf_counter()
        with (out / f"{v.name}.log").open("a", encoding="utf-8") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode
        log_name = out / f"{v.name}.log"
        if rc == 0:
            state = "done"
        elif rc in (130, -signal.SIGINT):  # Ctrl-C: the pipeline stopped (its finished repeats are kept)
            state = f"interrupted (exit {rc}); the same command continues it"
        elif rc < 0:
            state = f"killed by signal {signal.Signals(-rc).name} (exit {rc}; see {log_name})"
        else:
            state = f"FAILED (exit {rc}; see {log_name})"
        print(f"[{i}/{len(todo)}] {v.name}: {state} in {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failed.append(v.name)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda a: one(*a), enumerate(todo, 1)))
    return failed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat |= _flatten(v, f"{prefix}{k}.")
    return flat


def config_differences(reference: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configuration trees (run-time keys left out)."""
    a, b = _flatten(reference), _flatten(other)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RUNTIME_KEYS)]


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    compare_path = folder / "compare.json"
    if not compare_path.is_file():
        raise FileNotFoundError(f"{compare_path} does not exist: has the variant run?")
    try:
        compare = json.loads(compare_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{compare_path} is not valid JSON ({err})") from None
    if not isinstance(compare, dict) or METHOD not in compare:
        raise ValueError(
            f"{compare_path}: expected a {METHOD!r} entry, but got "
            f"{sorted(compare) if isinstance(compare, dict) else type(compare).__name__}"
        )
    protocol_path = folder / "protocol.json"
    protocol = json.loads(protocol_path.read_text(encoding="utf-8")) if protocol_path.is_file() else {}
    return compare, protocol


def _pretrain_curves(folder: Path, protocol: dict[str, Any], seeds: Sequence[int], method: str) -> list[float]:
    """Mean pre-training loss per epoch of ``method`` over ``seeds`` (the shortest curve's length)."""
    root = Path(protocol.get("pretrained", folder / "pretrain")) / method
    curves = [c for c in (epoch_losses(root / f"seed{s}" / "scalars.csv") for s in seeds) if c]
    if not curves:
        return []
    width = min(len(c) for c in curves)
    return [sum(c[e] for c in curves) / len(curves) for e in range(width)]


def aggregate(out: Path, variants: dict[str, Variant], reference: Path | None = None) -> dict[str, Any]:
    """Paired differences of each variant against the reference; writes ``OUT/ablation.{json,md}`` and the plot.

    Raises:
        FileNotFoundError: a variant (or the reference) has no ``compare.json``.
        ValueError: a variant's configuration differs from the reference's in a key it does not set.
    """
    ref_dir = reference if reference is not None else out / REFERENCE
    ref_compare, ref_protocol = _read(ref_dir)
    task = task_of(ref_compare)
    ref_runs = ref_compare[METHOD]["runs"]
    groups = list(ref_runs[0]["per_quality"])
    labels = {v.name: v.label for v in variants.values()}
    task = copy.copy(task)  # the same task, naming the variants in tables and the plot
    task.method_labels = dict(task.method_labels) | labels
    result: dict[str, Any] = {
        "reference": str(ref_dir),
        "machine": ref_protocol.get("machine"),
        "torch_threads": ref_protocol.get("torch_threads"),
        "base_config": ref_protocol.get("config", {}),
        "variants": {},
    }
    paired_all: dict[str, Any] = {}
    for v in variants.values():
        folder = ref_dir if v.name == REFERENCE or v.method else out / v.name
        compare, protocol = (ref_compare, ref_protocol) if folder == ref_dir else _read(folder)
        method = v.method or METHOD
        if method not in compare:
            raise ValueError(f"variant {v.name!r}: the reference {ref_dir} has no {method!r} runs")
        stray = [
            k
            for k in config_differences(ref_protocol.get("config", {}), protocol.get("config", {}))
            if not any(k == key or k.startswith(key + ".") for key in v.keys)
        ]
        if stray:
            raise ValueError(
                f"variant {v.name!r} ({folder}) differs from the reference in keys it does not set: {stray}"
            )
        runs = compare[method]["runs"]
        seeds = compare[method].get("seeds", [])
        seconds = 0.0
        for s in seeds:
            seconds += run_seconds(folder / method / f"seed{s}" / "timing.json")
            seconds += run_seconds(
                Path(protocol.get("pretrained", folder / "pretrain")) / method / f"seed{s}" / "timing.json"
            )
        entry: dict[str, Any] = {
            "label": v.label,
            "set": list(v.overrides),
            "method": method,
            "seeds": seeds,
            "torch_threads": protocol.get("torch_threads"),
            "compute_s": seconds,
            "mean": {k: compare[method].get(k) for k in task.metrics},
            "per_quality": compare[method].get("per_quality"),
            "pretrain_loss": _pretrain_curves(folder, protocol, seeds, method),
        }
        if v.name != REFERENCE:
            paired = paired_differences({v.name: runs, REFERENCE: ref_runs}, groups, [(v.name, REFERENCE)], task)
            entry["paired"] = next(iter(paired.values()), None)
            paired_all |= paired
        result["variants"][v.name] = entry
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(_tables(result, groups, task, paired_all), encoding="utf-8")
    if paired_all:
        plot_paired(paired_all, groups, out / f"ablation_{task.headline}.png", task, "ablation: variant − default")
    return result


def _tables(result: dict[str, Any], groups: Sequence[str], task: Any, paired: dict[str, Any]) -> str:
    h = task.headline
    title = task.metric_titles.get(h, h)
    head = ["variant", "overrides", "repeats", title, *[f"{title} {g}" for g in groups], "pre-training loss per epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in result["variants"].values():
        per_q = e.get("per_quality") or {}
        given = ", ".join(f"`{s}`" for s in e["set"])
        if not given:
            given = "(reference)" if e["method"] == METHOD else f"method `{e['method']}` of the reference"
        cells = [e["label"], given, str(len(e["seeds"]))]
        cells.append(_f(e["mean"].get(h)))
        cells += [_f((per_q.get(g) or {}).get(h)) for g in groups]
        cells.append(" → ".join(f"{x:.2f}" for x in e["pretrain_loss"]) or "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    text = "Mean over repeats:\n\n" + "\n".join(lines) + "\n"
    if paired:
        text += "\nPaired differences against the default, mean [95 % t-interval] over repeats:\n\n"
        text += paired_table(paired, groups, task)
    return text


def _f(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def render_section(out: Path, rel: str, note: str = "") -> str:
    """The Markdown of an aggregated ablation (``OUT/ablation.json`` and ``.md``): setting, tables, plot."""
    result = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    variants = result["variants"]
    seeds = sorted({s for e in variants.values() for s in e["seeds"]})
    total = sum(e["compute_s"] for name, e in variants.items() if name != REFERENCE and e["method"] == METHOD)
    lines = [
        f"* Reference: the `comcl` runs of `{Path(result['reference']).name}`; variants: CoMCL with the "
        "overrides below, every other key as the reference (checked from each run's configuration).",
        f"* Machine: {result.get('machine') or '?'}; torch threads {result.get('torch_threads') or '?'}"
        + (f"; {note}" if note else "")
        + ".",
        f"* Repeats: paired by seed (seeds {', '.join(map(str, seeds))} in all; the table gives each variant's "
        f"count); compute {total / 60:.1f} min summed over the variants' own runs (pre-training, fine-tuning, "
        "evaluation).",
        "",
        (out / "ablation.md").read_text(encoding="utf-8").rstrip("\n"),
    ]
    pngs = sorted(p.name for p in out.glob("ablation_*.png"))
    if pngs:
        lines += ["", *[f"![{p}]({rel}/{p})" for p in pngs]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.common.ablation", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the variants (resumable) and aggregate them")
    r.add_argument("--pipeline", required=True, help="eyeq or chestxray")
    r.add_argument("--config", type=Path, required=True, help="the comparison's config (the reference setting)")
    r.add_argument("--variants", type=Path, required=True, help="YAML file of variants")
    r.add_argument("--seed", type=int, default=0, help="first training seed")
    r.add_argument("--seeds", type=int, default=5, help="number of repeats")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument(
        "--reference", type=Path, default=None, help="a finished comparison whose comcl runs are the default"
    )
    r.add_argument("--jobs", type=int, default=1, help="variants run at once (one torch thread each is wise)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = sub.add_parser("aggregate", help="aggregate finished variants only")
    a.add_argument("--variants", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--reference", type=Path, default=None)
    m = sub.add_parser("render", help="(re)write the generated section of a RESULTS.md from OUT/ablation.json")
    m.add_argument("out", type=Path, help="the ablation's folder (or a copy of its ablation.json/.md/.png)")
    m.add_argument("results_md", type=Path)
    m.add_argument("--name", default="ablation")
    m.add_argument("--note", default="")
    args = p.parse_args(argv)
    try:
        if args.command == "render":
            md = Path(args.results_md)
            if md.exists() and not md.is_file():
                raise ValueError(f"results_md: {str(md)!r} is not a file")
            if not (args.out / "ablation.json").is_file():
                raise FileNotFoundError(f"out: {args.out / 'ablation.json'} does not exist (run `aggregate` first)")
            rel = Path(os.path.relpath(args.out.resolve(), md.resolve().parent)).as_posix()
            text = md.read_text(encoding="utf-8") if md.is_file() else ""
            marker = f"<!-- BEGIN generated:{args.name} -->"
            md.write_text(replace_section(text, args.name, render_section(args.out, rel, args.note)), encoding="utf-8")
            done = "rewrote" if marker in text else "appended (no such section yet)"
            print(f"{done} section {args.name!r} of {md}")
            return 0
        variants = load_variants(args.variants)
        # the variants run from the repository root: paths given relative to here must not move
        args.out = args.out.resolve()
        if args.reference is not None:
            args.reference = args.reference.resolve()
            try:
                _read(args.reference)
            except (FileNotFoundError, ValueError) as err:
                raise ValueError(f"--reference: expected a finished comparison with {METHOD!r} runs: {err}") from None
        if args.command == "run":
            args.config = args.config.resolve()
            if not args.config.is_file():
                raise FileNotFoundError(f"--config: {str(args.config)!r} is not a file")
            if args.seeds < 2:
                raise ValueError(f"--seeds: expected >= 2 repeats (a paired interval needs two), but got {args.seeds}")
            reference_methods = _read(args.reference)[0] if args.reference is not None else None
            check_run(
                args.pipeline, args.config, variants, args.seed, args.out, args.overrides, args.jobs, reference_methods
            )
            failed = run_variants(
                args.pipeline,
                args.config,
                variants,
                args.seed,
                args.seeds,
                args.out,
                args.overrides,
                args.jobs,
                skip_reference=args.reference is not None,
            )
            if failed:
                print(
                    f"error: variants failed or were stopped: {failed} (see their logs in {args.out})", file=sys.stderr
                )
                return 1
        aggregate(args.out, variants, args.reference)
        print(f"wrote {args.out / 'ablation.json'}, {args.out / 'ablation.md'}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished repeats are kept in {args.out}; the same command continues (every variant "
            "runs with --resume)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
