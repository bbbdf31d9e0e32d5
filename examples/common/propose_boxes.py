"""Propose lesion boxes for real training images from a grading model's class activation maps.

The real datasets have image-level labels but (almost) no lesion boxes. This command takes a run
of the pipeline's own cross-entropy / BCE stage (``--method ce``; a run of any method works, its
fine-tuned classifier is used), computes Grad-CAM maps of the disease on the training images of
the run's configured dataset and writes them as scored boxes in the box JSON (version 2) that the
pipelines read (``data.eyeq.boxes_json``, ``data.chestxray14.boxes_json``)::

    python examples/eyeq/train.py --config examples/eyeq/configs/real_cpu.yaml --method ce \\
        --set data.eyeq.root=/data/EyeQ --out runs/eyeq-ce
    python -m examples.common.propose_boxes runs/eyeq-ce --out /data/EyeQ/proposed_boxes.json
    python examples/eyeq/train.py --config examples/eyeq/configs/real_cpu.yaml \\
        --set data.eyeq.root=/data/EyeQ --set data.eyeq.boxes_json=proposed_boxes.json --out runs/eyeq

EyeQ: images graded >= 1 get boxes of the "any DR" evidence; grade-0 images never get lesion boxes
(they are listed with no healthy box, so pre-training draws random healthy patches from them).
ChestX-ray14: every positive label's own map gives boxes labelled with it; ``No Finding`` images
are listed as healthy. Images whose maps give no box are left out. How maps become boxes:
:mod:`examples.common.cam_boxes`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a file as well as with -m from the repository root
    sys.path.insert(0, str(REPO))

__all__ = ["ImageItem", "dataset_items", "main", "propose_items"]


@dataclass(frozen=True)
class ImageItem:
    """One image to propose boxes for.

    Attributes:
        key: the image's key in the box JSON (its file name, as the pipelines match it).
        path: the image file.
        targets: outputs to explain (EyeQ: ``[1]`` for grade >= 1, ``[]`` for grade 0; ChestX-ray14:
            indices of the positive labels, ``[]`` for No Finding).
    """

    key: str
    path: Path
    targets: tuple[int, ...]


def _path(root: Path | None, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or root is None else root / p


def dataset_items(config: dict[str, Any], pipeline: str, limit: int | None = None) -> list[ImageItem]:
    """The training images of a run's configured real dataset, with the targets to explain.

    Raises:
        ValueError: the run was configured on synthetic data, or a file of the dataset is missing.
    """
    from examples.chestxray.readers import CHESTXRAY14_LABELS, read_data_entry, read_split
    from examples.eyeq.readers import read_eyeq_labels

    data = config["data"]
    source = data.get("source")
    if source == "synthetic":
        raise ValueError(
            "data.source: the run was trained on synthetic data (data.source: synthetic); propose_boxes reads "
            "the training images of a real dataset: use a run configured with data.source eyeq or chestxray14"
        )
    if pipeline == "eyeq":
        rc = data["eyeq"]
        root = Path(rc["root"]).expanduser() if rc.get("root") else None
        folder = _path(root, rc["train_images"])
        rows = read_eyeq_labels(_path(root, rc["train_csv"]))[:limit]
        return [ImageItem(r.image, folder / r.image, (1,) if r.dr_grade >= 1 else ()) for r in rows]
    rc = data["chestxray14"]
    root = Path(rc["root"]).expanduser() if rc.get("root") else None
    folder = _path(root, rc["images"])
    records = {r.image: r for r in read_data_entry(_path(root, rc["data_entry"]))}
    names = read_split(_path(root, rc["train_list"]))[:limit]
    missing = [n for n in names if n not in records]
    if missing:
        raise ValueError(
            f"data.chestxray14.train_list: {len(missing)} image(s) not in the data entry, e.g. {missing[0]!r}"
        )
    index = {name: i for i, name in enumerate(CHESTXRAY14_LABELS)}
    return [ImageItem(n, folder / n, tuple(index[label] for label in records[n].labels)) for n in names]


def propose_items(
    trained: Any, items: Sequence[ImageItem], settings: Any, batch_size: int = 16, split: str = "train"
) -> dict[str, Any]:
    """Proposals for ``items`` as ``{split: SplitBoxes}`` (scores; ChestX-ray14 boxes carry their label).

    Args:
        trained: a :class:`~examples.common.trained.TrainedModel`.
        items: the images and their targets.
        settings: a :class:`~examples.common.cam_boxes.CamSettings`.
        batch_size: images per forward/backward pass.
        split: the split name in the JSON.
    """
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from examples.common.boxes import SplitBoxes
    from examples.common.cam_boxes import propose_batch

    size = settings.cam_size or trained.image_size
    out = SplitBoxes()
    for start in tqdm(range(0, len(items), batch_size), desc="proposing boxes", dynamic_ncols=True):
        chunk = items[start : start + batch_size]
        images = torch.stack([trained.load(it.path, size) for it in chunk])
        sizes = []
        for it in chunk:
            with Image.open(it.path) as img:
                sizes.append((img.height, img.width))
        found = propose_batch(
            trained.model, images, [it.targets for it in chunk], sizes, settings, any_disease=not trained.multilabel
        )
        for it, prop in zip(chunk, found, strict=True):
            if not it.targets:
                out.healthy[it.key] = []  # no disease: random healthy patches, never a lesion box
            elif len(prop.boxes):
                out.unhealthy[it.key] = [tuple(b) for b in prop.boxes.tolist()]
                out.scores[it.key] = prop.scores.tolist()
                if trained.multilabel:
                    out.labels[it.key] = [trained.class_names[t] for t in prop.targets.tolist()]
    return {split: out}


def _parser() -> argparse.ArgumentParser:
    from examples.common.cam_boxes import LAYERS

    p = argparse.ArgumentParser(
        prog="python -m examples.common.propose_boxes",
        description="Propose lesion boxes from Grad-CAM maps of a trained grading model; write the box JSON.",
    )
    p.add_argument("run", type=Path, help="run directory (or its checkpoint.pt) of the pipeline's ce stage")
    p.add_argument("--out", type=Path, required=True, help="box JSON to write")
    p.add_argument("--split", default="train", help="split name in the JSON (default: train)")
    p.add_argument(
        "--layer",
        default="layer1",
        help=f"encoder module of the map: a ResNet stage {', '.join(LAYERS)} (default layer1) or a timm module name",
    )
    p.add_argument(
        "--cam-size", type=int, default=None, help="side the image is resized to for the map (default: 2x image_size)"
    )
    p.add_argument("--thresholds", default="0.5", help="comma-separated fractions of a map's peak (default: 0.5)")
    p.add_argument(
        "--min-size", type=float, default=None, help="minimum box side in original pixels (default: 2%% of the side)"
    )
    p.add_argument(
        "--max-size", type=float, default=None, help="maximum box side in original pixels (default: 40%% of the side)"
    )
    p.add_argument("--nms-iou", type=float, default=0.3, help="IoU of non-maximum suppression (default: 0.3)")
    p.add_argument("--max-boxes", type=int, default=8, help="boxes per map (default: 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N training images")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 2 with a one-line message on a bad argument, file or checkpoint."""
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from examples.common.boxes import write_boxes_json
    from examples.common.cam_boxes import CamSettings
    from examples.common.trained import load_trained

    try:
        thresholds = tuple(float(t) for t in args.thresholds.split(","))
    except ValueError:
        raise ValueError(f"--thresholds: expected comma-separated numbers, got {args.thresholds!r}") from None
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    trained = load_trained(args.run)
    items = dataset_items(trained.config, trained.pipeline, args.limit)
    side = _typical_side(items)
    settings = CamSettings(
        layer=args.layer,
        cam_size=args.cam_size or 2 * trained.image_size,
        thresholds=thresholds,
        min_size=args.min_size if args.min_size is not None else 0.02 * side,
        max_size=args.max_size if args.max_size is not None else 0.4 * side,
        nms_iou=args.nms_iou,
        max_boxes=args.max_boxes,
    )
    boxes = propose_items(trained, items, settings, args.batch_size, args.split)
    if not args.out.parent.is_dir():
        raise ValueError(f"--out: directory {str(args.out.parent)!r} does not exist")
    write_boxes_json(boxes, args.out)
    split = boxes[args.split]
    diseased = sum(1 for it in items if it.targets)
    n_boxes = sum(len(b) for b in split.unhealthy.values())
    print(
        f"{len(items)} images: {diseased} with disease, {len(split.unhealthy)} of them with boxes "
        f"({n_boxes} boxes), {len(split.healthy)} healthy; {settings.layer} at {settings.cam_size} px"
    )
    print(f"wrote {args.out}")
    return 0


def _typical_side(items: Sequence[ImageItem]) -> float:
    """The shorter side of the first image (the datasets' images share a size), for default size limits."""
    from PIL import Image

    if not items:
        raise ValueError("the run's dataset lists no training image")
    with Image.open(items[0].path) as img:
        return float(min(img.size))


if __name__ == "__main__":
    sys.exit(main())
