"""How well proposed boxes find known lesions: recall and precision at an IoU, and two baselines.

* recall of a lesion kind at IoU ``t``: the fraction of true boxes of that kind that some proposed
  box of the same image (of the same kind, where proposals name one) overlaps with IoU >= ``t``;
* precision at IoU ``t``: the fraction of proposed boxes that overlap some true box of their image
  (of their kind, where they name one) with IoU >= ``t``;
* centre hit: the fraction of true boxes whose centre lies inside some proposed box (a looser
  measure for lesions much smaller than a map cell).

Baselines with the proposals' own box budget: :func:`random_like` (boxes of the same sizes at
uniformly random places in the image) and :func:`grid_boxes` (a fixed grid of square cells).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ImageBoxes", "grid_boxes", "match_quality", "quality_table", "random_like"]


@dataclass(frozen=True)
class ImageBoxes:
    """The true lesions and the proposals of one image.

    Attributes:
        true: ``(K, 4)`` float true boxes ``x1, y1, x2, y2``.
        kinds: ``(K,)`` int64 lesion kind of each true box.
        proposed: ``(P, 4)`` float proposed boxes.
        proposed_kinds: ``(P,)`` int64 kind each proposal claims (e.g. the label whose map gave it);
            a true box then matches only proposals of its own kind. ``None``: any proposal.
    """

    true: Tensor
    kinds: Tensor
    proposed: Tensor
    proposed_kinds: Tensor | None = None


def match_quality(
    images: Sequence[ImageBoxes], kind_names: Sequence[str], iou_thresholds: Sequence[float] = (0.3, 0.5)
) -> dict[str, object]:
    """Recall per lesion kind, precision and centre hits over ``images``.

    Returns:
        ``{"n_images", "n_proposed", "boxes_per_image", "precision": {"0.3": p, ...},
        "recall": {"0.3": {kind: r or None, ..., "all": r}, ...}, "centre_hit": {kind: h, ..., "all": h},
        "n_true": {kind: count, ...}}``; a kind with no true box has ``None``.
    """
    from torchvision.ops import box_iou

    n_kinds = len(kind_names)
    n_true = torch.zeros(n_kinds)
    found = {t: torch.zeros(n_kinds) for t in iou_thresholds}
    precise = dict.fromkeys(iou_thresholds, 0.0)
    centre = torch.zeros(n_kinds)
    n_proposed = 0
    for im in images:
        n_true += torch.bincount(im.kinds, minlength=n_kinds).float()
        n_proposed += len(im.proposed)
        if len(im.true) == 0 or len(im.proposed) == 0:
            continue
        iou = box_iou(im.true.float(), im.proposed.float())  # (K, P)
        same = torch.ones_like(iou, dtype=torch.bool)
        if im.proposed_kinds is not None:  # a proposal counts only for true boxes of its own kind
            same = im.kinds[:, None] == im.proposed_kinds[None, :]
            iou = iou * same
        for t in iou_thresholds:
            hit = (iou >= t).any(1).float()
            found[t] += torch.bincount(im.kinds, weights=hit, minlength=n_kinds)
            precise[t] += float((iou >= t).any(0).sum())
        cx, cy = (im.true[:, 0] + im.true[:, 2]) / 2, (im.true[:, 1] + im.true[:, 3]) / 2
        p = im.proposed
        inside = (
            (cx[:, None] >= p[:, 0]) & (cx[:, None] <= p[:, 2]) & (cy[:, None] >= p[:, 1]) & (cy[:, None] <= p[:, 3])
        )
        centre += torch.bincount(im.kinds, weights=(inside & same).any(1).float(), minlength=n_kinds)

    def per_kind(hits: Tensor) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            name: (float(hits[k] / n_true[k]) if n_true[k] > 0 else None) for k, name in enumerate(kind_names)
        }
        out["all"] = float(hits.sum() / n_true.sum()) if n_true.sum() > 0 else None
        return out

    return {
        "n_images": len(images),
        "n_proposed": n_proposed,
        "boxes_per_image": n_proposed / max(1, len(images)),
        "n_true": {name: int(n_true[k]) for k, name in enumerate(kind_names)},
        "precision": {f"{t:g}": (precise[t] / n_proposed if n_proposed else None) for t in iou_thresholds},
        "recall": {f"{t:g}": per_kind(found[t]) for t in iou_thresholds},
        "centre_hit": per_kind(centre),
    }


def random_like(boxes: Tensor, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Boxes of the sizes of ``boxes (P, 4)`` at uniformly random places inside an image of ``size (H, W)``."""
    h, w = size
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(max=w)
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(max=h)
    x1 = torch.rand(len(boxes), generator=generator) * (w - bw)
    y1 = torch.rand(len(boxes), generator=generator) * (h - bh)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)


def grid_boxes(size: tuple[int, int], cell: float) -> Tensor:
    """Square cells of side ``cell`` tiling an image of ``size (H, W)`` (the last row/column clipped)."""
    if cell <= 0:
        raise ValueError(f"Expected `cell` > 0, but got {cell!r}")
    h, w = size
    xs = torch.arange(0, w, cell, dtype=torch.float32)
    ys = torch.arange(0, h, cell, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    x1, y1 = gx.flatten(), gy.flatten()
    return torch.stack([x1, y1, (x1 + cell).clamp(max=w), (y1 + cell).clamp(max=h)], 1)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def quality_table(
    results: list[dict[str, Any]],
    classes: Sequence[str],
    setting: Callable[[dict[str, Any]], str],
    ious: Sequence[float] = (0.3, 0.5),
) -> str:
    """Markdown, one table per IoU: recall per class, precision, boxes per image; CAM vs the baselines.

    Args:
        results: one dict per CAM setting, each with ``"cam"``, ``"random"`` and ``"grid"`` entries as the
            proposal-quality scripts write them (``recall[iou][class]``, ``precision[iou]``,
            ``boxes_per_image``, ``n_true[class]``).
        classes: the lesion kinds or labels, in table order; those with no true box are left out.
        setting: the name of a result's CAM setting (its first column).
        ious: the IoU thresholds, one table each.
    """
    counts = results[0]["cam"]["n_true"]
    shown = [k for k in classes if counts[k] > 0]
    parts = []
    for t in ious:
        head = ["setting", "boxes", "boxes/img", *(f"R {k} ({counts[k]})" for k in shown), "R all", "precision"]
        lines = [f"IoU >= {t:g}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in results:
            for method in ("cam", "random", "grid"):
                q = r[method]
                rec = q["recall"][f"{t:g}"]
                name = setting(r) if method == "cam" else ""
                row = [name, method, f"{q['boxes_per_image']:.1f}", *(_fmt(rec[k]) for k in (*shown, "all"))]
                lines.append("| " + " | ".join([*row, _fmt(q["precision"][f"{t:g}"])]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
