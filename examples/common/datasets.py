"""Readers for the real dataset files of the EyeQ and ChestX-ray14 example pipelines.

Everything here reads the files exactly as the dataset authors publish them, checks every row, and
raises ``ValueError`` naming the file, the line and the offending value when a row is malformed
(``FileNotFoundError`` naming the path when a file is missing). Nothing here downloads anything.

EyeQ (Fu et al., MICCAI 2019, https://github.com/HzFu/EyeQ), ``data/Label_EyeQ_train.csv`` and
``data/Label_EyeQ_test.csv``: a pandas export with an unnamed index column::

    ,image,quality,DR_grade
    0,10009_left.jpeg,0,0

``quality`` is 0 Good, 1 Usable, 2 Reject; ``DR_grade`` is the EyePACS grade 0-4.

NIH ChestX-ray14 (Wang et al., CVPR 2017, https://nihcc.app.box.com/v/ChestXray-NIHCC):

- ``Data_Entry_2017.csv``: ``Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient
  Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],`` -- the bracketed
  names contain commas, so a CSV reader sees 12 header fields (the original 2017 file ends the header
  with a comma; the 2020 revision does not) and 11 fields per row. ``Finding Labels`` joins labels
  with ``|``; ``No Finding`` means none of the 14.
- ``BBox_List_2017.csv``: ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` -- the box column name
  splits into ``Bbox [x``, ``y``, ``w``, ``h]`` plus three empty names; rows have 6 fields, boxes in
  pixels of the 1024x1024 images. The box list spells ``Infiltrate`` where the labels say
  ``Infiltration``; the reader maps it.
- ``train_val_list.txt`` / ``test_list.txt``: one image name per line; the official split is by
  patient.

Lesion boxes are stored as JSON (:mod:`examples.common.boxes`, re-exported here), converted once from
the pickle the CoMCL authors distribute (:func:`convert_pickle_boxes`, or
``python -m examples.common.datasets convert-boxes IN.pkl OUT.json --allow-pickle``), proposed from
class activation maps (``python -m examples.common.propose_boxes``) or written by a detector.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from examples.common.boxes import (
    BOXES_FORMAT,
    BOXES_VERSION,
    Box,
    SplitBoxes,
    convert_pickle_boxes,
    existing_file,
    read_boxes_json,
    write_boxes_json,
)

if TYPE_CHECKING:
    import torch

# torch, numpy and PIL are imported inside the functions that need them, so the readers and the
# box-conversion command line start in a fraction of a second.

__all__ = [
    "BOXES_FORMAT",
    "BOXES_VERSION",
    "CHESTXRAY14_LABELS",
    "EYEQ_DR_GRADES",
    "EYEQ_QUALITY_NAMES",
    "NO_FINDING",
    "Box",
    "ChestRecord",
    "EyeQRecord",
    "SplitBoxes",
    "assert_patient_disjoint",
    "convert_pickle_boxes",
    "load_image",
    "main",
    "multi_hot",
    "multi_hot_matrix",
    "read_bbox_list",
    "read_boxes_json",
    "read_data_entry",
    "read_eyeq_labels",
    "read_split",
    "write_boxes_json",
]

PathLike = str | os.PathLike[str]

_INT_RE = re.compile(r"[+-]?\d+")


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _read_csv(path: PathLike, what: str) -> tuple[Path, list[str], list[tuple[int, list[str]]]]:
    """Header (stripped names) and the non-blank rows with their 1-based line numbers."""
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


def _parse_int(text: str, where: str, column: str, allowed: range | None = None) -> int:
    s = text.strip()
    if not _INT_RE.fullmatch(s):
        raise ValueError(f"{where}: expected an integer `{column}`, got {text!r}")
    value = int(s)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{where}: expected `{column}` in {allowed.start}..{allowed.stop - 1}, got {value}")
    return value


def _parse_float(text: str, where: str, column: str) -> float:
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"{where}: expected a number `{column}`, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite `{column}`, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------
# EyeQ
# --------------------------------------------------------------------------------------------------

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
    p, header, rows = _read_csv(csv_path, "EyeQ label file")
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
        quality = _parse_int(row[col["quality"]], where, "quality", range(len(EYEQ_QUALITY_NAMES)))
        dr_grade = _parse_int(row[col["DR_grade"]], where, "DR_grade", range(EYEQ_DR_GRADES))
        records.append(EyeQRecord(image=image, quality=quality, dr_grade=dr_grade))
    return records


# --------------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# --------------------------------------------------------------------------------------------------

#: The 14 ChestX-ray14 labels in the official order (the order of the paper's tables and of CheXNet).
CHESTXRAY14_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
#: The ``Finding Labels`` value of an image with none of the 14 labels.
NO_FINDING = "No Finding"

_LABEL_INDEX = {name: i for i, name in enumerate(CHESTXRAY14_LABELS)}
# Spellings of BBox_List_2017.csv that differ from Data_Entry_2017.csv.
_BBOX_LABEL_ALIASES = {"Infiltrate": "Infiltration"}
_DATA_ENTRY_PREFIX = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age")


@dataclass(frozen=True)
class ChestRecord:
    """One row of ``Data_Entry_2017.csv``.

    Attributes:
        image: ``Image Index``, e.g. ``"00000001_000.png"``.
        labels: the findings among :data:`CHESTXRAY14_LABELS`, in that order; ``()`` for
            ``No Finding``.
        patient_id: ``Patient ID``.
        follow_up: ``Follow-up #``.
        age: ``Patient Age`` in years (``"058Y"`` style values are read as 58).
        gender: ``Patient Gender`` (``Patient Sex`` in some re-releases), ``"M"`` or ``"F"``.
        view_position: ``"PA"`` or ``"AP"``.
        original_size: ``(width, height)`` of the original image in pixels, when the row has it.
        pixel_spacing: ``(x, y)`` original pixel spacing in mm, when the row has it.
    """

    image: str
    labels: tuple[str, ...]
    patient_id: int
    follow_up: int = 0
    age: int | None = None
    gender: str = ""
    view_position: str = ""
    original_size: tuple[int, int] | None = None
    pixel_spacing: tuple[float, float] | None = None


def _parse_finding_labels(text: str, where: str) -> tuple[str, ...]:
    parts = [part.strip() for part in text.split("|")]
    if parts == [NO_FINDING]:
        return ()
    seen: set[str] = set()
    for part in parts:
        if part == NO_FINDING:
            raise ValueError(f"{where}: `{NO_FINDING}` combined with other labels in {text!r}")
        if part not in _LABEL_INDEX:
            raise ValueError(
                f"{where}: unknown label {part!r} in `Finding Labels` {text!r}; "
                f"expected '|'-joined labels from {', '.join(CHESTXRAY14_LABELS)} or {NO_FINDING!r}"
            )
        if part in seen:
            raise ValueError(f"{where}: label {part!r} repeated in `Finding Labels` {text!r}")
        seen.add(part)
    return tuple(sorted(seen, key=_LABEL_INDEX.__getitem__))


def read_data_entry(csv_path: PathLike) -> list[ChestRecord]:
    """Read ChestX-ray14's ``Data_Entry_2017.csv`` (or its 2020 revision).

    Columns are taken by position after checking the header, because the bracketed names
    ``OriginalImage[Width,Height]`` and ``OriginalImagePixelSpacing[x,y]`` contain commas. Rows
    need the first 7 fields; the size and spacing fields are read when present.

    Args:
        csv_path: path of the CSV file.

    Returns:
        The records in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unexpected header, a short row, a repeated image, a non-integer ID/age/
            follow-up, or an unknown label; the message reads ``<file>:<line>: ...`` and quotes the
            value.
    """
    p, header, rows = _read_csv(csv_path, "ChestX-ray14 data entry file")
    if (
        tuple(header[: len(_DATA_ENTRY_PREFIX)]) != _DATA_ENTRY_PREFIX
        or len(header) < 7
        or header[5] not in ("Patient Gender", "Patient Sex")
        or header[6] != "View Position"
    ):
        raise ValueError(
            f"{p}:1: expected the Data_Entry_2017.csv header starting "
            f"'{','.join(_DATA_ENTRY_PREFIX)},Patient Gender,View Position', got {','.join(header)!r}"
        )
    records: list[ChestRecord] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        where = f"{p}:{line}"
        if len(row) < 7:
            raise ValueError(f"{where}: expected at least 7 fields, got {len(row)}: {','.join(row)!r}")
        if any(cell.strip() for cell in row[11:]):
            raise ValueError(f"{where}: expected at most 11 non-empty fields, got {','.join(row)!r}")
        image = row[0].strip()
        if not image:
            raise ValueError(f"{where}: empty `Image Index` in {','.join(row)!r}")
        if image in first_line:
            raise ValueError(f"{where}: image {image!r} already listed on line {first_line[image]}")
        first_line[image] = line
        labels = _parse_finding_labels(row[1], where)
        follow_up = _parse_int(row[2], where, "Follow-up #")
        patient_id = _parse_int(row[3], where, "Patient ID")
        age_text = row[4].strip()
        age = _parse_int(age_text[:-1] if age_text.endswith("Y") else age_text, where, "Patient Age")
        size: tuple[int, int] | None = None
        spacing: tuple[float, float] | None = None
        extra = [cell.strip() for cell in row[7:11]]
        if len(extra) >= 2 and extra[0] and extra[1]:
            size = (
                _parse_int(extra[0], where, "OriginalImage[Width"),
                _parse_int(extra[1], where, "Height]"),
            )
        if len(extra) == 4 and extra[2] and extra[3]:
            spacing = (
                _parse_float(extra[2], where, "OriginalImagePixelSpacing[x"),
                _parse_float(extra[3], where, "y]"),
            )
        records.append(
            ChestRecord(
                image=image,
                labels=labels,
                patient_id=patient_id,
                follow_up=follow_up,
                age=age,
                gender=row[5].strip(),
                view_position=row[6].strip(),
                original_size=size,
                pixel_spacing=spacing,
            )
        )
    return records


def multi_hot(labels: Iterable[str]) -> torch.Tensor:
    """Multi-hot vector of ChestX-ray14 labels.

    Args:
        labels: names from :data:`CHESTXRAY14_LABELS` (``()`` for No Finding).

    Returns:
        ``(14,)`` float32, 1 at the index of each label in :data:`CHESTXRAY14_LABELS`.

    Raises:
        ValueError: an unknown label.

    Examples:
        >>> multi_hot(("Cardiomegaly", "Hernia")).nonzero().flatten().tolist()
        [1, 13]
    """
    import torch

    out = torch.zeros(len(CHESTXRAY14_LABELS), dtype=torch.float32)
    for label in labels:
        if label not in _LABEL_INDEX:
            raise ValueError(f"Expected a label from {', '.join(CHESTXRAY14_LABELS)}, but got {label!r}")
        out[_LABEL_INDEX[label]] = 1.0
    return out


def multi_hot_matrix(records: Sequence[ChestRecord]) -> torch.Tensor:
    """Targets of a list of records.

    Args:
        records: ``N`` records from :func:`read_data_entry`.

    Returns:
        ``(N, 14)`` float32 multi-hot targets, columns in :data:`CHESTXRAY14_LABELS` order.
    """
    import torch

    out = torch.zeros(len(records), len(CHESTXRAY14_LABELS), dtype=torch.float32)
    for i, record in enumerate(records):
        out[i] = multi_hot(record.labels)
    return out


def read_bbox_list(csv_path: PathLike) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """Read ChestX-ray14's ``BBox_List_2017.csv``.

    The header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: a CSV reader splits the box column
    name into four and adds three empty names, so fields are taken by position: image, label, x, y,
    w, h, then only empty fields. ``Infiltrate`` is mapped to ``Infiltration``.

    Args:
        csv_path: path of the CSV file.

    Returns:
        ``{image: [(label, (x, y, w, h)), ...]}`` in file order; ``(x, y)`` is the top-left corner
        and ``(w, h)`` the size, in pixels of the 1024x1024 image.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unexpected header, a short row, a non-empty trailing field, an unknown
            label, a non-numeric coordinate, or a box with ``w <= 0`` or ``h <= 0``; the message
            reads ``<file>:<line>: ...`` and quotes the value.
    """
    p, header, rows = _read_csv(csv_path, "ChestX-ray14 bounding-box file")
    if len(header) < 3 or header[:2] != ["Image Index", "Finding Label"] or not header[2].startswith("Bbox"):
        raise ValueError(
            f"{p}:1: expected the BBox_List_2017.csv header 'Image Index,Finding Label,Bbox [x,y,w,h],,,', "
            f"got {','.join(header)!r}"
        )
    out: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for line, row in rows:
        where = f"{p}:{line}"
        if len(row) < 6:
            raise ValueError(
                f"{where}: expected 6 fields (image, label, x, y, w, h), got {len(row)}: {','.join(row)!r}"
            )
        if any(cell.strip() for cell in row[6:]):
            raise ValueError(f"{where}: expected nothing after x, y, w, h, got {','.join(row)!r}")
        image = row[0].strip()
        if not image:
            raise ValueError(f"{where}: empty `Image Index` in {','.join(row)!r}")
        raw_label = row[1].strip()
        label = _BBOX_LABEL_ALIASES.get(raw_label, raw_label)
        if label not in _LABEL_INDEX:
            raise ValueError(
                f"{where}: unknown `Finding Label` {raw_label!r}; expected one of "
                f"{', '.join(CHESTXRAY14_LABELS)} (or 'Infiltrate')"
            )
        x, y, w, h = (_parse_float(row[2 + i], where, name) for i, name in enumerate("xywh"))
        if w <= 0 or h <= 0:
            raise ValueError(f"{where}: expected a box with w > 0 and h > 0, got w={row[4]!r}, h={row[5]!r}")
        out.setdefault(image, []).append((label, (x, y, w, h)))
    return out


def read_split(txt_path: PathLike) -> list[str]:
    """Read ``train_val_list.txt`` or ``test_list.txt``: one image name per line.

    Args:
        txt_path: path of the list.

    Returns:
        The image names in file order (blank lines skipped).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line holding more than one name, or a name listed twice (with both lines).
    """
    p = existing_file(txt_path, "split list")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: split list is not UTF-8 text ({e})") from e
    names: list[str] = []
    first_line: dict[str, int] = {}
    for line, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if any(ch.isspace() for ch in name) or "," in name:
            raise ValueError(f"{p}:{line}: expected one image name per line, got {raw!r}")
        if name in first_line:
            raise ValueError(f"{p}:{line}: image {name!r} already listed on line {first_line[name]}")
        first_line[name] = line
        names.append(name)
    return names


def assert_patient_disjoint(records: Iterable[ChestRecord], train: Iterable[str], test: Iterable[str]) -> None:
    """Check that no patient has images in both the train(+val) and the test list.

    Args:
        records: the records of ``Data_Entry_2017.csv`` (image -> patient).
        train: image names of the training (and validation) split.
        test: image names of the test split.

    Raises:
        ValueError: an image of either list is missing from ``records``, an image is in both lists,
            or a patient has images in both; the message names an example patient and an image of
            that patient on each side.
    """
    patient_of = {record.image: record.patient_id for record in records}

    def first_image_by_patient(images: Iterable[str], name: str) -> dict[int, str]:
        out: dict[int, str] = {}
        for image in images:
            if image not in patient_of:
                raise ValueError(f"image {image!r} of the {name} list is not in the data entry records")
            out.setdefault(patient_of[image], image)
        return out

    train_list, test_list = list(train), list(test)
    both = set(train_list) & set(test_list)
    if both:
        raise ValueError(f"{len(both)} image(s) are in both the train and the test list, e.g. {min(both)!r}")
    train_patients = first_image_by_patient(train_list, "train")
    test_patients = first_image_by_patient(test_list, "test")
    shared = train_patients.keys() & test_patients.keys()
    if shared:
        pid = min(shared)
        raise ValueError(
            f"{len(shared)} patient(s) have images in both train and test, e.g. patient {pid} "
            f"({train_patients[pid]!r} in train, {test_patients[pid]!r} in test)"
        )


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(
    path: PathLike,
    mode: Literal["RGB", "L"] = "RGB",
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Load an image file as a float tensor.

    8-bit images are scaled by 1/255; 16-bit grayscale (some ChestX-ray14 PNGs) by 1/65535.
    Palette, alpha and grayscale inputs are converted to ``mode``.

    Args:
        path: image file (any format PIL reads: PNG, JPEG, ...).
        mode: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        size: output ``(H, W)``, or an int for a square; ``None`` keeps the file's size. Resized
            bilinearly with antialiasing.

    Returns:
        ``(C, H, W)`` float32 in ``[0, 1]``, ``C`` 3 for RGB and 1 for L.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: a bad ``mode`` or ``size``, or a file PIL cannot decode (corrupt or truncated;
            the message names the path).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image, UnidentifiedImageError

    if mode not in ("RGB", "L"):
        raise ValueError(f"Expected `mode` in ('RGB', 'L'), but got {mode!r}")
    out_size: tuple[int, int] | None
    if size is None:
        out_size = None
    elif isinstance(size, int) and not isinstance(size, bool):
        out_size = (size, size)
    elif (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        out_size = (size[0], size[1])
    else:
        raise ValueError(f"Expected `size` to be None, an int or an (H, W) pair of ints, but got {size!r}")
    if out_size is not None and min(out_size) <= 0:
        raise ValueError(f"Expected `size` > 0, but got {size!r}")
    p = existing_file(path, "image")
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode in _SIXTEEN_BIT_MODES:
                gray = np.asarray(img, dtype=np.float32) / 65535.0  # (H, W)
                arr = gray[None] if mode == "L" else np.repeat(gray[None], 3, axis=0)
            else:
                arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
                arr = arr[None] if mode == "L" else arr.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {p} ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(np.ascontiguousarray(arr)).clamp_(0.0, 1.0)
    if out_size is not None and tuple(x.shape[1:]) != out_size:
        x = F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m examples.common.datasets convert-boxes IN.pkl OUT.json --allow-pickle``.

    Returns:
        The exit status: 0 on success, 2 on an error (printed to stderr).
    """
    parser = argparse.ArgumentParser(
        prog="python -m examples.common.datasets", description="Dataset file utilities of the example pipelines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser(
        "convert-boxes",
        help="convert the CoMCL authors' lesion-box pickle to JSON",
        description="Convert {'train': {'healthy': {...}, 'unhealthy': {...}}, 'val': {...}} from a pickle to JSON.",
    )
    convert.add_argument("pkl", help="input pickle")
    convert.add_argument("json", help="output JSON")
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="required: unpickling runs code stored in the file, so only use a file you trust",
    )
    args = parser.parse_args(argv)
    try:
        boxes = convert_pickle_boxes(args.pkl, args.json, allow_pickle=args.allow_pickle)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, b in boxes.items():
        n_healthy = sum(len(v) for v in b.healthy.values())
        n_unhealthy = sum(len(v) for v in b.unhealthy.values())
        print(
            f"{split}: {len(b.healthy)} healthy images ({n_healthy} boxes), "
            f"{len(b.unhealthy)} unhealthy images ({n_unhealthy} boxes)"
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
