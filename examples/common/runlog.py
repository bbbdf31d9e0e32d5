"""Metrics of a run: a CSV of scalars, JSON files, TensorBoard, and progress bars that stay out of log files."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["RunLogger", "jsonable", "progress", "show_progress", "write_json"]

T = TypeVar("T")


def show_progress() -> bool:
    """Whether progress bars are drawn: only on a terminal (stderr is a TTY), and only by rank 0 of a job.

    A redirected log gets no bars (every refresh would be a line); the pipelines print one summary
    line per epoch instead. ``TQDM_DISABLE=1`` turns bars off on a terminal too.
    """
    if os.environ.get("RANK", "0") != "0" or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Any:
    """``items`` in a tqdm bar, drawn only when :func:`show_progress` says so (``set_postfix`` always works)."""
    return tqdm(items, desc=desc, total=total, leave=leave, dynamic_ncols=True, disable=not show_progress())


def jsonable(value: Any) -> Any:
    """Nested structure with tensors/NumPy scalars as floats and NaN/inf as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented strict JSON, atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)


class RunLogger:
    """Scalars to ``DIR/scalars.csv`` (``stage, epoch, step, name, value``) and to TensorBoard.

    The CSV is appended to, so a resumed run continues it; rows of epochs after the checkpoint that a
    resumed run repeats are dropped first (:meth:`truncate`).

    Args:
        out_dir: run directory.
        tensorboard: also write TensorBoard events under ``DIR/tensorboard``.
        enabled: False makes every method a no-op (the ranks other than 0 of a multi-process run).
        fresh: start a new CSV (rows of an earlier attempt that left no checkpoint are dropped);
            False appends to an existing one (a resumed run).
    """

    FIELDS = ("stage", "epoch", "step", "name", "value")

    def __init__(
        self, out_dir: str | os.PathLike[str], tensorboard: bool = True, enabled: bool = True, fresh: bool = False
    ) -> None:
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "scalars.csv"
        if fresh or not self.csv_path.exists():
            with self.csv_path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self.FIELDS)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def truncate(self, keep: Any) -> None:
        """Keep only CSV rows for which ``keep(stage, epoch)`` is true (before resuming)."""
        if not self.enabled:
            return
        with self.csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if keep(r["stage"], int(r["epoch"]))]
        with self.csv_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(kept)

    def scalars(self, stage: str, epoch: int, step: int, values: dict[str, float]) -> None:
        """Log several scalars at a global ``step``."""
        if not self.enabled:
            return
        with self.csv_path.open("a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for name, value in values.items():
                w.writerow((stage, epoch, step, name, f"{float(value):.6g}"))
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{stage}/{name}", float(value), step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
