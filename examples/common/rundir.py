"""Run directories: what counts as a run, a fresh numbered directory, and removal only when asked.

A directory *holds a run* when it, or any directory below it, has a checkpoint, a finished run's
``metrics.json``, a comparison's ``compare.json`` or a pre-trained ``encoder.pt``. The run *at* a
directory OUT is OUT's own files plus, for a comparison, its ``METHOD/seedN`` folders and its
``pretrain/FOLDER/seedN`` encoders; any other run below OUT is another run, which ``--overwrite`` never
removes. Nothing here deletes a run unless the user passed ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_HEADER",
    "RUN_FILES",
    "choose_out",
    "clear_run",
    "config_written_by_run",
    "describe_runs",
    "foreign_runs",
    "foreign_runs_problem",
    "holds_run",
    "next_free_dir",
    "own_dirs",
    "remove_new_files",
    "run_markers",
    "snapshot",
]

RUN_FILES = (
    "checkpoint.pt",
    "metrics.json",
    "timing.json",
    "scalars.csv",
    "config.yaml",
    "summary.png",
    "encoder.pt",
    "compare.json",
    "compare.md",
    "compare_kappa.png",
    "compare_auc.png",
    "compare.png",
    "paired.json",
    "paired_kappa.png",
    "paired_mean_auc.png",
    "probes.json",
    "paired_probes.png",
    "protocol.json",
    "run_time.json",
)
"""Files the pipelines write into a run directory (besides its ``tensorboard`` directory)."""
CONFIG_HEADER = "# The configuration of the run in this folder, written by the pipeline."
"""First line of the ``config.yaml`` a run writes (a file without it is the user's, never replaced silently)."""
_MARKERS = ("checkpoint.pt", "metrics.json", "compare.json", "encoder.pt")
_SEED = re.compile(r"seed[0-9]+")


def _walk(out: Path) -> list[Path]:
    """``out`` and every directory below it (``tensorboard`` and symbolic links left out), parents first."""
    if not out.is_dir():
        return []
    found = []
    for root, dirs, _files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if d != "tensorboard" and not os.path.islink(os.path.join(root, d)))
        found.append(Path(root))
    return found


def own_dirs(out: Path) -> list[Path]:
    """The directories of the run at ``out``: ``out``, a comparison's ``METHOD/seedN`` and ``pretrain/FOLDER/seedN``."""
    from examples.common.compare import COMPARE_METHODS

    found = [out] if out.is_dir() else []
    for method in (*COMPARE_METHODS, "pretrain"):
        parents = [out / method] if method != "pretrain" else sorted(p for p in (out / method).glob("*") if p.is_dir())
        for parent in parents:
            if parent.is_dir() and not parent.is_symlink():
                found += sorted(
                    d for d in parent.iterdir() if d.is_dir() and not d.is_symlink() and _SEED.fullmatch(d.name)
                )
    return found


def _markers(d: Path) -> list[Path]:
    return [d / name for name in _MARKERS if (d / name).is_file()]


def run_markers(out: Path) -> list[Path]:
    """The files that make ``out`` hold a run: checkpoints, metrics, comparisons, pre-trained encoders.

    Looked for in ``out`` and in every directory below it; an empty list means nothing of value would
    be lost by writing there.
    """
    return [m for d in _walk(out) for m in _markers(d)]


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run (see :func:`run_markers`)."""
    return bool(run_markers(out))


def _run_roots(out: Path) -> list[Path]:
    """The runs in ``out``: ``out`` (when its run has files) and the other runs below it, each named by its
    top directory (a comparison below ``out`` is one run, with its METHOD/seedN and pretrain folders)."""
    roots: list[Path] = []
    covered: set[Path] = set()
    for d in _walk(out):
        if d in covered:
            continue
        mine = own_dirs(d)
        if any(_markers(x) for x in mine):
            roots.append(d)
            covered.update(p for x in mine for p in (x, *x.parents) if p == d or d in p.parents)
    return roots


def foreign_runs(out: Path) -> list[Path]:
    """Directories below ``out`` holding a run that is not the run at ``out`` (see :func:`own_dirs`)."""
    return [d for d in _run_roots(out) if d != out]


def describe_runs(out: Path) -> str:
    """``"2 runs: a, b; 14 files in all"``: the runs in ``out`` (see :func:`foreign_runs`) and its file count."""
    runs = _run_roots(out)
    names = [str(d.relative_to(out)) if d != out else "the folder itself" for d in runs]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    files = sum(len(files) for _root, _dirs, files in os.walk(out))
    return f"{len(runs)} run{'s' if len(runs) != 1 else ''}: {shown}; {files} file{'s' if files != 1 else ''} in all"


def config_written_by_run(path: Path) -> bool:
    """Whether ``path`` (a ``config.yaml``) was written by a run: it starts with :data:`CONFIG_HEADER`, or
    lies beside a run's checkpoint, metrics, comparison or encoder (runs written before the header)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            first = f.readline().rstrip("\n")
    except OSError:
        return False
    return first == CONFIG_HEADER or bool(_markers(path.parent))


def next_free_dir(base: Path) -> Path:
    """``base`` if it holds no run, else the first of ``base-2``, ``base-3``, ... that holds none."""
    if not holds_run(base):
        return base
    n = 2
    while holds_run(base.with_name(f"{base.name}-{n}")):
        n += 1
    return base.with_name(f"{base.name}-{n}")


def _remove_files(d: Path, keep: set[Path] | None = None) -> None:
    for name in RUN_FILES:
        if keep is None or d / name not in keep:
            (d / name).unlink(missing_ok=True)
    if (d / "tensorboard").is_dir() and (keep is None or d / "tensorboard" not in keep):
        shutil.rmtree(d / "tensorboard")


def _remove_empty(dirs: list[Path], out: Path) -> None:
    """Remove the directories of ``dirs`` (below ``out``) left empty, and their emptied parents up to ``out``."""
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):  # children before parents
        while d != out and out in d.parents and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def foreign_runs_problem(out: Path, source: str = "--out") -> str | None:
    """Why ``--overwrite`` of ``out`` is refused (other runs below it, :func:`foreign_runs`), or ``None``."""
    others = foreign_runs(out)
    if not others:
        return None
    names = ", ".join(str(d.relative_to(out)) for d in others[:4]) + (" ..." if len(others) > 4 else "")
    return (
        f"--overwrite replaces only the run at {out} (its own files, a comparison's METHOD/seedN and pretrain "
        f"folders), but {out} holds {len(others)} other run(s) below it ({names}); choose another {source}"
    )


def clear_run(out: Path) -> None:
    """Remove the run at ``out`` (``--overwrite``); files the pipelines did not write are left alone.

    Removes :data:`RUN_FILES` and ``tensorboard/`` from ``out`` and from a comparison's ``METHOD/seedN``
    and ``pretrain/FOLDER/seedN`` directories (:func:`own_dirs`), then those left empty.

    Raises:
        ValueError: ``out`` holds other runs below it (:func:`foreign_runs`); nothing is removed.
    """
    problem = foreign_runs_problem(out)
    if problem is not None:
        raise ValueError(problem)
    dirs = own_dirs(out)
    for d in dirs:
        _remove_files(d)
    _remove_empty(dirs[1:], out)


def snapshot(out: Path) -> set[Path]:
    """Every file and directory below ``out`` now (see :func:`remove_new_files`)."""
    if not out.exists():
        return set()
    found = {out}
    for root, dirs, files in os.walk(out):
        found.update(Path(root, n) for n in (*dirs, *files))
    return found


def remove_new_files(out: Path, before: set[Path]) -> None:
    """Undo a command that failed before writing anything of value: remove the run files it created in ``out``.

    Only :data:`RUN_FILES` and ``tensorboard/`` absent from ``before`` (:func:`snapshot` taken before the
    command wrote) are removed, then the directories it created that are left empty (``out`` included).
    """
    dirs = own_dirs(out)
    for d in dirs:
        _remove_files(d, keep=before)
    new_dirs = [d for d in dirs if d not in before]
    _remove_empty([d for d in new_dirs if d != out], out)
    if out not in before and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def choose_out(args: Any, cfg: Any, say: Callable[..., None]) -> Path | None:
    """The output directory of a command (``args``: the parsed command line, ``cfg``: the configuration);
    ``None`` when a resumed run is already finished (nothing to do).

    Nothing is written here, so a command refused here changes nothing on disk.

    Raises:
        ConfigError: ``--out`` is a file or holds a run (without ``--resume``/``--overwrite``), the run would
            replace a ``config.yaml`` it did not write (the user's, e.g. ``--config``) without ``--overwrite``,
            or ``--overwrite`` would reach other runs below OUT.
        CheckpointError: ``--resume`` with no checkpoint to resume from.
    """
    from examples.common.checkpoint import CheckpointError
    from examples.common.config import ConfigError

    out = args.out if args.out is not None else Path(cfg.run.out)
    source = "--out" if args.out is not None else "run.out"
    for part in (out, *out.parents):
        if part.exists() and not part.is_dir():
            raise ConfigError(f"Expected {source} to be a directory, but {part} is a file")
    single = not args.compare and args.seeds == 1
    if args.resume:
        if single and (out / "metrics.json").is_file():
            say(f"{out} holds a finished run (metrics.json); nothing to resume, nothing changed")
            return None
        if single and not (out / "checkpoint.pt").is_file():
            raise CheckpointError(f"no checkpoint to resume from at {out / 'checkpoint.pt'}")
        if not single and (out / "compare.json").is_file():
            summary = json.loads((out / "compare.json").read_text(encoding="utf-8"))
            methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.compare else [cfg.run.method]
            seeds = args.seed_values
            if all(m in summary and len(summary[m].get("runs", [])) == len(seeds) for m in methods) and all(
                (out / m / f"seed{s}" / "metrics.json").is_file() for m in methods for s in seeds
            ):
                say(f"{out} holds a finished comparison (compare.json); nothing to resume, nothing changed")
                return None
        _check_config_file(args, out, source)
        return out
    if args.overwrite:
        problem = foreign_runs_problem(out, source)
        if problem is not None:
            raise ConfigError(problem)
        return out
    if holds_run(out):
        if args.out is not None:
            raise ConfigError(
                f"--out {out} already holds a run ({describe_runs(out)}); pass --resume to continue it "
                "or --overwrite to replace it (or choose another --out)"
            )
        fresh = next_free_dir(out)
        say(f"{out} holds an earlier run; writing this one to {fresh}")
        out = fresh
    _check_config_file(args, out, source)
    return out


def _check_config_file(args: Any, out: Path, source: str) -> None:
    """Refuse to replace ``OUT/config.yaml`` when it is the user's (``--config`` itself, or not a run's)."""
    from examples.common.config import ConfigError

    path = out / "config.yaml"
    if args.overwrite or not path.is_file() or (args.resume and path.is_file()):  # a resumed run keeps the file
        return
    if args.config is not None and Path(args.config).resolve() == path.resolve():
        raise ConfigError(
            f"--config {args.config} is the config.yaml of {source} {out}, which the run would replace with its "
            "own dump (comments lost); pass a copy of it as --config, choose another --out, or pass --overwrite"
        )
    if not config_written_by_run(path):
        raise ConfigError(
            f"{source} {out} holds a config.yaml that no run wrote, which the run would replace with its own; "
            "move the file, choose another --out, or pass --overwrite"
        )
