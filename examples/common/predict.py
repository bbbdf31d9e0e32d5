"""Apply a trained pipeline run to new images: one row per image, as CSV or JSON.

::

    python -m examples.common.predict runs/eyeq photo.jpeg --out predictions.csv
    python -m examples.common.predict runs/eyeq folder/ --out predictions.json
    python -m examples.common.predict runs/chestxray paths.csv --out predictions.csv --pipeline chestxray
    python examples/eyeq/predict.py runs/eyeq folder/ --out predictions.csv      # refuses a ChestX-ray run

``INPUT`` is an image file, a folder (its image files, sorted by name, not recursive) or a CSV whose
``path`` column (else its first column) lists image files (relative paths from the CSV's folder).
The architecture, the input size and the channel handling come from the configuration stored with
the checkpoint, which is read with ``weights_only=True``.

Rows: EyeQ: ``image, grade, confidence, p_grade_0 .. p_grade_4`` (``grade`` the most probable DR
grade, ``confidence`` its probability). ChestX-ray14: ``image``, ``confidence`` and the 14 label
probabilities (``confidence`` the mean over labels of the probability of the predicted state,
``max(p, 1 - p)``). Both end with ``notes``: empty, or why a score deserves doubt -- ``blank`` (every
pixel of the model's input has one value) or ``small`` (the file is under a quarter of the model's
input side and was upscaled); the command also prints how many images were flagged. Images are
resized to the model's input size; no degradation is applied.

An image that cannot be used (undecodable, too large for PIL to decode safely, the wrong channels)
gets a row with empty scores and ``notes`` ``skipped: <why>``, and a printed warning; the command
fails (exit 2, nothing written) only when no image can be used. The JSON ``meta`` holds
``run_state`` (fine-tuning ``epoch`` of ``epochs``, ``finished``); a classifier of an interrupted
run is used with a printed warning. ``--out`` is never the INPUT nor a file in the run's directory,
and an existing file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["IMAGE_SUFFIXES", "collect_images", "input_notes", "main", "predict_rows", "write_rows"]

#: File suffixes a folder's images are recognised by.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: A file whose shorter side is under this fraction of the model's input side is noted as ``small``.
SMALL_FRACTION = 0.25


def collect_images(source: str | Path) -> list[Path]:
    """The image files of ``source``: a file, a folder (sorted, not recursive) or a CSV of paths.

    Raises:
        FileNotFoundError: ``source`` or a file the CSV lists does not exist.
        ValueError: an empty folder or CSV, or a CSV without a path column.
    """
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"INPUT: no such file or folder: {p}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"INPUT: folder {p} holds no image file (suffixes {', '.join(IMAGE_SUFFIXES)})")
        return files
    if p.suffix.lower() != ".csv":
        return [p]
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or not rows[0]:
        raise ValueError(f"INPUT: {p} should have a header line and at least one row of image paths")
    header = [h.strip().lower() for h in rows[0]]
    column = header.index("path") if "path" in header else 0
    files = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= column or not row[column].strip():
            raise ValueError(f"INPUT: {p}, line {line}: no image path in column {rows[0][column]!r}")
        image = Path(row[column].strip()).expanduser()
        image = image if image.is_absolute() else p.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"INPUT: {p}, line {line}: image not found: {image}")
        files.append(image)
    return files


def input_notes(path: Path, image: Any, size: int) -> str:
    """Why a score of this input deserves doubt, ``"; "``-separated; ``""`` when nothing was noticed.

    Args:
        path: the image file (only its header is read again, for the stored size).
        image: ``(3, size, size)`` float tensor in [0, 1], the model's input made from ``path``.
        size: the model's input side, pixels.

    Returns:
        ``"blank: ..."`` when every value of ``image`` is within 1/255 of one another (an empty,
        black or overexposed file) and ``"small: WxH px upscaled to SxS"`` when the file's shorter
        side is under :data:`SMALL_FRACTION` of ``size``.
    """
    from PIL import Image

    notes = []
    if float(image.max() - image.min()) < 1 / 255:
        notes.append("blank: every pixel of the input has one value")
    with warnings.catch_warnings():  # the size was checked when the image was loaded
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            width, height = img.size
    if min(width, height) < SMALL_FRACTION * size:
        notes.append(f"small: {width}x{height} px upscaled to {size}x{size}")
    return "; ".join(notes)


def _row_template(trained: Any) -> dict[str, Any]:
    """The columns of a row, every score empty (the row of an image that could not be used)."""
    if trained.multilabel:
        return {"image": "", "confidence": None, **dict.fromkeys(trained.class_names), "notes": ""}
    return {
        "image": "",
        "grade": None,
        "confidence": None,
        **{f"p_grade_{n}": None for n in trained.class_names},
        "notes": "",
    }


def predict_rows(trained: Any, images: Sequence[Path], batch_size: int = 32) -> list[dict[str, Any]]:
    """One row per image (see the module docstring), in the order of ``images``.

    An image that cannot be used (missing, undecodable, too large for PIL to decode safely, the wrong
    channels) gets a row with empty scores and ``notes`` ``"skipped: <why>"``.

    Args:
        trained: a :class:`~examples.common.trained.TrainedModel`.
        images: image files.
        batch_size: images per forward pass.
    """
    import torch

    rows: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        loaded: list[tuple[Path, Any]] = []
        skipped: dict[Path, str] = {}
        for path in chunk:
            try:
                loaded.append((path, trained.load(path)))
            except (FileNotFoundError, ValueError) as err:
                skipped[path] = f"skipped: {err}"
        probs = trained.probabilities(torch.stack([x for _, x in loaded])).tolist() if loaded else []
        scores = {path: (image, p) for (path, image), p in zip(loaded, probs, strict=True)}
        for path in chunk:
            row: dict[str, Any] = _row_template(trained) | {"image": str(path)}
            if path in skipped:
                rows.append(row | {"notes": skipped[path]})
                continue
            image, p = scores[path]
            if trained.multilabel:
                row["confidence"] = sum(max(x, 1 - x) for x in p) / len(p)
                row.update({name: x for name, x in zip(trained.class_names, p, strict=True)})
            else:
                grade = max(range(len(p)), key=p.__getitem__)
                row["grade"] = grade
                row["confidence"] = p[grade]
                row.update({f"p_grade_{name}": x for name, x in zip(trained.class_names, p, strict=True)})
            row["notes"] = input_notes(path, image, trained.image_size)
            rows.append(row)
    return rows


def write_rows(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """``.csv``: a header and one line per row; ``.json``: ``{"meta": ..., "predictions": rows}``."""
    if not out.parent.is_dir():
        raise ValueError(f"--out: directory {str(out.parent)!r} does not exist")
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix.lower() == ".json":
        tmp.write_text(json.dumps({"meta": meta, "predictions": rows}, indent=1) + "\n", encoding="utf-8")
    else:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(out)


def build_parser(
    prog: str = "python -m examples.common.predict", choose_pipeline: bool = True
) -> argparse.ArgumentParser:
    """Arguments of the predict command (``--pipeline`` only where the pipeline is not fixed)."""
    p = argparse.ArgumentParser(prog=prog, description="Apply a trained run's classifier to new images.")
    p.add_argument("run", type=Path, help="run directory or its checkpoint.pt")
    p.add_argument("input", type=Path, help="an image file, a folder of images, or a CSV of image paths")
    p.add_argument(
        "--out", type=Path, required=True, help="predictions file: .csv or .json (never the INPUT nor in the run)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    if choose_pipeline:
        p.add_argument("--pipeline", choices=("eyeq", "chestxray"), default=None, help="refuse another pipeline's run")
    p.add_argument("--batch-size", type=int, default=32)
    return p


def main(argv: Sequence[str] | None = None, pipeline: str | None = None, prog: str | None = None) -> int:
    """Command line; exit status 2 with a one-line message on a bad checkpoint, image or argument.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        pipeline: refuse a run of another pipeline (the pipelines' own ``predict.py`` set it).
        prog: program name in the usage line.
    """
    args = build_parser(prog or "python -m examples.common.predict", pipeline is None).parse_args(argv)
    try:
        return _main(args, pipeline or args.pipeline)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that would replace the INPUT, a file of the run, or (without ``--overwrite``) any file."""
    out = args.out.resolve()
    if out == args.input.resolve():
        raise ValueError(f"--out: expected a file other than INPUT, got {str(args.out)!r} (the INPUT itself)")
    run_dir = args.run.resolve() if args.run.is_dir() else args.run.resolve().parent
    if run_dir in out.parents and (run_dir / "checkpoint.pt").is_file():
        raise ValueError(
            f"--out: expected a file outside the run directory {str(run_dir)!r} (its results are never replaced), "
            f"got {str(args.out)!r}"
        )
    if args.out.exists() and not args.overwrite:
        raise ValueError(
            f"--out: {str(args.out)!r} already exists; pass --overwrite to replace it, or choose another --out"
        )


def _main(args: argparse.Namespace, pipeline: str | None) -> int:
    from examples.common.trained import load_trained

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if args.out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out: expected a .csv or .json file, got {str(args.out)!r}")
    _check_out(args)
    images = collect_images(args.input)
    trained = load_trained(args.run, expect=pipeline)
    rows = predict_rows(trained, images, args.batch_size)
    skipped = [r for r in rows if r["notes"].startswith("skipped: ")]
    if len(skipped) == len(rows):
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise ValueError(f"INPUT: no image could be used: {skipped[0]['notes'][len('skipped: ') :]}{more}")
    meta = {
        "checkpoint": str(trained.path),
        "pipeline": trained.pipeline,
        "image_size": trained.image_size,
        "classes": list(trained.class_names),
        "activation": "sigmoid" if trained.multilabel else "softmax",
        "run_state": {
            "stage": "finetune",
            "epoch": trained.epoch,
            "epochs": trained.epochs,
            "finished": trained.finished,
        },
        "skipped": len(skipped),
    }
    if not trained.finished:
        print(
            f"warning: {trained.path} holds the classifier after fine-tuning epoch {trained.epoch} of {trained.epochs} "
            "(an interrupted run): these are not the finished run's predictions; --resume the run to finish it"
        )
    write_rows(rows, args.out, meta)
    print(f"{len(rows) - len(skipped)} image(s) -> {args.out}")
    if skipped:
        shown = "; ".join(f"{Path(r['image']).name} ({r['notes'][len('skipped: ') :]})" for r in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"warning: {len(skipped)} image(s) skipped (a row with empty scores, `notes` says why): {shown}{more}")
    flagged = [r for r in rows if r["notes"] and r not in skipped]
    if flagged:
        shown = "; ".join(f"{Path(r['image']).name} ({r['notes']})" for r in flagged[:3])
        more = f" and {len(flagged) - 3} more" if len(flagged) > 3 else ""
        print(f"warning: {len(flagged)} image(s) noted in the `notes` column, their scores deserve doubt: ", end="")
        print(f"{shown}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
