"""Tag filtering of a search: which bank entries each query may get back.

A search's filter has two parts. The tag predicate (a :class:`~mlcl_losses.levels.Select`, or a
:class:`~mlcl_losses.levels.Level`'s negative selector) is one boolean mask over the bank, the same
for every query. The exclusions are per query: an entry is never returned to a query that shares
its ``source``, ``image`` or (where asked) ``label``. The label exclusion is kept apart, because
the FAISS backend searches one sub-bank per distinct query label
(:mod:`mlcl_losses.index.faiss_backend`).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import ViewTags

__all__ = ["SearchFilter", "build_filter", "negatives_predicate"]


class SearchFilter(NamedTuple):
    """A search's filter over the valid prefix ``[0, size)`` of the bank.

    Attributes:
        allowed: ``(size,)`` bool, the entries passing the tag predicate; None = all.
        exclusions: ``[(query values (N,), bank values (size,))]``: a query never gets an entry whose
            value equals its own.
        label: the label exclusion ``(query (N,), bank (size,))``, kept apart for grouping; or None.
    """

    allowed: Tensor | None
    exclusions: list[tuple[Tensor, Tensor]]
    label: tuple[Tensor, Tensor] | None


def negatives_predicate(negatives: Select | Level | None, exclude_label: Tensor | None) -> tuple[Select | None, bool]:
    """The tag predicate of ``negatives`` and whether it allows no bank entry at all.

    Args:
        negatives: a :class:`~mlcl_losses.levels.Select`, a :class:`~mlcl_losses.levels.Level`
            (its ``negatives`` selector; nothing when ``level.bank_negatives`` is False) or None (every entry).
        exclude_label: the search's label exclusion, required by a level with ``needs_label``.

    Returns:
        ``(select, nothing)``: the selector (None = every entry) and whether nothing may be returned.

    Raises:
        ValueError: a level that excludes same-label negatives without ``exclude_label``.
        TypeError: ``negatives`` of another type.
    """
    if isinstance(negatives, Level):
        if negatives.needs_label and exclude_label is None:
            raise ValueError(
                f"Level {negatives.name!r} excludes same-label negatives, so `exclude_label` must be given"
            )
        return (negatives.negatives if negatives.bank_negatives else None), not negatives.bank_negatives
    if negatives is None or isinstance(negatives, Select):
        return negatives, False
    raise TypeError(f"Expected `negatives` to be a Select, a Level or None, but got {type(negatives).__name__}")


def build_filter(
    select: Select | None,
    bank_tags: ViewTags,
    exclude_source: Tensor | None,
    exclude_image: Tensor | None,
    exclude_label: Tensor | None,
) -> SearchFilter:
    """The filter of a search over the ``(size,)`` tags of the bank's valid entries.

    The caller has checked that the bank carries the image / label tags it is asked to exclude by.
    """
    allowed = None
    if select is not None and (select.kind is not None or select.quality is not None):
        allowed = select(bank_tags)
    exclusions = []
    for query_ids, bank_ids in ((exclude_source, bank_tags.source), (exclude_image, bank_tags.image)):
        if query_ids is not None and bank_ids is not None:
            exclusions.append((query_ids, bank_ids))
    label = None if exclude_label is None or bank_tags.label is None else (exclude_label, bank_tags.label)
    return SearchFilter(allowed, exclusions, label)
