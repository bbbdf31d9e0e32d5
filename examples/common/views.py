"""Four-view records both pipelines use: lesion-box capping, the epoch-aware four-view dataset, records
over a rendered synthetic set and over real image files.

The synthetic sets themselves are rendered and cached by :mod:`examples.common.synthetic_cache`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor

from examples.common.boxes import Box
from examples.common.images import load_image
from mlcl_losses.degrade import mix_seed
from mlcl_losses.views import FourViewDataset, FourViewRecord

__all__ = [
    "CachedImages",
    "EpochFourViewDataset",
    "RealViewItem",
    "RealViewRecords",
    "RecordSequence",
    "SyntheticViewRecords",
    "cap_boxes",
]


def cap_boxes(boxes: Tensor, max_lesions: int, seed: int, epoch: int, index: int) -> Tensor:
    """At most ``max_lesions`` of ``boxes (K, 4)``, a random subset drawn per ``(seed, epoch, index)``."""
    if boxes.shape[0] <= max_lesions:
        return boxes
    g = torch.Generator().manual_seed(mix_seed(seed, 31, epoch, index))
    keep = torch.randperm(boxes.shape[0], generator=g)[:max_lesions].sort().values
    return boxes[keep]


class EpochFourViewDataset(FourViewDataset):
    """A :class:`FourViewDataset` whose records also see the epoch (lesion subsets, degraded copies)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.records, "epoch"):
            self.records.epoch = epoch


def _same(image: Tensor) -> Tensor:
    return image


class CachedImages:
    """``i -> to_rgb(images[i] / 255)``: float images in [0, 1] of uint8 ``images (N, C, S, S)``."""

    def __init__(self, images: Tensor, to_rgb: Callable[[Tensor], Tensor] = _same) -> None:
        self.images, self.to_rgb = images, to_rgb

    def __call__(self, i: int) -> Tensor:
        return self.to_rgb(self.images[i].float() / 255.0)


class RecordSequence(Sequence[FourViewRecord]):
    """Four-view records made on access by :meth:`record`: an int index as a list's, a slice gives a list.

    A negative index names the same record as its positive counterpart (the same ``image_id`` and
    box subset); an index outside ``[-len, len)`` raises :class:`IndexError`.
    """

    @abstractmethod
    def record(self, i: int) -> FourViewRecord:
        """Record ``i``, ``0 <= i < len(self)``."""

    @overload
    def __getitem__(self, i: int) -> FourViewRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[FourViewRecord]: ...

    def __getitem__(self, i: int | slice) -> FourViewRecord | list[FourViewRecord]:
        n = len(self)
        if isinstance(i, slice):
            return [self.record(j) for j in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError(f"record index {i} out of range for {n} records")
        return self.record(i % n)


class SyntheticViewRecords(RecordSequence):
    """Four-view records over a rendered synthetic set; epoch-dependent lesion subset and degraded copy.

    Args:
        data: output of :func:`~examples.common.synthetic_cache.render_synthetic` with ``clean``,
            ``boxes``, ``view_degraded``, ``quality`` and ``label_key``.
        max_lesions: boxes kept per image and epoch (:func:`cap_boxes`).
        seed: base of the box subsets.
        label_key: key of the targets in ``data``.
        label: target -> the int label of pre-training (e.g. ``int``).
        to_rgb: float image -> the 3-channel image of the encoder.
    """

    def __init__(
        self,
        data: dict[str, Any],
        max_lesions: int,
        seed: int,
        label_key: str,
        label: Callable[[Any], int] = int,
        to_rgb: Callable[[Tensor], Tensor] = _same,
    ) -> None:
        self.data, self.max_lesions, self.seed, self.epoch = data, max_lesions, seed, 0
        self.label_key, self.label, self.to_rgb = label_key, label, to_rgb

    def __len__(self) -> int:
        return int(self.data["clean"].shape[0])

    def record(self, i: int) -> FourViewRecord:
        """Record ``i`` (made now: its image, this epoch's boxes and degraded copy)."""
        copies = self.data["view_degraded"]
        return FourViewRecord(
            image=self.to_rgb(self.data["clean"][i].float() / 255.0),
            boxes=cap_boxes(self.data["boxes"][i], self.max_lesions, self.seed, self.epoch, i),
            degraded=self.to_rgb(copies[self.epoch % copies.shape[0], i].float() / 255.0),
            label=self.label(self.data[self.label_key][i]),
            quality=int(self.data["quality"][i]),
            image_id=i,
        )


class RealViewItem(NamedTuple):
    """One real training image of pre-training: its file, boxes in its pixels, labels.

    Attributes:
        path: the image file.
        lesions: lesion boxes ``(x1, y1, x2, y2)`` in the file's pixels.
        healthy: healthy regions alike, or ``None`` (random healthy patches).
        label: the int label of pre-training (read by SupCon).
        quality: the image-quality label (EyeQ: 0 Good, 1 Usable, 2 Reject), or ``None``.
    """

    path: Path
    lesions: list[Box]
    healthy: list[Box] | None
    label: int
    quality: int | None = None


class RealViewRecords(RecordSequence):
    """Four-view records over real images: resized to ``size`` on access, boxes scaled alike.

    Args:
        items: the images (:class:`RealViewItem`).
        size: the side the images are resized to (square).
        max_lesions: boxes kept per image and epoch (:func:`cap_boxes`).
        seed: base of the box subsets.
        mode: how the files are read (:func:`~examples.common.images.load_image`): ``"RGB"`` or ``"L"``.
        to_rgb: image as read -> the 3-channel image of the encoder.
    """

    def __init__(
        self,
        items: Sequence[RealViewItem],
        size: int,
        max_lesions: int,
        seed: int,
        mode: Literal["RGB", "L"] = "RGB",
        to_rgb: Callable[[Tensor], Tensor] = _same,
    ) -> None:
        self.items, self.size, self.max_lesions, self.seed, self.epoch = list(items), size, max_lesions, seed, 0
        self.mode, self.to_rgb = mode, to_rgb

    def __len__(self) -> int:
        return len(self.items)

    def record(self, i: int) -> FourViewRecord:
        """Record ``i`` (read now: the file resized, its boxes scaled and capped for this epoch)."""
        from PIL import Image

        item = self.items[i]
        with Image.open(item.path) as img:
            w, h = img.size
        scale = torch.tensor([self.size / w, self.size / h, self.size / w, self.size / h])
        boxes = torch.tensor(item.lesions, dtype=torch.float32).reshape(-1, 4) * scale
        hb = None if not item.healthy else torch.tensor(item.healthy, dtype=torch.float32).reshape(-1, 4) * scale
        return FourViewRecord(
            image=self.to_rgb(load_image(item.path, self.mode, self.size)),
            boxes=cap_boxes(boxes, self.max_lesions, self.seed, self.epoch, i),
            healthy_boxes=hb,
            label=item.label,
            quality=item.quality,
            image_id=i,
        )
