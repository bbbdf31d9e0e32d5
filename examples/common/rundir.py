"""Run directories: what counts as a run, a fresh numbered directory, and removal only when asked.

A directory *holds a run* when it has a checkpoint, a finished run's ``metrics.json``, a comparison's
``compare.json`` or a pre-trained ``encoder.pt`` — directly or in a comparison's subdirectories.
Nothing here deletes a run unless the user passed ``--overwrite``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["RUN_FILES", "clear_run", "holds_run", "next_free_dir", "run_markers"]

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
    "probes.json",
    "paired_probes.png",
    "protocol.json",
    "run_time.json",
)
"""Files the pipelines write into a run directory (besides its ``tensorboard`` directory)."""
_MARKERS = ("checkpoint.pt", "metrics.json", "compare.json", "encoder.pt")
_DEPTH = 3  # OUT, OUT/METHOD/seedN and OUT/pretrain/FOLDER/seedN


def _run_dirs(out: Path, depth: int = _DEPTH) -> list[Path]:
    """``out`` and its subdirectories down to ``depth`` levels (``tensorboard`` left out), parents first."""
    if not out.is_dir():
        return []
    found = [out]
    if depth > 0:
        for sub in sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "tensorboard"):
            found += _run_dirs(sub, depth - 1)
    return found


def run_markers(out: Path) -> list[Path]:
    """The files that make ``out`` hold a run: checkpoints, metrics, comparisons, pre-trained encoders.

    Looked for in ``out`` and in its subdirectories down to a comparison's ``METHOD/seedN`` and
    ``pretrain/FOLDER/seedN``; an empty list means nothing of value would be lost by writing there.
    """
    return [d / name for d in _run_dirs(out) for name in _MARKERS if (d / name).is_file()]


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run (see :func:`run_markers`)."""
    return bool(run_markers(out))


def next_free_dir(base: Path) -> Path:
    """``base`` if it holds no run, else the first of ``base-2``, ``base-3``, ... that holds none."""
    if not holds_run(base):
        return base
    n = 2
    while holds_run(base.with_name(f"{base.name}-{n}")):
        n += 1
    return base.with_name(f"{base.name}-{n}")


def clear_run(out: Path) -> None:
    """Remove the run(s) in ``out`` (``--overwrite``); files the pipelines did not write are left alone.

    Removes :data:`RUN_FILES` and ``tensorboard/`` from ``out`` and from every subdirectory that holds
    a run (down to the depth :func:`run_markers` looks), then the directories below ``out`` left empty.
    """
    dirs = _run_dirs(out)
    for d in dirs:
        if d == out or any((d / name).is_file() for name in _MARKERS):
            for name in RUN_FILES:
                (d / name).unlink(missing_ok=True)
            if (d / "tensorboard").is_dir():
                shutil.rmtree(d / "tensorboard")
    for d in reversed(dirs[1:]):  # children before parents
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
