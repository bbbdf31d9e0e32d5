"""CSV reading both dataset readers share: header and numbered rows, integer and number fields.

Every error is a ``ValueError`` naming the file and line (``<file>:<line>: ...``) and quoting the
value; a missing file is a ``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from examples.common.boxes import PathLike, existing_file

__all__ = ["parse_float", "parse_int", "read_csv_rows"]

_INT_RE = re.compile(r"[+-]?\d+")


def read_csv_rows(path: PathLike, what: str) -> tuple[Path, list[str], list[tuple[int, list[str]]]]:
    """Header (stripped names) and the non-blank rows with their 1-based line numbers.

    ``what`` names the file in messages (e.g. ``"EyeQ label file"``). A UTF-8 byte-order mark is
    skipped; blank lines are dropped.
    """
    p = existing_file(path, what)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header: list[str] | None = None
            rows: list[tuple[int, list[str]]] = []
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank line (a trailing newline at the end of the file)
                if header is None:
                    header = [cell.strip() for cell in row]
                else:
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: {what} is not UTF-8 text ({e})") from e
    except csv.Error as e:
        raise ValueError(f"{p}: {what} is not valid CSV ({e})") from e
    if header is None:
        raise ValueError(f"{p}: {what} is empty (expected a header line)")
    return p, header, rows


def parse_int(text: str, where: str, column: str, allowed: range | None = None) -> int:
    """``text`` as an int (in ``allowed`` when given); ``where`` is the ``<file>:<line>`` of messages."""
    s = text.strip()
    if not _INT_RE.fullmatch(s):
        raise ValueError(f"{where}: expected an integer `{column}`, got {text!r}")
    value = int(s)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{where}: expected `{column}` in {allowed.start}..{allowed.stop - 1}, got {value}")
    return value


def parse_float(text: str, where: str, column: str) -> float:
    """``text`` as a finite float; ``where`` is the ``<file>:<line>`` of messages."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"{where}: expected a number `{column}`, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite `{column}`, got {text!r}")
    return value
