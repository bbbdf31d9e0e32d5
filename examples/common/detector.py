"""A lesion detector for users with lesion-level annotations: train on COCO JSON, write the box JSON.

Where lesion boxes exist for some images (IDRiD, DDR, the ChestX-ray14 box list), a detector trained
on them gives boxes for the pipelines' training images. The detector is torchvision's Faster R-CNN
(Ren et al., NeurIPS 2015, https://arxiv.org/abs/1506.01497) with a ResNet-FPN backbone, randomly
initialised (nothing is downloaded) or loaded from a local file::

    python -m examples.common.detector train --coco lesions.json --images lesion_images/ --out detector.pt
    python -m examples.common.detector predict detector.pt /data/EyeQ/train --out /data/EyeQ/detected.json

``train`` reads COCO object-detection JSON (``images`` with ``id`` and ``file_name``, ``annotations``
with ``image_id``, ``bbox`` ``[x, y, width, height]`` in pixels and ``category_id``, ``categories``
with ``id`` and ``name``); ``predict`` writes the pipelines' box JSON (version 2: each box with its
score and its category name as label), for every image of a folder with at least one detection
above ``--score-threshold``. Grayscale images are repeated to three channels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

__all__ = ["BACKBONES", "CocoImage", "build_detector", "load_detector", "main", "read_coco", "train_detector"]

FORMAT = "mlcl_losses.examples.detector"
VERSION = 1
BACKBONES = ("resnet18", "resnet34", "resnet50")


@dataclass(frozen=True)
class CocoImage:
    """One annotated image: ``boxes (K, 4)`` float ``x1, y1, x2, y2`` and ``labels (K,)`` int64 (1-based)."""

    path: Path
    boxes: Tensor
    labels: Tensor


def _need(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"{where}: expected a key {key!r}")
    return mapping[key]


def read_coco(
    json_path: str | os.PathLike[str], images_dir: str | os.PathLike[str]
) -> tuple[list[CocoImage], list[str]]:
    """Images with their boxes, and the category names (label ``k`` is ``names[k - 1]``; 0 is background).

    Raises:
        FileNotFoundError: the JSON or an image file is missing.
        ValueError: not COCO JSON, a box that is not ``[x, y, w, h]`` with ``w, h > 0``, or an
            annotation naming an unknown image or category (the message names the file and the entry).
    """
    p = Path(json_path)
    if not p.is_file():
        raise FileNotFoundError(f"--coco: COCO JSON not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{p}: not JSON ({err})") from err
    cats = _need(doc, "categories", str(p))
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{p}: expected a non-empty list of categories")
    cat_ids = sorted(int(_need(c, "id", f"{p}: category")) for c in cats)
    names_by_id = {int(c["id"]): str(_need(c, "name", f"{p}: category {c['id']}")) for c in cats}
    label_of = {cid: k + 1 for k, cid in enumerate(cat_ids)}
    files = {
        int(_need(im, "id", f"{p}: image")): str(_need(im, "file_name", f"{p}: image"))
        for im in _need(doc, "images", str(p))
    }
    boxes: dict[int, list[list[float]]] = {i: [] for i in files}
    labels: dict[int, list[int]] = {i: [] for i in files}
    for n, ann in enumerate(_need(doc, "annotations", str(p))):
        where = f"{p}: annotation {n}"
        image_id, cat = int(_need(ann, "image_id", where)), int(_need(ann, "category_id", where))
        if image_id not in files:
            raise ValueError(f"{where}: image_id {image_id} is not in `images`")
        if cat not in label_of:
            raise ValueError(f"{where}: category_id {cat} is not in `categories` ({cat_ids})")
        bbox = _need(ann, "bbox", where)
        ok = isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
        if not ok or not all(math.isfinite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
            raise ValueError(f"{where}: expected `bbox` [x, y, width, height] with width, height > 0, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        boxes[image_id].append([x, y, x + w, y + h])
        labels[image_id].append(label_of[cat])
    root = Path(images_dir)
    out = []
    for image_id, name in files.items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{p}: image {image_id} not found: {path}")
        out.append(
            CocoImage(
                path,
                torch.tensor(boxes[image_id], dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels[image_id], dtype=torch.int64),
            )
        )
    return out, [names_by_id[c] for c in cat_ids]


def build_detector(num_categories: int, backbone: str = "resnet50", image_size: int = 512) -> nn.Module:
    """Faster R-CNN with a randomly initialised ResNet-FPN backbone; images resized to ``image_size``.

    Args:
        num_categories: lesion categories (the background class is added).
        backbone: one of :data:`BACKBONES`.
        image_size: the shorter side images are resized to (and the longest side's limit).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    if backbone not in BACKBONES:
        raise ValueError(f"Expected `backbone` in {BACKBONES}, but got {backbone!r}")
    if num_categories < 1:
        raise ValueError(f"Expected `num_categories` >= 1, but got {num_categories}")
    trunk = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5)
    return FasterRCNN(trunk, num_classes=num_categories + 1, min_size=image_size, max_size=image_size)


def train_detector(
    model: nn.Module, images: Sequence[CocoImage], steps: int, batch_size: int = 2, lr: float = 0.01, seed: int = 0
) -> list[float]:
    """SGD (momentum 0.9, weight decay 1e-4) on random batches for ``steps`` steps; returns the losses."""
    from examples.common.images import load_image

    g = torch.Generator().manual_seed(seed)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(images), (batch_size,), generator=g).tolist()
        batch = [images[i] for i in pick]
        inputs = [load_image(im.path, "RGB") for im in batch]
        targets = [{"boxes": im.boxes, "labels": im.labels} for im in batch]
        loss = sum(model(inputs, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def save_detector(path: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """Weights and configuration, as tensors and plain types (loads with ``weights_only=True``)."""
    from examples.common.checkpoint import write_durably

    state = {"format": FORMAT, "version": VERSION, "config": config, "model": model.state_dict()}
    write_durably(path, lambda f: torch.save(state, f))


def load_detector(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A detector written by ``train`` (weights-only read).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not such a detector file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"detector file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or unsafe file
        raise ValueError(f"cannot read detector {p} weights-only ({type(err).__name__})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(f"{p} is not a detector of examples.common.detector (format {FORMAT!r}, version {VERSION})")
    cfg = state["config"]
    model = build_detector(len(cfg["categories"]), cfg["backbone"], cfg["image_size"])
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def load_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a torchvision ResNet ``state_dict`` file (e.g. ImageNet weights saved beforehand) into the backbone.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or weights that do not fit the backbone.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--weights: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or unsafe file
        raise ValueError(f"--weights: cannot read {p} weights-only ({type(err).__name__})") from err
    if not isinstance(state, dict):
        raise ValueError(f"--weights: {p} holds a {type(state).__name__}, expected a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items() if not k.startswith("fc.")}
    try:
        model.get_submodule("backbone.body").load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"--weights: {p} does not fit the {type(model).__name__} backbone: {err}") from err


def _train(args: argparse.Namespace) -> int:
    images, names = read_coco(args.coco, args.images)
    if args.steps < 1:
        raise ValueError(f"--steps: expected an int >= 1, got {args.steps}")
    if not args.out.parent.is_dir():
        raise ValueError(f"--out: directory {str(args.out.parent)!r} does not exist")
    torch.manual_seed(args.seed)
    model = build_detector(len(names), args.backbone, args.image_size)
    if args.weights is not None:
        load_backbone_weights(model, args.weights)
    losses = train_detector(model, images, args.steps, args.batch_size, args.lr, args.seed)
    config = {"categories": names, "backbone": args.backbone, "image_size": args.image_size, "steps": args.steps}
    save_detector(args.out, model, config)
    print(f"trained {args.steps} steps on {len(images)} images ({', '.join(names)}): last loss {losses[-1]:.3f}")
    print(f"wrote {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from examples.common.boxes import SplitBoxes, write_boxes_json
    from examples.common.images import load_image
    from examples.common.predict import collect_images

    if not 0 <= args.score_threshold < 1:
        raise ValueError(f"--score-threshold: expected a number in [0, 1), got {args.score_threshold}")
    if args.max_boxes < 1:
        raise ValueError(f"--max-boxes: expected an int >= 1, got {args.max_boxes}")
    if not args.out.parent.is_dir():
        raise ValueError(f"--out: directory {str(args.out.parent)!r} does not exist")
    files = collect_images(args.images)
    model, cfg = load_detector(args.detector)
    split = SplitBoxes()
    with torch.no_grad():
        for path in tqdm(files, desc="detecting", dynamic_ncols=True):
            found = model([load_image(path, "RGB")])[0]  # boxes sorted by decreasing score
            keep = (found["scores"] >= args.score_threshold).nonzero()[:, 0][: args.max_boxes]
            if len(keep):
                split.unhealthy[path.name] = [tuple(b) for b in found["boxes"][keep].tolist()]
                split.scores[path.name] = found["scores"][keep].tolist()
                split.labels[path.name] = [cfg["categories"][int(k) - 1] for k in found["labels"][keep]]
    write_boxes_json({args.split: split}, args.out)
    print(f"{len(files)} images, {len(split.unhealthy)} with detections above {args.score_threshold}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (``train`` / ``predict``); exit status 2 with a one-line message on bad input."""
    parser = argparse.ArgumentParser(prog="python -m examples.common.detector", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train Faster R-CNN on COCO JSON boxes")
    t.add_argument("--coco", type=Path, required=True, help="COCO object-detection JSON")
    t.add_argument("--images", type=Path, required=True, help="folder of the JSON's file_name entries")
    t.add_argument("--out", type=Path, required=True, help="detector file to write")
    t.add_argument("--backbone", choices=BACKBONES, default="resnet50")
    t.add_argument("--weights", type=Path, default=None, help="local ResNet state_dict for the backbone")
    t.add_argument("--image-size", type=int, default=512, help="images resized to this (shorter side)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("predict", help="detect lesions in a folder of images; write the box JSON")
    q.add_argument("detector", type=Path, help="file written by train")
    q.add_argument("images", type=Path, help="an image, a folder of images or a CSV of paths")
    q.add_argument("--out", type=Path, required=True, help="box JSON to write")
    q.add_argument("--split", default="train", help="split name in the JSON (default: train)")
    q.add_argument("--score-threshold", type=float, default=0.5)
    q.add_argument("--max-boxes", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _predict(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
