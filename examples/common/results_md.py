"""RESULTS.md sections generated from a comparison's JSON files, so every number there comes from a file.

Two steps::

    # 1. copy a comparison's summaries (and its runs' timings and pre-training losses) into the repository
    python -m examples.common.results_md collect runs/benchmark examples/eyeq/results/benchmark
    # 2. (re)write the generated section of a RESULTS.md from them; the rest of the file is left alone
    python -m examples.common.results_md render examples/eyeq/results/benchmark examples/eyeq/RESULTS.md \\
        --name benchmark --note "shared 2-core VM, other jobs running"

The section sits between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``; a
file without them gets the section appended. Everything else in the file (hand-written analysis,
other generated sections) is kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from examples.common.paired import paired_table
from examples.common.task import METHOD_LABELS, MultiLabelTask, SingleLabelTask, Task

__all__ = [
    "collect",
    "epoch_losses",
    "render",
    "render_section",
    "repeats_needed",
    "replace_section",
    "run_seconds",
    "task_of",
]

SUMMARIES = ("compare.json", "paired.json", "protocol.json", "compare.md", "probes.json")


def task_of(compare: dict[str, Any]) -> Task:
    """The task of a ``compare.json``: multi-label (mean AUC) or single-label (kappa)."""
    first = next(iter(compare.values()))
    if "mean_auc" in first:
        return MultiLabelTask(tuple(first.get("per_label_auc", {})) or ("label",))
    return SingleLabelTask()


def collect(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a comparison's summaries and plots to ``dest``; write ``timing.json`` and ``pretrain_loss.json``.

    ``timing.json``: seconds of pre-training, fine-tuning and evaluation summed over every run of the
    comparison (each run's own ``timing.json``), and per method. ``pretrain_loss.json``: the mean
    pre-training loss of each epoch, per method and seed (from ``scalars.csv``).
    """
    src, out = Path(run_dir), Path(dest)
    if not (src / "compare.json").is_file():
        raise FileNotFoundError(f"{src / 'compare.json'} does not exist: is {src} a comparison's --out?")
    out.mkdir(parents=True, exist_ok=True)
    for name in SUMMARIES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    for png in src.glob("*.png"):
        shutil.copyfile(png, out / png.name)
    compare = json.loads((src / "compare.json").read_text(encoding="utf-8"))
    protocol = (
        json.loads((src / "protocol.json").read_text(encoding="utf-8")) if (src / "protocol.json").is_file() else {}
    )
    pre_root = Path(protocol.get("pretrained", src / "pretrain"))
    timing: dict[str, Any] = {"total_s": 0.0, "per_method": {}}
    losses: dict[str, dict[str, list[float]]] = {}
    for method, result in compare.items():
        spent = 0.0
        for seed in result.get("seeds", []):
            run = src / method / f"seed{seed}"
            spent += run_seconds(run / "timing.json")
            pre = [p for p in pre_root.glob(f"{method}*/seed{seed}") if p.parent.name.split("_labels")[0] == method]
            for p in pre:
                spent += run_seconds(p / "timing.json")
                curve = epoch_losses(p / "scalars.csv")
                if curve:
                    losses.setdefault(p.parent.name, {})[f"seed{seed}"] = curve
        timing["per_method"][method] = spent
        timing["total_s"] += spent
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")
    (out / "pretrain_loss.json").write_text(json.dumps(losses, indent=2) + "\n", encoding="utf-8")
    return out


def run_seconds(path: Path) -> float:
    """Seconds summed over a run's ``timing.json`` (0 when it does not exist)."""
    if not path.is_file():
        return 0.0
    return float(sum(v for v in json.loads(path.read_text(encoding="utf-8")).values() if isinstance(v, int | float)))


def epoch_losses(path: Path) -> list[float]:
    """Mean pre-training loss per epoch from a run's ``scalars.csv`` ([] when it does not exist)."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "pretrain" and r["name"] == "loss"]
    return [float(r["value"]) for r in sorted(rows, key=lambda r: int(r["epoch"]))]


def _span(values: list[Any]) -> str:
    """``"lo–hi"`` of the known values (``"?"`` when none)."""
    known = [v for v in values if v is not None]
    if not known:
        return "?"
    return f"{min(known)}" if min(known) == max(known) else f"{min(known)}–{max(known)}"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _verdicts(paired: dict[str, Any], task: Task, groups: list[str]) -> list[str]:
    """The issue's goal, checked against the paired results (single-label: kappa; multi-label: mean AUC)."""
    lines = []
    main = paired.get("comcl - ce")
    if main is None:
        return ["* CoMCL (full) and cross-entropy only were not both run: no goal check."]
    o, d = ({k: math.nan if v is None else v for k, v in main[q].items()} for q in ("overall", "drop"))
    need = 0.05 if task.headline == "kappa" else 0.03
    ok = o["mean"] >= need and math.isfinite(o["low"]) and o["low"] > 0
    lines.append(
        f"* CoMCL (full) − {task.method_labels.get('ce', 'ce')}, "
        f"{task.metric_titles.get(task.headline, task.headline)}: "
        f"{_fmt(o['mean'], True)} [{_fmt(o['low'], True)}, {_fmt(o['high'], True)}] over {o['n']} repeats; "
        f"goal ≥ {need:+.2f} with the interval above 0: **{'met' if ok else 'not met'}**."
    )
    if task.headline == "kappa":
        ratio = d["method_mean"] / d["reference_mean"] if d["reference_mean"] else math.nan
        lines.append(
            f"* {groups[0].capitalize()}→{groups[-1].capitalize()} drop: CoMCL (full) {_fmt(d['method_mean'])}, "
            f"cross-entropy only {_fmt(d['reference_mean'])} (ratio {_fmt(ratio)}; paired difference "
            f"{_fmt(d['mean'], True)} [{_fmt(d['low'], True)}, {_fmt(d['high'], True)}]); goal: at most half: "
            f"**{'met' if math.isfinite(ratio) and ratio <= 0.5 else 'not met'}**."
        )
        last = groups[-1]
        for ref in ("simclr", "supcon"):
            e = paired.get(f"comcl - {ref}")
            if e is None:
                continue
            r = {k: math.nan if v is None else v for k, v in e[last].items()}
            lines.append(
                f"* CoMCL (full) − {METHOD_LABELS.get(ref, ref)} on {last.capitalize()} images: "
                f"{_fmt(r['mean'], True)} [{_fmt(r['low'], True)}, {_fmt(r['high'], True)}]; goal: at least "
                f"{METHOD_LABELS.get(ref, ref)}: **{'met' if r['mean'] >= 0 else 'not met'}** (on the mean)."
            )
    return lines


def repeats_needed(sd: float, half_width: float, limit: int = 200) -> int | None:
    """Fewest repeats whose 95 % t-interval of a mean difference with spread ``sd`` is at most ``±half_width``.

    Examples:
        >>> repeats_needed(0.042, 0.05), repeats_needed(0.0, 0.05), repeats_needed(1.0, 0.01, limit=50)
        (6, 2, None)
    """
    from scipy import stats

    for n in range(2, limit + 1):
        if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def _noise(paired: dict[str, Any], task: Task, groups: list[str]) -> list[str]:
    """Spread of the per-repeat differences and the repeats that resolve the goal's effect size."""
    import statistics

    h = 0.05 if task.headline == "kappa" else 0.03
    lines = [
        f"Noise of the paired differences (standard deviation over repeats) and the repeats a 95 % interval of "
        f"±{h:.2f} needs (the goal's effect size):",
        "",
        "| difference | " + " | ".join(["overall", *groups, "drop"]) + " |",
        "|" + "---|" * (len(groups) + 3),
    ]
    for entry in paired.values():
        cells = []
        for q in ["overall", *groups, "drop"]:
            d = [x for x in entry[q]["per_repeat"] if x is not None]
            if len(d) < 2:
                cells.append("n/a")
                continue
            sd = statistics.stdev(d)
            n = repeats_needed(sd, h)
            cells.append(f"{sd:.3f} ({n if n is not None else '> 200'})")
        labels = task.method_labels
        name = f"{labels.get(entry['method'], entry['method'])} − {labels.get(entry['reference'], entry['reference'])}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_section(results_dir: str | Path, rel: str = "results", note: str = "") -> str:
    """The Markdown of one comparison: setting, mean ± std table, paired differences, goal, plots."""
    src = Path(results_dir)
    compare = json.loads((src / "compare.json").read_text(encoding="utf-8"))
    paired = json.loads((src / "paired.json").read_text(encoding="utf-8")) if (src / "paired.json").is_file() else {}
    protocol = (
        json.loads((src / "protocol.json").read_text(encoding="utf-8")) if (src / "protocol.json").is_file() else {}
    )
    timing = json.loads((src / "timing.json").read_text(encoding="utf-8")) if (src / "timing.json").is_file() else {}
    task = task_of(compare)
    first = next(iter(compare.values()))
    groups = list(first["per_quality"])
    runs = first["runs"]
    cfg = protocol.get("config", {})
    syn = cfg.get("data", {}).get("synthetic", {})
    fine = cfg.get("finetune", {})
    seeds = sorted({s for r in compare.values() for s in r.get("seeds", [])})
    complete = [s for s in seeds if all(s in r.get("seeds", []) for r in compare.values())]
    n_group = {g: [r["per_quality"][g].get("n") for r in runs] for g in groups}
    lines = [
        f"* Command: `python {protocol.get('command', '?')}`",
        f"* Machine: {protocol.get('machine', '?')}; torch threads {protocol.get('torch_threads', '?')}"
        + (f"; {note}" if note else "")
        + ".",
        f"* Compute: {timing.get('total_s', math.nan) / 60:.1f} min summed over the runs' pre-training, "
        "fine-tuning and evaluation (each run's `timing.json`; rendering the data not included).",
        f"* Repeats: {len(complete)} complete (seeds {', '.join(map(str, complete))})"
        + (f"; partial: {', '.join(str(s) for s in seeds if s not in complete)}" if len(complete) < len(seeds) else "")
        + f". Methods: {', '.join(task.method_labels.get(m, m) for m in compare)}.",
        f"* Data per repeat: {syn.get('n_train', '?')} training images (every one pre-trained, without its labels), "
        f"{syn.get('n_test', '?')} test images ("
        + ", ".join(f"{g} {_span(v)}" for g, v in n_group.items())
        + f" per repeat); a new draw per repeat (data seed {syn.get('seed', '?')} + 2·seed, test + 1).",
        f"* Labels: fine-tuning sees {_span([r.get('labelled_images') for r in runs])} images' labels (label_fraction "
        f"{fine.get('label_fraction')} of qualities {fine.get('label_qualities') or 'all'}, stratified, the same "
        f"for every method of a repeat); pre-training {cfg.get('pretrain', {}).get('epochs', '?')} epochs, "
        f"fine-tuning {fine.get('epochs', '?')} epochs.",
        "",
        f"Mean ± std over repeats ({task.metric_titles.get(task.headline, task.headline)} "
        "per quality group of the test set):",
        "",
    ]
    from examples.common.compare import markdown_table

    lines.append(markdown_table(compare, groups, task).rstrip("\n"))
    if paired:
        lines += [
            "",
            "Paired differences (per repeat, the same data and labelled subset for both methods), mean and "
            "95 % t-interval over repeats (`scipy.stats.ttest_1samp`); for the drop, negative favours the first "
            "method:",
            "",
            paired_table(paired, groups, task).rstrip("\n"),
            "",
            *_noise(paired, task, groups),
            "",
            "Goal of the issue, checked:",
            "",
            *_verdicts(paired, task, groups),
        ]
    title = task.metric_titles.get(task.headline, task.headline)
    lines += ["", f"{title[0].upper()}{title[1:]} per repeat (seeds {', '.join(map(str, seeds))}):", ""]
    for method, r in compare.items():
        values = ", ".join(_fmt(run.get(task.headline, math.nan)) for run in r["runs"])
        lines.append(f"* {task.method_labels.get(method, method)}: {values}")
    losses = (
        json.loads((src / "pretrain_loss.json").read_text(encoding="utf-8"))
        if (src / "pretrain_loss.json").is_file()
        else {}
    )
    if losses:
        lines += ["", "Pre-training loss per epoch (mean over repeats; `pretrain_loss.json` has every repeat):", ""]
        for name, per_seed in losses.items():
            curves = [c for c in per_seed.values() if c]
            width = min(len(c) for c in curves)
            means = [sum(c[e] for c in curves) / len(curves) for e in range(width)]
            lines.append(f"* {name}: " + " → ".join(f"{v:.3f}" for v in means) + f" ({len(curves)} repeats)")
    probes = json.loads((src / "probes.json").read_text(encoding="utf-8")) if (src / "probes.json").is_file() else {}
    if probes.get("methods"):
        from examples.common.probe_report import INITIAL_LABEL, probe_table

        lines += [
            "",
            "Probes of the frozen pre-trained encoders on the held-out test images (`probes.json`; cross-entropy "
            "only's row is each repeat's initial encoder), mean ± std over repeats, then paired differences, mean "
            "[95 % t-interval over repeats]:",
            "",
            probe_table(probes, dict(task.method_labels) | {"ce": INITIAL_LABEL}).rstrip("\n"),
        ]
    pngs = sorted(p.name for p in src.glob("*.png"))
    if pngs:
        lines.append("")
        lines += [f"![{p}]({rel}/{p})" for p in pngs]
    return "\n".join(lines) + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the generated section ``name`` replaced by ``body`` (appended when absent)."""
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def render(results_dir: str | Path, results_md: str | Path, name: str, note: str = "") -> None:
    """Rewrite section ``name`` of ``results_md`` from the summaries in ``results_dir``."""
    md = Path(results_md)
    rel = Path(results_dir).resolve().relative_to(md.resolve().parent).as_posix()
    body = render_section(results_dir, rel, note)
    text = md.read_text(encoding="utf-8") if md.is_file() else ""
    md.write_text(replace_section(text, name, body), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.common.results_md", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="copy a comparison's summaries, timings and losses into a folder")
    c.add_argument("run_dir", type=Path)
    c.add_argument("dest", type=Path)
    r = sub.add_parser("render", help="rewrite a generated section of a RESULTS.md")
    r.add_argument("results_dir", type=Path)
    r.add_argument("results_md", type=Path)
    r.add_argument("--name", default="comparison", help="the section's marker name")
    r.add_argument("--note", default="", help="conditions of the run (e.g. other jobs sharing the machine)")
    args = p.parse_args(argv)
    try:
        if args.command == "collect":
            print(f"wrote {collect(args.run_dir, args.dest)}")
        else:
            render(args.results_dir, args.results_md, args.name, args.note)
            print(f"rewrote section {args.name!r} of {args.results_md}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
