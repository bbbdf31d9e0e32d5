"""Readers of the real NIH ChestX-ray14 files.

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

Every reader checks every row and raises ``ValueError`` naming the file, the line and the offending
value when a row is malformed (``FileNotFoundError`` naming the path when a file is missing). The label
list is the library's :data:`mlcl_losses.synthetic.CHESTXRAY14_LABELS` (the synthetic look-alike uses
the same 14 labels in the same order). Images are read with :mod:`examples.common.images`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from examples.common.boxes import PathLike, existing_file
from examples.common.csv_rows import parse_float, parse_int, read_csv_rows
from mlcl_losses.synthetic import CHESTXRAY14_LABELS

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHESTXRAY14_LABELS",
    "NO_FINDING",
    "ChestRecord",
    "assert_patient_disjoint",
    "multi_hot",
    "multi_hot_matrix",
    "read_bbox_list",
    "read_data_entry",
    "read_split",
]

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
    p, header, rows = read_csv_rows(csv_path, "ChestX-ray14 data entry file")
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
        follow_up = parse_int(row[2], where, "Follow-up #")
        patient_id = parse_int(row[3], where, "Patient ID")
        age_text = row[4].strip()
        age = parse_int(age_text[:-1] if age_text.endswith("Y") else age_text, where, "Patient Age")
        size: tuple[int, int] | None = None
        spacing: tuple[float, float] | None = None
        extra = [cell.strip() for cell in row[7:11]]
        if len(extra) >= 2 and extra[0] and extra[1]:
            size = (
                parse_int(extra[0], where, "OriginalImage[Width"),
                parse_int(extra[1], where, "Height]"),
            )
        if len(extra) == 4 and extra[2] and extra[3]:
            spacing = (
                parse_float(extra[2], where, "OriginalImagePixelSpacing[x"),
                parse_float(extra[3], where, "y]"),
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
    p, header, rows = read_csv_rows(csv_path, "ChestX-ray14 bounding-box file")
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
        x, y, w, h = (parse_float(row[2 + i], where, name) for i, name in enumerate("xywh"))
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
