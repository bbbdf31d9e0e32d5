"""Records, the four-view dataset and its collate function.

:class:`FourViewDataset` cuts the views of record ``i`` with a generator seeded from
``(base_seed, epoch, i)``, so a batch is the same whatever the number of DataLoader workers;
:func:`collate_four_views` concatenates items with unique source ids.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mlcl_losses._seeding import mix_seed
from mlcl_losses.tags import MAX_SOURCE, ViewTags
from mlcl_losses.views._image_file import read_image_file
from mlcl_losses.views.sampler import FourViews, FourViewSampler

__all__ = ["FourViewDataset", "FourViewRecord", "collate_four_views"]

ImageSource = Tensor | Callable[[], Tensor] | str | os.PathLike


def _load(source: Any, name: str) -> Tensor:
    """Resolve an image source: a tensor, a callable returning one, or an image file path."""
    if isinstance(source, Tensor):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source, name)
    if callable(source):
        out = source()
        if not isinstance(out, Tensor):
            raise TypeError(f"Expected the `{name}` loader to return a torch.Tensor, but got {type(out).__name__}")
        return out
    raise TypeError(f"Expected `{name}` to be a tensor, a callable or a file path, but got {type(source).__name__}")


@dataclass(frozen=True)
class FourViewRecord:
    """One image for :class:`FourViewDataset`.

    Attributes:
        image: the high-quality image ``(C, H, W)`` float in [0, 1]: a tensor, a loader
            callable returning one, or an image file path (read with pillow: 8-bit scaled by
            1/255, 16-bit grayscale by 1/65535, float images must lie in [0, 1]; other files are
            a ``ValueError`` naming the file when the item is read).
        boxes: ``(K, 4)`` lesion boxes ``x1, y1, x2, y2`` in pixels.
        healthy_boxes: optional ``(M, 4)`` healthy regions (random patches when ``None``).
        degraded: optional degraded copy (same forms as ``image``); when ``None`` the
            dataset's ``degradation`` makes it.
        label: optional disease label (e.g. DR grade) for the ``label`` tag.
        quality: optional image-quality label (EyeQ: 0 Good, 1 Usable, 2 Reject), kept as
            metadata (the views' ``quality`` tag is HIGH/LOW by construction).
        image_id: optional image id for the ``image`` tag (default: the record's index).
    """

    image: ImageSource
    boxes: Any
    healthy_boxes: Any = None
    degraded: ImageSource | None = None
    label: int | None = None
    quality: int | None = None
    image_id: int | None = None


class FourViewDataset(Dataset[FourViews]):
    """Dataset of the four views of each record; use with :func:`collate_four_views`.

    Item ``i`` of epoch ``e`` is drawn with a generator seeded from ``(base_seed, e, i)``, so it
    is the same whatever the number of DataLoader workers. Call :meth:`set_epoch` before
    iterating each epoch (and before the DataLoader starts its workers).

    Args:
        records: a sequence (possibly lazy) of :class:`FourViewRecord`.
        sampler: the view sampler.
        degradation: callable ``(image, generator=...) -> image`` used for records without a
            ``degraded`` copy.
        base_seed: base of the per-item seeds.
        sources_per_image: source ids reserved per record: record ``i`` owns
            ``[i * sources_per_image, (i + 1) * sources_per_image)``, so ids are unique across the
            dataset (a record giving more lesion + healthy patches raises).

    Examples:
        >>> from mlcl_losses.degrade import FundusDegradation
        >>> recs = [FourViewRecord(image=torch.rand(3, 48, 48), boxes=[[5, 5, 12, 12]], label=2)]
        >>> data = FourViewDataset(recs, FourViewSampler(patch_size=16), FundusDegradation(0.5))
        >>> views, tags = collate_four_views([data[0], data[0]])
        >>> views.shape, tags.source.tolist()
        (torch.Size([14, 3, 16, 16]), [0, 0, 0, 1, 2, 1, 2, 3, 3, 3, 4, 5, 4, 5])
    """

    def __init__(
        self,
        records: Sequence[FourViewRecord],
        sampler: FourViewSampler,
        degradation: Callable[..., Tensor] | None = None,
        base_seed: int = 0,
        sources_per_image: int = 64,
    ) -> None:
        if isinstance(sources_per_image, bool) or not isinstance(sources_per_image, int) or sources_per_image < 1:
            raise ValueError(f"Expected `sources_per_image` to be an int >= 1, but got {sources_per_image!r}")
        if len(records) * sources_per_image - 1 > MAX_SOURCE:
            raise ValueError(
                f"{len(records)} records x `sources_per_image`={sources_per_image} exceed the source id range "
                f"[0, {MAX_SOURCE}]; lower `sources_per_image`"
            )
        self.sources_per_image = sources_per_image
        if not isinstance(sampler, FourViewSampler):
            raise TypeError(f"Expected `sampler` to be a FourViewSampler, but got {type(sampler).__name__}")
        if degradation is not None and not callable(degradation):
            raise TypeError(f"Expected `degradation` to be callable or None, but got {degradation!r}")
        if isinstance(base_seed, bool) or not isinstance(base_seed, int):
            raise TypeError(f"Expected `base_seed` to be an int, but got {base_seed!r}")
        self.records = records
        self.sampler = sampler
        self.degradation = degradation
        self.base_seed = base_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that enters the per-item seeds."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Expected `epoch` to be an int >= 0, but got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def __getitem__(self, index: int) -> FourViews:
        """Views of record ``index`` (negative indices count from the end, as for a list).

        Raises:
            TypeError: ``index`` not an int.
            IndexError: ``index`` outside ``[-len(self), len(self))``.
        """
        try:
            if isinstance(index, bool):
                raise TypeError
            index = operator.index(index)  # an int, a numpy integer or a 0-dim integer tensor
        except TypeError:
            raise TypeError(f"Expected `index` to be an int, but got {type(index).__name__} {index!r}") from None
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"Expected `index` in [{-n}, {n}) ({n} records), but got {index}")
        index %= n  # a negative index names the same record (and the same seed and source ids) as its positive
        record = self.records[index]
        if not isinstance(record, FourViewRecord):
            raise TypeError(f"Expected records to be FourViewRecord, but record {index} is {type(record).__name__}")
        g = torch.Generator().manual_seed(mix_seed(self.base_seed, self.epoch, index))
        image = _load(record.image, "image")
        degraded = None if record.degraded is None else _load(record.degraded, "degraded")
        if degraded is None and self.degradation is None:
            raise ValueError(f"Record {index} has no `degraded` image and the dataset has no `degradation`")
        out = self.sampler(
            image,
            record.boxes,
            degraded=degraded,
            degradation=None if degraded is not None else self.degradation,
            healthy_boxes=record.healthy_boxes,
            label=record.label,
            image_id=index if record.image_id is None else record.image_id,
            source_offset=index * self.sources_per_image,
            generator=g,
        )
        n_sources = int(out.tags.source.unique().numel())
        if n_sources > self.sources_per_image:
            raise ValueError(
                f"Record {index} gives {n_sources} patches (lesion boxes + healthy patches), more than "
                f"`sources_per_image`={self.sources_per_image}; raise it or pass fewer boxes"
            )
        return out


def collate_four_views(batch: Sequence[FourViews]) -> FourViews:
    """Concatenate the views of several images, with sources unique in the batch.

    :class:`FourViewDataset` gives dataset-wide source ids (record ``i`` owns
    ``[i * sources_per_image, (i + 1) * sources_per_image)``), which are kept: the same lesion
    patch then has the same id in every batch and epoch, so a memory bank never offers an
    anchor its own patch as a negative, and unrelated old entries are never excluded. Only
    when items share source ids (e.g. the same item twice, or views made by a bare
    :class:`FourViewSampler`) are they renumbered: the sources of item ``j`` are shifted past
    those of items ``0 .. j - 1``.

    Args:
        batch: per-image :class:`FourViews` (from :class:`FourViewDataset`).

    Returns:
        :class:`FourViews` with ``views (B, C, P, P)`` float and ``tags`` of length ``B``,
        the total number of views.

    Raises:
        TypeError: an item that is not :class:`FourViews`.
        ValueError: an empty ``batch``, or items whose views differ in shape ``(C, P, P)``.
    """
    if len(batch) == 0:
        raise ValueError("Expected at least one item to collate, but got an empty batch")
    for item in batch:
        if not isinstance(item, FourViews):
            raise TypeError(f"Expected FourViews items, but got {type(item).__name__}")
    first = tuple(batch[0].views.shape[1:])
    for j, item in enumerate(batch):
        if tuple(item.views.shape[1:]) != first:
            raise ValueError(
                f"Expected every item of `batch` to have views of one shape (C, P, P), but item 0 has {first} and "
                f"item {j} has {tuple(item.views.shape[1:])}: use one patch size (and channel count) per batch"
            )
    per_item = [item.tags.source.unique() for item in batch]
    merged = torch.cat(per_item)
    if merged.unique().numel() == merged.numel():  # dataset-wide ids already unique: keep them
        return FourViews(torch.cat([item.views for item in batch]), ViewTags.cat([item.tags for item in batch]))
    views, tags = [], []
    offset = 0
    for item in batch:
        t = item.tags
        local = t.source - int(t.source.min()) if len(t) else t.source
        shifted = ViewTags(t.kind, t.quality, local + offset, t.label, t.image, validate=False)
        offset += int(local.max()) + 1 if len(t) else 0
        views.append(item.views)
        tags.append(shifted)
    return FourViews(torch.cat(views), ViewTags.cat(tags))
