"""Lesion boxes as JSON: the layout both pipelines read, with scores and labels since version 2.

Boxes come from the CoMCL authors' pickle (:func:`convert_pickle_boxes`), from class activation maps
of a grading model (:mod:`examples.common.propose_boxes`) or from a detector; all are written with
:func:`write_boxes_json` and read with :func:`read_boxes_json`, which reads version 1 (four numbers
per box) and version 2 (a box may carry a ``score`` and a ``label``). The command line converts the
authors' pickle once: ``python -m examples.common.boxes convert-boxes IN.pkl OUT.json --allow-pickle``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import pickle
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BOXES_FORMAT",
    "BOXES_VERSION",
    "READABLE_BOXES_VERSIONS",
    "Box",
    "SplitBoxes",
    "convert_pickle_boxes",
    "existing_file",
    "main",
    "read_boxes_json",
    "write_boxes_json",
]

PathLike = str | os.PathLike[str]

#: A box ``(x1, y1, x2, y2)`` in pixels: top-left and bottom-right corners, as PIL's ``crop`` box.
Box = tuple[float, float, float, float]
#: ``format`` tag of the lesion-box JSON.
BOXES_FORMAT = "mlcl_losses.lesion_boxes"
#: ``version`` written by :func:`write_boxes_json` (2: a box may carry a score and a label).
BOXES_VERSION = 2
#: versions :func:`read_boxes_json` reads.
READABLE_BOXES_VERSIONS = (1, 2)
_GROUPS = ("healthy", "unhealthy")
T = TypeVar("T")


@dataclass
class SplitBoxes:
    """Boxes of one split.

    Attributes:
        healthy: ``{image: [box, ...]}`` of healthy regions (negatives for the lesion level).
        unhealthy: ``{image: [box, ...]}`` of lesions.
        scores: ``{image: [score, ...]}``, parallel to ``unhealthy[image]``, for images whose lesion
            boxes are scored (a proposal's or a detector's confidence; higher is surer). Images
            without scores are absent.
        labels: ``{image: [label, ...]}``, parallel to ``unhealthy[image]``: the finding each box is
            evidence of (e.g. a ChestX-ray14 label), for images whose boxes are labelled.
    """

    healthy: dict[str, list[Box]] = field(default_factory=dict)
    unhealthy: dict[str, list[Box]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)


def existing_file(path: PathLike, what: str) -> Path:
    """``path`` as a ``Path``; FileNotFoundError when it does not exist, ValueError when it is not a file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise ValueError(f"Expected {what} {p} to be a file, but it is not (a directory?)")
    return p


def _check_box(value: Any, where: str) -> Box:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from a detector
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
        raise ValueError(f"{where}: expected a box [x1, y1, x2, y2] of 4 numbers, got {value!r}")
    coords = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{where}: expected a box [x1, y1, x2, y2] of finite numbers, got {value!r}")
        coords.append(float(v))
    x1, y1, x2, y2 = coords
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: expected a box with x2 > x1 and y2 > y1, got {value!r}")
    return (x1, y1, x2, y2)


def _check_score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: expected `score` to be a finite number, got {value!r}")
    return float(value)


def _check_entry(value: Any, where: str, scored: bool) -> tuple[Box, float | None, str | None]:
    """A box of version 1 (4 numbers) or 2 (4 numbers, or ``{"box", "score"?, "label"?}``)."""
    if not (scored and isinstance(value, Mapping)):
        return _check_box(value, where), None, None
    unknown = set(value) - {"box", "score", "label"}
    if "box" not in value or unknown:
        raise ValueError(f"{where}: expected keys 'box' and optionally 'score', 'label', got {sorted(map(str, value))}")
    label = value.get("label")
    if label is not None and (not isinstance(label, str) or not label):
        raise ValueError(f"{where}: expected `label` to be a non-empty string, got {label!r}")
    score = None if value.get("score") is None else _check_score(value["score"], where)
    return _check_box(value["box"], where), score, label


def _every_or_none(given: list[T | None], at: str, what: str) -> list[T] | None:
    """``given`` when every box has a ``what``, None when no box has one; a mixture is refused."""
    present = [g for g in given if g is not None]
    if not present:
        return None
    if len(present) != len(given):
        raise ValueError(f"{at}: either every box or no box has a {what}, got {given!r}")
    return present


def _check_group(
    value: Any, where: str, scored: bool = False
) -> tuple[dict[str, list[Box]], dict[str, list[float]], dict[str, list[str]]]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping {{image: [boxes]}}, got {type(value).__name__}")
    out: dict[str, list[Box]] = {}
    scores: dict[str, list[float]] = {}
    labels: dict[str, list[str]] = {}
    for image, boxes in value.items():
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: expected image keys to be non-empty strings, got {image!r}")
        at = f"{where}, image {image!r}"
        if isinstance(boxes, (str, bytes, Mapping)) or not isinstance(boxes, Iterable):
            raise ValueError(f"{at}: expected a list of boxes, got {boxes!r}")
        entries = [_check_entry(box, f"{at}, box {i}", scored) for i, box in enumerate(boxes)]
        out[image] = [e[0] for e in entries]
        image_scores = _every_or_none([e[1] for e in entries], at, "score")
        if image_scores is not None:
            scores[image] = image_scores
        image_labels = _every_or_none([e[2] for e in entries], at, "label")
        if image_labels is not None:
            labels[image] = image_labels
    return out, scores, labels


def _check_tree(tree: Any, source: str, allow_flat: bool, scored: bool = False) -> dict[str, SplitBoxes]:
    """Validate ``{split: {"healthy": {...}, "unhealthy": {...}}}``.

    With ``allow_flat`` a split may instead be a plain ``{image: [boxes]}`` mapping (the authors'
    ``'val'``), read as lesion boxes. With ``scored`` (version 2) lesion boxes may be objects with a
    score and a label.
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"{source}: expected a mapping {{split: boxes}}, got {type(tree).__name__}")
    out: dict[str, SplitBoxes] = {}
    for split, value in tree.items():
        where = f"{source}: split {split!r}"
        if not isinstance(split, str) or not split:
            raise ValueError(f"{source}: expected split names to be non-empty strings, got {split!r}")
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        keys = set(value.keys())
        if keys and keys <= set(_GROUPS):
            healthy = _check_group(value.get("healthy", {}), f"{where}, group 'healthy'")[0]
            unhealthy, scores, labels = _check_group(value.get("unhealthy", {}), f"{where}, group 'unhealthy'", scored)
            out[split] = SplitBoxes(healthy=healthy, unhealthy=unhealthy, scores=scores, labels=labels)
        elif allow_flat or not keys:
            out[split] = SplitBoxes(unhealthy=_check_group(value, f"{where}, group 'unhealthy'")[0])
        else:
            raise ValueError(f"{where}: expected keys 'healthy' and 'unhealthy', got {sorted(map(str, keys))[:5]!r}")
    return out


def _entries(split: SplitBoxes, image: str, boxes: list[Box], where: str) -> list[Any]:
    scores, labels = split.scores.get(image), split.labels.get(image)
    for name, column in (("scores", scores), ("labels", labels)):
        if column is not None and len(column) != len(boxes):
            raise ValueError(f"{where}, image {image!r}: {len(column)} {name} for {len(boxes)} boxes")
    if scores is None and labels is None:
        return [list(box) for box in boxes]
    out = []
    for i, box in enumerate(boxes):
        entry: dict[str, Any] = {"box": list(box)}
        if scores is not None:
            entry["score"] = _check_score(scores[i], f"{where}, image {image!r}, box {i}")
        if labels is not None:
            entry["label"] = labels[i]
        out.append(entry)
    return out


def write_boxes_json(boxes: Mapping[str, SplitBoxes], json_path: PathLike) -> None:
    """Write lesion boxes as JSON (version 2).

    Layout (UTF-8, one file for all splits)::

        {
          "format": "mlcl_losses.lesion_boxes",
          "version": 2,
          "splits": {
            "train": {"healthy":   {"<image>": [[x1, y1, x2, y2], ...], ...},
                      "unhealthy": {"<image>": [[x1, y1, x2, y2], ...],
                                    "<image>": [{"box": [x1, y1, x2, y2], "score": 0.93, "label": "Nodule"}, ...]}},
            "val":   {"healthy": {}, "unhealthy": {...}}
          }
        }

    ``<image>`` is the key as the source gave it (a file name or a path); boxes are corners in
    pixels of that image, ``x2 > x1`` and ``y2 > y1`` (PIL ``crop`` convention). A lesion box is
    four numbers, or (images with ``scores`` or ``labels``) an object with ``box`` and ``score``
    and/or ``label``. Version 1 files (four numbers only) are read as before.

    Args:
        boxes: ``{split: SplitBoxes}``.
        json_path: output path; its parent directory must exist. Written atomically.

    Raises:
        ValueError: an invalid box, score or label (the message names the split, group, image and box).
    """
    for split, b in boxes.items():
        extra = (set(b.scores) | set(b.labels)) - set(b.unhealthy)
        if extra:
            raise ValueError(f"split {split!r}: scores or labels of an image without lesion boxes: {min(extra)!r}")
    tree = {
        split: {
            "healthy": b.healthy,
            "unhealthy": {img: _entries(b, img, bs, f"split {split!r}") for img, bs in b.unhealthy.items()},
        }
        for split, b in boxes.items()
    }
    checked = _check_tree(tree, "boxes to write", allow_flat=False, scored=True)
    doc = {
        "format": BOXES_FORMAT,
        "version": BOXES_VERSION,
        "splits": {
            split: {
                "healthy": {img: [list(box) for box in bs] for img, bs in b.healthy.items()},
                "unhealthy": {img: _entries(b, img, bs, f"split {split!r}") for img, bs in b.unhealthy.items()},
            }
            for split, b in checked.items()
        },
    }
    out = Path(json_path)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def read_boxes_json(json_path: PathLike) -> dict[str, SplitBoxes]:
    """Read lesion boxes written by :func:`write_boxes_json` (layout documented there; versions 1 and 2).

    Args:
        json_path: path of the JSON file.

    Returns:
        ``{split: SplitBoxes}``, boxes as ``(x1, y1, x2, y2)`` float tuples, with their scores and
        labels where the file has them.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON, a wrong ``format``/``version``, or an invalid box (the message names
            the file, split, group, image and box).
    """
    p = existing_file(json_path, "lesion-box JSON")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a lesion-box JSON file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != BOXES_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{p}: expected `format` {BOXES_FORMAT!r}, got {got!r}")
    version = doc.get("version")
    if isinstance(version, bool) or version not in READABLE_BOXES_VERSIONS:
        raise ValueError(f"{p}: expected `version` in {READABLE_BOXES_VERSIONS}, got {version!r}")
    return _check_tree(doc.get("splits"), str(p), allow_flat=False, scored=version >= 2)


def convert_pickle_boxes(pkl_path: PathLike, json_path: PathLike, allow_pickle: bool = False) -> dict[str, SplitBoxes]:
    """Convert the CoMCL authors' lesion-box pickle to the JSON of :func:`write_boxes_json`.

    The pickle holds ``{'train': {'healthy': {path: [(x1, y1, x2, y2), ...]}, 'unhealthy': {...}},
    'val': {...}}``; a split given as a plain ``{path: [boxes]}`` mapping (the authors' ``'val'``)
    is read as lesion (``unhealthy``) boxes. Keys are kept verbatim. Boxes may be tuples, lists or
    numpy arrays of numbers.

    Args:
        pkl_path: the pickle file.
        json_path: the JSON file to write.
        allow_pickle: must be ``True``: unpickling runs whatever code the file asks for, so only
            convert a file from a source you trust.

    Returns:
        The converted boxes, ``{split: SplitBoxes}``.

    Raises:
        ValueError: ``allow_pickle`` is not ``True``; the file cannot be unpickled; or the content
            is not in the layout above or holds an invalid box (the message names the file, split,
            group, image and box).
        FileNotFoundError: the pickle does not exist.
    """
    if allow_pickle is not True:
        raise ValueError(
            f"Refusing to unpickle {pkl_path}: loading a pickle runs arbitrary code stored in the file. "
            "Pass allow_pickle=True (command line: --allow-pickle) only for a file from a source you trust."
        )
    p = existing_file(pkl_path, "lesion-box pickle")
    try:
        with p.open("rb") as f:
            tree = pickle.load(f)  # guarded by allow_pickle above
    except Exception as e:  # unpickling can fail in many ways (corrupt file, missing module, ...)
        raise ValueError(f"{p}: cannot unpickle ({type(e).__name__}: {e})") from e
    boxes = _check_tree(tree, str(p), allow_flat=True)
    write_boxes_json(boxes, json_path)
    return boxes


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m examples.common.boxes convert-boxes IN.pkl OUT.json --allow-pickle``.

    Returns:
        The exit status: 0 on success, 2 on an error (printed to stderr).
    """
    parser = argparse.ArgumentParser(
        prog="python -m examples.common.boxes", description="Lesion-box file utilities of the example pipelines."
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
