"""Readers of the real EyeQ label files.

EyeQ (Fu et al., MICCAI 2019, https://github.com/HzFu/EyeQ), ``data/Label_EyeQ_train.csv`` and
``data/Label_EyeQ_test.csv``: a pandas export with an unnamed index column::

    ,image,quality,DR_grade
    0,10009_left.jpeg,0,0

``quality`` is 0 Good, 1 Usable, 2 Reject; ``DR_grade`` is the EyePACS grade 0-4. The reader checks
every row and raises ``ValueError`` naming the file, the line and the offending value when a row is
malformed (``FileNotFoundError`` naming the path when the file is missing). Lesion boxes are read with
:mod:`examples.common.boxes`, images with :mod:`examples.common.images`.
"""

from __future__ import annotations

from dataclasses import dataclass

from examples.common.boxes import PathLike
from examples.common.csv_rows import parse_int, read_csv_rows

__all__ = ["EYEQ_DR_GRADES", "EYEQ_QUALITY_NAMES", "EyeQRecord", "read_eyeq_labels"]

#: ``quality`` codes of EyeQ, by value.
EYEQ_QUALITY_NAMES: tuple[str, ...] = ("Good", "Usable", "Reject")
#: Number of diabetic-retinopathy grades (0 none ... 4 proliferative).
EYEQ_DR_GRADES = 5


@dataclass(frozen=True)
class EyeQRecord:
    """One row of ``Label_EyeQ_{train,test}.csv``.

    Attributes:
        image: file name as listed, e.g. ``"10009_left.jpeg"``.
        quality: 0 Good, 1 Usable, 2 Reject (see :data:`EYEQ_QUALITY_NAMES`).
        dr_grade: EyePACS diabetic-retinopathy grade, 0-4.
    """

    image: str
    quality: int
    dr_grade: int


def read_eyeq_labels(csv_path: PathLike) -> list[EyeQRecord]:
    """Read an EyeQ label file (``Label_EyeQ_train.csv`` or ``Label_EyeQ_test.csv``).

    The file is a pandas export: an unnamed leading index column, then ``image``, ``quality`` and
    ``DR_grade``. Columns are found by name, so a file without the index column reads too.

    Args:
        csv_path: path of the CSV file.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: a missing column, a row with the wrong number of fields, an empty image name,
            a non-integer value, or ``quality`` outside 0-2 / ``DR_grade`` outside 0-4; the
            message reads ``<file>:<line>: ...`` and quotes the value.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "Label_EyeQ_train.csv").write_text(",image,quality,DR_grade\\n0,1_left.jpeg,2,3\\n")
        >>> read_eyeq_labels(d / "Label_EyeQ_train.csv")
        [EyeQRecord(image='1_left.jpeg', quality=2, dr_grade=3)]
    """
    p, header, rows = read_csv_rows(csv_path, "EyeQ label file")
    required = ("image", "quality", "DR_grade")
    missing = [name for name in required if name not in header]
    if missing:
        raise ValueError(
            f"{p}:1: expected the EyeQ header ',image,quality,DR_grade' (columns {', '.join(required)}), "
            f"missing {', '.join(missing)} in {','.join(header)!r}"
        )
    col = {name: header.index(name) for name in required}
    records: list[EyeQRecord] = []
    for line, row in rows:
        where = f"{p}:{line}"
        if len(row) != len(header):
            raise ValueError(
                f"{where}: expected {len(header)} fields ({','.join(header)!r}), got {len(row)}: {','.join(row)!r}"
            )
        image = row[col["image"]].strip()
        if not image:
            raise ValueError(f"{where}: empty `image` in {','.join(row)!r}")
        quality = parse_int(row[col["quality"]], where, "quality", range(len(EYEQ_QUALITY_NAMES)))
        dr_grade = parse_int(row[col["DR_grade"]], where, "DR_grade", range(EYEQ_DR_GRADES))
        records.append(EyeQRecord(image=image, quality=quality, dr_grade=dr_grade))
    return records
