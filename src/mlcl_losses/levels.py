"""Levels: which embeddings are anchors, positives and negatives of each other.

A :class:`Level` is a declarative rule over :class:`~mlcl_losses.tags.ViewTags`
(``docs/architecture.md``, ``docs/method.md``): an anchor selector, a positive relation (same ``source`` or same
``label``) restricted by a positive selector, a negative selector, and a weight.
Two rules hold for every level, whatever its selectors say:

* an embedding is never its own positive or negative;
* a negative never shares the anchor's ``source`` (nor its ``image`` when image
  tags are given, nor its ``label`` when the level pairs by label or sets
  ``exclude_same_label``).

:func:`comcl_levels` is the CoMCL preset: lesion, quality and healthy levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mlcl_losses.tags import Kind, Quality, ViewTags

__all__ = [
    "Level",
    "LevelMasks",
    "Select",
    "bank_negative_mask",
    "bank_positive_mask",
    "comcl_levels",
    "level_masks",
    "validate_levels",
]

Relation = Literal["source", "label"]
_RELATIONS: tuple[str, ...] = ("source", "label")


@dataclass(frozen=True)
class Select:
    """A predicate over tags: ``kind`` and/or ``quality`` must equal the given values.

    ``Select()`` selects everything.

    Examples:
        >>> tags = ViewTags(kind=[1, 1, 0], quality=[0, 1, 1], source=[0, 0, 1])
        >>> Select(kind=Kind.LESION, quality=Quality.LOW)(tags).tolist()
        [False, True, False]
    """

    kind: int | None = None
    quality: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("kind", Kind), ("quality", Quality)):
            value = getattr(self, name)
            if value is not None and value not in [int(a) for a in allowed]:
                raise ValueError(f"Expected `{name}` in {[int(a) for a in allowed]} or None, but got {value!r}")

    def __call__(self, tags: ViewTags) -> Tensor:
        """Boolean mask of the tags' shape: which entries satisfy the predicate."""
        mask = torch.ones(tags.shape, dtype=torch.bool, device=tags.device)
        if self.kind is not None:
            mask &= tags.kind == self.kind
        if self.quality is not None:
            mask &= tags.quality == self.quality
        return mask

    def __str__(self) -> str:
        """Readable predicate, e.g. ``kind=LESION, quality=HIGH``."""
        parts = []
        if self.kind is not None:
            parts.append(f"kind={Kind(self.kind).name}")
        if self.quality is not None:
            parts.append(f"quality={Quality(self.quality).name}")
        return ", ".join(parts) or "any"


@dataclass(frozen=True)
class Level:
    """One level of the multi-level loss.

    Args:
        name: used in statistics and logs.
        anchors: which embeddings are anchors.
        positives: which embeddings may be positives, among those related to the anchor.
        relation: ``"source"`` (positives share the anchor's source: instance
            discrimination) or ``"label"`` (positives share its label: supervised).
        negatives: which embeddings may be negatives.
        weight: the level's weight in the total loss, >= 0.
        exclude_same_label: also drop negatives that share the anchor's label
            (implied by ``relation="label"``).
        in_batch_negatives: take negatives from the batch.
        bank_negatives: take negatives from a memory bank, when one is given.

    Examples:
        >>> Level.instance().relation
        'source'
        >>> [level.name for level in comcl_levels()]
        ['lesion', 'quality', 'healthy']
    """

    name: str = "level"
    anchors: Select = field(default_factory=Select)
    positives: Select = field(default_factory=Select)
    relation: Relation = "source"
    negatives: Select = field(default_factory=Select)
    weight: float = 1.0
    exclude_same_label: bool = False
    in_batch_negatives: bool = True
    bank_negatives: bool = True

    def __post_init__(self) -> None:
        if self.relation not in _RELATIONS:
            raise ValueError(f"Expected `relation` in {_RELATIONS}, but got {self.relation!r}")
        if not (float(self.weight) >= 0.0) or self.weight == float("inf"):
            raise ValueError(f"Expected `weight` >= 0 and finite, but got {self.weight}")
        for name in ("anchors", "positives", "negatives"):
            if not isinstance(getattr(self, name), Select):
                raise TypeError(f"Expected `{name}` to be a Select, but got {type(getattr(self, name)).__name__}")

    @property
    def needs_label(self) -> bool:
        """Whether the level reads ``label`` tags."""
        return self.relation == "label" or self.exclude_same_label

    @classmethod
    def instance(cls, weight: float = 1.0, name: str = "instance") -> Level:
        """Instance discrimination: positives share the source, negatives are every other source.

        With two views per source this is NT-Xent (SimCLR); with a bank, MoCo's InfoNCE.
        """
        return cls(name=name, relation="source", weight=weight)

    @classmethod
    def supervised(cls, weight: float = 1.0, name: str = "supervised") -> Level:
        """Supervised contrast: positives share the label, negatives have another label (SupCon)."""
        return cls(name=name, relation="label", weight=weight)


def comcl_levels(
    lesion_weight: float = 1.0,
    quality_weight: float = 1.0,
    healthy_weight: float = 1.0,
) -> list[Level]:
    """The three CoMCL levels of ``docs/method.md`` (a reconstruction: the paper's equations are not public).

    ==========  ======================  =================================  ======================
    level       anchors                 positives (same source)            negatives
    ==========  ======================  =================================  ======================
    lesion      V1: lesion, high        high quality (V1a <-> V1b)         healthy (V3, V4)
    quality     V2: lesion, low         high quality (V1)                  healthy (V3, V4)
    healthy     V4: healthy, low        high quality (V3)                  lesion (V1, V2)
    ==========  ======================  =================================  ======================

    A level whose weight is 0 is dropped (the ablations' "without the quality level").

    Returns:
        The levels with a non-zero weight, in the order lesion, quality, healthy.
    """
    lesion, healthy = int(Kind.LESION), int(Kind.HEALTHY)
    high, low = int(Quality.HIGH), int(Quality.LOW)
    levels = [
        Level("lesion", Select(lesion, high), Select(quality=high), "source", Select(kind=healthy), lesion_weight),
        Level("quality", Select(lesion, low), Select(quality=high), "source", Select(kind=healthy), quality_weight),
        Level("healthy", Select(healthy, low), Select(quality=high), "source", Select(kind=lesion), healthy_weight),
    ]
    return [level for level in levels if level.weight > 0]


def validate_levels(levels: Sequence[Level] | Level, tags: ViewTags | None = None) -> list[Level]:
    """Check a level list (non-empty, Level objects, label tags present where needed)."""
    if isinstance(levels, Level):
        levels = [levels]
    levels = list(levels)
    if len(levels) == 0:
        raise ValueError("Expected at least one Level in `levels`, but got an empty list")
    for level in levels:
        if not isinstance(level, Level):
            raise TypeError(f"Expected every entry of `levels` to be a Level, but got {type(level).__name__}")
        if tags is not None and level.needs_label and tags.label is None:
            raise ValueError(f"Level {level.name!r} pairs or excludes by label, but `tags.label` is None")
    return levels


class LevelMasks(NamedTuple):
    """Dense masks of one level over a batch (reference path)."""

    anchors: Tensor  #: ``(N,)`` bool
    positives: Tensor  #: ``(N, N)`` bool, row = anchor
    negatives: Tensor  #: ``(N, N)`` bool, row = anchor


def _never_negative(query: ViewTags, keys: ViewTags, level: Level) -> Tensor:
    """``(N, M)`` bool: pairs that may never be negatives (same source/image/label).

    ``keys`` has shape ``(M,)`` (shared by all queries) or ``(N, M)`` (one row per query).
    """

    def pair(q: Tensor, k: Tensor) -> Tensor:
        return q[:, None] == (k[None, :] if k.dim() == 1 else k)

    forbid = pair(query.source, keys.source)
    if query.image is not None and keys.image is not None:
        forbid |= pair(query.image, keys.image)
    if level.needs_label and query.label is not None and keys.label is not None:
        forbid |= pair(query.label, keys.label)
    return forbid


def level_masks(tags: ViewTags, levels: Sequence[Level]) -> list[LevelMasks]:
    """Anchor, positive and negative masks of each level for a batch.

    Args:
        tags: ``(N,)`` tags of the batch.
        levels: the levels.

    Returns:
        One :class:`LevelMasks` per level. ``positives[i, j]`` / ``negatives[i, j]``
        say whether ``j`` is a positive / negative of anchor ``i``; rows of
        non-anchors are all False. Anchors with no positive or negative keep
        ``anchors[i] = True``; the loss skips and counts them.
    """
    levels = validate_levels(levels, tags)
    n = len(tags)
    not_self = ~torch.eye(n, dtype=torch.bool, device=tags.device)
    same_source = tags.source[:, None] == tags.source[None, :]
    same_label = None if tags.label is None else tags.label[:, None] == tags.label[None, :]
    out = []
    for level in levels:
        anchors = level.anchors(tags)
        related = same_source if level.relation == "source" else same_label
        if related is None:  # unreachable: validate_levels checked the label tags
            raise ValueError(f"Level {level.name!r} pairs by label, but `tags.label` is None")
        positives = anchors[:, None] & related & level.positives(tags)[None, :] & not_self
        if level.in_batch_negatives:
            negatives = anchors[:, None] & level.negatives(tags)[None, :] & not_self
            negatives &= ~_never_negative(tags, tags, level)
        else:
            negatives = torch.zeros(n, n, dtype=torch.bool, device=tags.device)
        out.append(LevelMasks(anchors, positives, negatives))
    return out


def bank_negative_mask(tags: ViewTags, bank_tags: ViewTags, level: Level) -> Tensor:
    """Which bank entries are negatives of each anchor of ``level``.

    Args:
        tags: ``(N,)`` tags of the batch.
        bank_tags: ``(M,)`` tags of a bank shared by all anchors, or ``(N, k)`` tags of
            per-anchor candidates (e.g. the hits of :meth:`~mlcl_losses.index.HardNegativeIndex.search`).
        level: the level.

    Returns:
        ``(N, M)`` or ``(N, k)`` bool. Bank entries are never positives; they are negatives
        when they pass the level's negative selector and share neither source, image nor
        (where the level uses labels) label with the anchor. Rows of non-anchors are False.
    """
    anchors = level.anchors(tags)
    shape = (len(tags), bank_tags.shape[-1])
    if not level.bank_negatives:
        return torch.zeros(shape, dtype=torch.bool, device=tags.device)
    selected = level.negatives(bank_tags)
    mask = anchors[:, None] & (selected[None, :] if selected.dim() == 1 else selected)
    return mask & ~_never_negative(tags, bank_tags, level)


def bank_positive_mask(tags: ViewTags, bank_tags: ViewTags, level: Level) -> Tensor:
    """Which bank entries are related to each anchor of ``level`` as positives are.

    The loss never takes positives from a bank on its own; a caller that means its bank as a
    reference set of candidates (PML's ``ref_emb``, a cross-batch memory) admits them with a
    positive ``pair_mask`` over the bank columns.

    Args:
        tags: ``(N,)`` tags of the batch.
        bank_tags: ``(M,)`` tags of the bank.
        level: the level.

    Returns:
        ``(N, M)`` bool: the entry shares the anchor's source (or label, for ``relation="label"``)
        and passes the positive selector. Rows of non-anchors are False.

    Raises:
        ValueError: the level pairs by label and either side carries no label.
    """
    key, bank_key = (tags.source, bank_tags.source) if level.relation == "source" else (tags.label, bank_tags.label)
    if key is None or bank_key is None:
        raise ValueError(f"Level {level.name!r} pairs by label, but `tags.label` or the bank's label is None")
    return level.anchors(tags)[:, None] & (key[:, None] == bank_key[None, :]) & level.positives(bank_tags)[None, :]
