"""Lazy four-view records over the synthetic datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from mlcl_losses.synthetic.fundus import FundusSample, SyntheticFundus
from mlcl_losses.synthetic.xray import SyntheticChestXray
from mlcl_losses.views import FourViewRecord


class ViewRecords(Sequence[FourViewRecord]):
    """Lazy sequence of :class:`~mlcl_losses.views.FourViewRecord` over a synthetic dataset.

    Record ``i`` renders sample ``i`` when accessed (in the DataLoader worker) and holds its
    clean image, its boxes, its label (the DR grade for fundus; ``None`` for the multi-label
    chest X-rays, whose labels do not fit one ``label`` tag) and its quality label. The degraded copy is left to the
    :class:`~mlcl_losses.views.FourViewDataset`'s degradation, so that every image, even a
    "Good" one, gets a low-quality counterpart.

    Args:
        dataset: a :class:`SyntheticFundus` or :class:`SyntheticChestXray`.

    Examples:
        >>> records = view_records(SyntheticFundus(n=2, size=64, seed=0))
        >>> len(records), records[0].image.shape
        (2, torch.Size([3, 64, 64]))
    """

    def __init__(self, dataset: SyntheticFundus | SyntheticChestXray) -> None:
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
    """Lazy :class:`~mlcl_losses.views.FourViewRecord` sequence over a synthetic dataset (see :class:`ViewRecords`)."""
    return ViewRecords(dataset)
