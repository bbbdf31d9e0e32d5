"""Lesion box proposals from class activation maps of a grading model.

The map is Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391) computed with
captum's :class:`~captum.attr.LayerGradCam` at a chosen ResNet stage of the pipeline's own
cross-entropy / BCE classifier. Captum (maintained by the PyTorch team) rather than ``grad-cam``:
it needs nothing the examples do not already install (torch, numpy, matplotlib, tqdm), while
``grad-cam`` pulls in OpenCV, scikit-learn and ttach; both take a module and a target index.

The target is the disease, not the prediction:

* EyeQ: the "any DR" evidence, the log-odds of grades >= 1 against grade 0
  (``logsumexp(logits[1:]) - logits[0]``), computed for images whose label is >= 1 only;
* ChestX-ray14: each positive label's own logit.

A map is normalised by its peak, thresholded at one or more fractions of it; each connected region
(:func:`skimage.measure.label`) gives a box scored by its peak fraction times the model's probability
of the target. Boxes are scaled to pixels of the original image, clipped to it, grown to a minimum
side, dropped above a maximum side, and reduced by non-maximum suppression
(:func:`torchvision.ops.nms`).

Resolution: a ResNet's last stage (stride 32) is 3 x 3 at the pipelines' 96 px, coarser than any
lesion. Maps are therefore computed at an earlier stage (``layer1``: stride 4, the default;
``layer2``: stride 8; ``layer3``: stride 16) and on the image resized to ``cam_size`` (the network is
fully convolutional up to its global pool), so a lesion spans several cells. On the synthetic fundus
data ``layer1`` at twice the input size was the best of the settings measured, and still poor: it
finds bright lesions (exudates, cotton-wool spots) and almost never red ones (microaneurysms,
haemorrhages); see examples/eyeq/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from examples.common.models import Classifier

__all__ = [
    "LAYERS",
    "AnyDiseaseLogit",
    "CamSettings",
    "Proposals",
    "boxes_from_map",
    "disease_maps",
    "grad_cam",
    "propose_batch",
    "resize_batch",
]

#: ResNet stages a map may come from, with their stride.
LAYERS = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


@dataclass(frozen=True)
class CamSettings:
    """How maps become boxes.

    Attributes:
        layer: the encoder's module whose output the map is computed on: a ResNet stage
            (:data:`LAYERS`), or the dotted name of a module of a timm encoder (e.g. ``stages.2``).
        cam_size: side the image is resized to before the model (``None``: the model's input size).
        thresholds: fractions of a map's peak; each gives the regions above it.
        min_size: boxes smaller than this (pixels of the original image, per side) are grown to it
            around their centre.
        max_size: boxes with a side above this (pixels of the original image) are dropped.
        nms_iou: IoU above which the lower-scored of two boxes is suppressed.
        max_boxes: boxes kept per map (the highest scored).
    """

    layer: str = "layer1"
    cam_size: int | None = None
    thresholds: tuple[float, ...] = (0.5,)
    min_size: float = 8.0
    max_size: float = 1e9
    nms_iou: float = 0.3
    max_boxes: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"Expected `layer` to be a module name such as {tuple(LAYERS)}, but got {self.layer!r}")
        if self.cam_size is not None and (isinstance(self.cam_size, bool) or self.cam_size < 16):
            raise ValueError(f"Expected `cam_size` to be None or an int >= 16, but got {self.cam_size!r}")
        if not self.thresholds or not all(0 < t < 1 for t in self.thresholds):
            raise ValueError(f"Expected `thresholds` to be fractions in (0, 1), but got {self.thresholds!r}")
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(f"Expected 0 <= `min_size` <= `max_size`, but got {self.min_size!r} and {self.max_size!r}")
        if not 0 < self.nms_iou <= 1:
            raise ValueError(f"Expected `nms_iou` in (0, 1], but got {self.nms_iou!r}")
        if self.max_boxes < 1:
            raise ValueError(f"Expected `max_boxes` >= 1, but got {self.max_boxes!r}")


class AnyDiseaseLogit(nn.Module):
    """``(B, C)`` grade logits -> ``(B, 1)`` log-odds of any grade >= 1 against grade 0."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, 1)``."""
        logits = self.classifier(x)
        return (torch.logsumexp(logits[:, 1:], 1) - logits[:, 0])[:, None]


def grad_cam(model: nn.Module, layer: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-CAM maps of ``targets`` at ``layer``, upsampled to the input size.

    Args:
        model: ``(B, 3, H, W) -> (B, T)`` logits, in eval mode.
        layer: a module inside ``model`` whose output is ``(B, K, h, w)``.
        images: ``(B, 3, H, W)`` float.
        targets: ``(B,)`` int64 output index of each image.

    Returns:
        ``(maps (B, H, W) float >= 0, logits (B,) of the targets)``.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    if images.dim() != 4 or targets.shape != (images.shape[0],):
        raise ValueError(
            f"Expected `images` (B, 3, H, W) and `targets` (B,), got {tuple(images.shape)} and {tuple(targets.shape)}"
        )
    cam = LayerGradCam(model, layer)
    with torch.enable_grad():
        attr = cam.attribute(images, target=targets.tolist(), relu_attributions=True)  # (B, 1, h, w)
    maps = LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    with torch.no_grad():
        logits = model(images).gather(1, targets[:, None])[:, 0]
    return maps.detach().clamp_min(0), logits


def _grow(box: Tensor, min_size: float, width: float, height: float) -> Tensor:
    """Grow each side of ``box (K, 4)`` to at least ``min_size`` around its centre, inside the image."""
    out = box.clone()
    for lo, hi, extent in ((0, 2, width), (1, 3, height)):
        side = (out[:, hi] - out[:, lo]).clamp_min(min(min_size, extent))
        centre = (out[:, hi] + out[:, lo]) / 2
        start = (centre - side / 2).clamp(0, None)
        start = torch.minimum(start, extent - side)
        out[:, lo], out[:, hi] = start, start + side
    return out


def boxes_from_map(
    cam: Tensor, original_size: tuple[int, int], settings: CamSettings, confidence: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Scored boxes from one map.

    Args:
        cam: ``(h, w)`` float map >= 0 over the whole image (any resolution).
        original_size: ``(H, W)`` of the original image; boxes are in its pixels.
        settings: thresholds, size limits and NMS.
        confidence: multiplies every score (e.g. the model's probability of the target).

    Returns:
        ``(boxes (K, 4) float32 x1, y1, x2, y2, scores (K,) float32)``, sorted by decreasing score,
        inside the image, after NMS; ``K = 0`` for an all-zero map.
    """
    from skimage.measure import label, regionprops
    from torchvision.ops import nms

    if cam.dim() != 2:
        raise ValueError(f"Expected `cam` of shape (h, w), got {tuple(cam.shape)}")
    if not bool(torch.isfinite(cam).all()):
        raise ValueError("Expected `cam` to be finite, got NaN or inf values")
    height, width = original_size
    empty = torch.zeros(0, 4), torch.zeros(0)
    peak = float(cam.max())
    if peak <= 0:
        return empty
    norm = (cam / peak).float()
    sy, sx = height / cam.shape[0], width / cam.shape[1]
    boxes, scores = [], []
    for t in settings.thresholds:
        mask = (norm >= t).numpy()
        for region in regionprops(label(mask, connectivity=2)):
            r0, c0, r1, c1 = region.bbox  # rows/cols, end exclusive
            boxes.append([c0 * sx, r0 * sy, c1 * sx, r1 * sy])
            rows, cols = region.coords[:, 0], region.coords[:, 1]
            scores.append(float(norm[rows, cols].max()) * confidence)
    if not boxes:
        return empty
    b = torch.tensor(boxes, dtype=torch.float32)
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    b = _grow(b, settings.min_size, float(width), float(height))
    s = torch.tensor(scores, dtype=torch.float32)
    keep = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) <= settings.max_size
    b, s = b[keep], s[keep]
    keep = nms(b, s, settings.nms_iou)[: settings.max_boxes]  # sorted by decreasing score
    return b[keep], s[keep]


def resize_batch(images: Tensor, size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, size, size)`` (bilinear, antialiased), values kept in [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def disease_maps(
    classifier: Classifier,
    images: Tensor,
    targets: Sequence[int],
    settings: CamSettings,
    any_disease: bool,
) -> tuple[Tensor, Tensor]:
    """Maps and target probabilities for a batch.

    Args:
        classifier: the :class:`~examples.common.models.Classifier` (eval mode).
        images: ``(B, 3, S, S)`` float in [0, 1], already at ``settings.cam_size``.
        targets: output index per image (ignored with ``any_disease``).
        settings: the stage of the map.
        any_disease: the EyeQ target (any grade >= 1 against grade 0) instead of one output.

    Returns:
        ``(maps (B, S, S), probabilities (B,))``: the sigmoid of the target logit.
    """
    try:
        layer = classifier.encoder.get_submodule(settings.layer)
    except AttributeError:
        names = [name for name, _ in classifier.encoder.named_children()]
        raise ValueError(
            f"Expected `layer` to name a module of the encoder (e.g. one of {names}), but got {settings.layer!r}"
        ) from None
    model = AnyDiseaseLogit(classifier) if any_disease else classifier
    index = torch.zeros(images.shape[0], dtype=torch.long) if any_disease else torch.as_tensor(list(targets))
    maps, logits = grad_cam(model, layer, images, index)
    return maps, torch.sigmoid(logits)


@dataclass
class Proposals:
    """Scored boxes of one image, sorted by decreasing score.

    Attributes:
        boxes: ``(K, 4)`` float32 ``x1, y1, x2, y2`` in pixels of the original image.
        scores: ``(K,)`` float32.
        targets: ``(K,)`` int64 output index each box is evidence of (EyeQ: 1, "any DR").
    """

    boxes: Tensor
    scores: Tensor
    targets: Tensor


def propose_batch(
    classifier: Classifier,
    images: Tensor,
    targets: Sequence[Sequence[int]],
    original_sizes: Sequence[tuple[int, int]],
    settings: CamSettings,
    any_disease: bool,
) -> list[Proposals]:
    """Box proposals for a batch of images, one map per (image, target).

    Args:
        classifier: the grading :class:`~examples.common.models.Classifier` (eval mode).
        images: ``(B, 3, S, S)`` float in [0, 1] at ``settings.cam_size``.
        targets: per image, the outputs to explain (EyeQ with ``any_disease``: ``[1]`` for an image
            graded >= 1, ``[]`` for grade 0; ChestX-ray14: the indices of its positive labels).
            An image with no target gets no box.
        original_sizes: ``(H, W)`` of each original image.
        settings: map stage, thresholds, size limits, NMS.
        any_disease: EyeQ's "any DR" target instead of the listed outputs.

    Returns:
        One :class:`Proposals` per image.
    """
    if not (len(targets) == len(original_sizes) == images.shape[0]):
        raise ValueError(
            f"`images`, `targets` and `original_sizes` must have the same length, got "
            f"{images.shape[0]}, {len(targets)} and {len(original_sizes)}"
        )
    pairs = [(i, t) for i, ts in enumerate(targets) for t in ts]
    out = [Proposals(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)) for _ in targets]
    if not pairs:
        return out
    rows = torch.tensor([i for i, _ in pairs])
    maps, probs = disease_maps(classifier, images[rows], [t for _, t in pairs], settings, any_disease)
    found: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for (i, t), cam, p in zip(pairs, maps, probs.tolist(), strict=True):
        boxes, scores = boxes_from_map(cam, original_sizes[i], settings, p)
        found.setdefault(i, []).append((boxes, scores, torch.full((len(boxes),), t, dtype=torch.long)))
    for i, parts in found.items():
        boxes, scores, labels = (torch.cat(col) for col in zip(*parts, strict=True))
        order = scores.argsort(descending=True, stable=True)
        out[i] = Proposals(boxes[order], scores[order], labels[order])
    return out
