"""Lazy four-view records over the synthetic datasets (deprecated: build the records directly).

:func:`view_records` and :class:`ViewRecords` are deprecated (after 0.1.0) and will be removed in a
later release. Every training path of this project builds its own records instead: the example
pipelines render each synthetic set once, cache it, and keep degraded copies and a per-epoch subset
of the lesion boxes (``examples/common/views.py``); the Lightning example renders in ``setup``. A
record is one line::

    FourViewRecord(image=s.clean_image, boxes=s.boxes, label=s.grade, quality=s.quality, image_id=s.index)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import overload

from mlcl_losses.synthetic.fundus import FundusSample, SyntheticFundus
from mlcl_losses.synthetic.xray import SyntheticChestXray
from mlcl_losses.views import FourViewRecord

_DEPRECATION = (
    "mlcl_losses.synthetic.view_records / ViewRecords are deprecated and will be removed in a later release: build the "
    "records directly, e.g. [FourViewRecord(image=s.clean_image, boxes=s.boxes, label=s.grade, quality=s.quality, "
    "image_id=s.index) for s in (dataset[i] for i in range(len(dataset)))] (see the mlcl_losses.views docs)"
)


class ViewRecords(Sequence[FourViewRecord]):
    """Lazy sequence of :class:`~mlcl_losses.views.FourViewRecord` over a synthetic dataset.

    Deprecated (after 0.1.0): build the records directly (see the example); constructing this class
    warns (``DeprecationWarning``).

    Record ``i`` renders sample ``i`` when accessed (in the DataLoader worker) and holds its
    clean image, its boxes, its label (the DR grade for fundus; ``None`` for the multi-label
    chest X-rays, whose labels do not fit one ``label`` tag) and its quality label. The degraded copy is left to the
    :class:`~mlcl_losses.views.FourViewDataset`'s degradation, so that every image, even a
    "Good" one, gets a low-quality counterpart.

    Args:
        dataset: a :class:`SyntheticFundus` or :class:`SyntheticChestXray`.

    Raises:
        TypeError: ``dataset`` is neither.

    Examples:
        The records, built directly (what replaces this class):

        >>> data = SyntheticFundus(n=2, size=64, seed=0)
        >>> records = [
        ...     FourViewRecord(image=s.clean_image, boxes=s.boxes, label=s.grade, quality=s.quality, image_id=s.index)
        ...     for s in (data[i] for i in range(len(data)))
        ... ]
        >>> len(records), records[0].image.shape
        (2, torch.Size([3, 64, 64]))
    """

    def __init__(self, dataset: SyntheticFundus | SyntheticChestXray) -> None:
        warnings.warn(_DEPRECATION, DeprecationWarning, stacklevel=2)
        if not isinstance(dataset, (SyntheticFundus, SyntheticChestXray)):
            raise TypeError(
                f"Expected `dataset` to be a SyntheticFundus or SyntheticChestXray, but got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        """Number of records."""
        return len(self.dataset)

    @overload
    def __getitem__(self, index: int) -> FourViewRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[FourViewRecord]: ...

    def __getitem__(self, index: int | slice) -> FourViewRecord | list[FourViewRecord]:
        """Render record ``index`` (or a list for a slice)."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        sample = self.dataset[index]
        label = sample.grade if isinstance(sample, FundusSample) else None
        return FourViewRecord(
            image=sample.clean_image,
            boxes=sample.boxes,
            label=label,
            quality=sample.quality,
            image_id=sample.index,
        )


def view_records(dataset: SyntheticFundus | SyntheticChestXray) -> ViewRecords:
    """Lazy :class:`~mlcl_losses.views.FourViewRecord` sequence over a synthetic dataset (see :class:`ViewRecords`).

    Deprecated (after 0.1.0): build the records directly (see :class:`ViewRecords`); calling this warns
    (``DeprecationWarning``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # warned once, below, at the caller's line
        records = ViewRecords(dataset)
    warnings.warn(_DEPRECATION, DeprecationWarning, stacklevel=2)
    return records
