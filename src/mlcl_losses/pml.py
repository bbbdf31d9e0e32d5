"""pytorch-metric-learning adapters: a loss, a miner, a cross-batch memory and a self-paced reducer.

PML passes one integer label per embedding; here that label is the packed
:class:`~mlcl_losses.tags.ViewTags` (:meth:`~mlcl_losses.tags.ViewTags.pack`)::

    loss_fn = MultiLevelInfoNCELoss(comcl_levels(), temperature=0.1)
    loss = loss_fn(embeddings, tags.pack())

Conventions that differ from plain PML losses, because positives are defined by the tags:

* with ``ref_emb``/``ref_labels`` (also inside :class:`MultiLevelCrossBatchMemory`), the
  reference set supplies the *negatives* (like a memory bank) and positives still come
  from the batch;
* ``indices_tuple`` restricts the pairs: ``(a1, p)`` the in-batch positives and
  ``(a2, n)`` the negatives (indices into the reference set when one is given). A triplet
  tuple ``(a, p, n)`` is converted to pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.reducers import BaseReducer
from torch import Tensor

from mlcl_losses.functional import Denominator, multilevel_info_nce
from mlcl_losses.levels import Level, bank_negative_mask, comcl_levels, level_masks, validate_levels
from mlcl_losses.self_paced import SelfPacedWeighting
from mlcl_losses.tags import ViewTags

__all__ = [
    "MultiLevelCrossBatchMemory",
    "MultiLevelInfoNCELoss",
    "MultiLevelMiner",
    "SelfPacedReducer",
]

IndicesTuple = tuple[Tensor, ...]


def _pairs(indices_tuple: IndicesTuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
        return a1, p, a2, n
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    raise ValueError(
        f"Expected `indices_tuple` of length 3 (a, p, n) or 4 (a1, p, a2, n), but got {len(indices_tuple)}"
    )


def _pair_mask(rows: Tensor, cols: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[rows.long().to(device), cols.long().to(device)] = True
    return mask


class MultiLevelInfoNCELoss(BaseMetricLossFunction):
    """The multi-level InfoNCE loss as a PML ``BaseMetricLossFunction``.

    Called as PML losses are: ``loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None,
    ref_labels=None)`` with ``labels = tags.pack()``. Each level is a sub-loss of
    per-anchor ``"element"`` losses (already multiplied by the level weight), so any PML
    reducer applies; the default (mean per level, summed over levels) equals
    :func:`~mlcl_losses.functional.multilevel_info_nce`.

    Args:
        levels: the levels; default :func:`~mlcl_losses.levels.comcl_levels`.
        temperature: > 0.
        denominator: ``"pos_neg"`` or ``"all"``.
        **kwargs: passed to ``BaseMetricLossFunction`` (``reducer``, ``embedding_regularizer``...).
            A ``distance`` other than cosine similarity is refused.

    Examples:
        >>> from mlcl_losses import Level, ViewTags
        >>> tags = ViewTags(kind=[1, 1, 1, 1], quality=[0, 0, 0, 0], source=[0, 0, 1, 1])
        >>> loss_fn = MultiLevelInfoNCELoss([Level.instance()], temperature=0.5)
        >>> loss_fn(torch.randn(4, 8), tags.pack()).shape
        torch.Size([])
    """

    def __init__(
        self,
        levels: Sequence[Level] | Level | None = None,
        temperature: float = 0.1,
        denominator: Denominator = "pos_neg",
        **kwargs: Any,
    ) -> None:
        self.levels = validate_levels(comcl_levels() if levels is None else levels)
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected unique level names, but got {names}")
        if len(names) > 1 and any(not name or "." in name for name in names):  # they key PML's reducer dict
            raise ValueError(f"Expected level names non-empty and without '.', but got {names}")
        super().__init__(**kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(f"MultiLevelInfoNCELoss uses cosine similarity, but got distance={self.distance}")
        if not (temperature > 0):
            raise ValueError(f"Expected `temperature` > 0, but got {temperature}")
        self.temperature = float(temperature)
        self.denominator: Denominator = denominator
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def _sub_loss_names(self) -> list[str]:
        return [level.name for level in self.levels]

    def get_default_distance(self) -> Any:
        """Cosine similarity, the only distance this loss uses."""
        return CosineSimilarity()

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        """Per-level element losses for PML's reducers."""
        if labels is None:
            raise ValueError("MultiLevelInfoNCELoss needs `labels` (packed ViewTags), but got None")
        tags = ViewTags.unpack(labels)
        has_ref = ref_emb is not embeddings
        n = embeddings.shape[0]
        levels = self.levels
        bank = None
        n_cols = n
        if has_ref:
            if ref_labels is None:
                raise ValueError("`ref_emb` needs `ref_labels` (packed ViewTags)")
            bank = (ref_emb, ViewTags.unpack(ref_labels).to(embeddings.device))
            levels = [dataclasses.replace(level, in_batch_negatives=False) for level in levels]
            n_cols = n + ref_emb.shape[0]
        pair_mask = None
        if indices_tuple is not None:
            a1, p, a2, neg = _pairs(indices_tuple)
            device = embeddings.device
            pos_mask = None if has_ref else _pair_mask(a1, p, (n, n), device)
            offset = n if has_ref else 0
            neg_mask = _pair_mask(a2, neg + offset, (n, n_cols), device)
            pair_mask = (pos_mask, neg_mask)
        losses, stats = multilevel_info_nce(
            embeddings,
            tags.to(embeddings.device),
            levels,
            temperature=self.temperature,
            denominator=self.denominator,
            bank=bank,
            pair_mask=pair_mask,
            reduction="none",
        )
        out: dict[str, dict[str, Any]] = {}
        for row, level in zip(losses, levels, strict=True):
            valid = stats[level.name].valid
            if bool(valid.any()):
                idx = valid.nonzero()[:, 0]
                out[level.name] = {"losses": row[idx], "indices": idx, "reduction_type": "element"}
            else:
                out[level.name] = self.zero_loss()
        return out


class MultiLevelMiner(BaseMiner):
    """A PML miner returning the ``(a1, p, a2, n)`` pairs of the levels.

    Args:
        levels: the levels; default :func:`~mlcl_losses.levels.comcl_levels`.
        level: name of one level to mine; ``None`` returns the union of all levels' pairs.

    :meth:`pairs_by_level` returns every level's pairs at once, e.g. to feed one PML loss per level.

    Examples:
        >>> from mlcl_losses import comcl_levels, ViewTags
        >>> tags = ViewTags(kind=[1, 1, 1, 0, 0], quality=[0, 0, 1, 0, 1], source=[0, 0, 0, 1, 1])
        >>> a1, p, a2, n = MultiLevelMiner(level="healthy")(torch.randn(5, 8), tags.pack())
        >>> a1.tolist(), p.tolist()
        ([4], [3])
    """

    def __init__(self, levels: Sequence[Level] | Level | None = None, level: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.levels = validate_levels(comcl_levels() if levels is None else levels)
        names = [lv.name for lv in self.levels]
        if level is not None and level not in names:
            raise ValueError(f"Expected `level` in {names} or None, but got {level!r}")
        self.level = level

    def pairs_by_level(
        self, labels: Tensor, ref_labels: Tensor | None = None
    ) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Every level's ``(a1, p, a2, n)`` pairs (int64 index tensors).

        Args:
            labels: ``(N,)`` packed tags of the batch.
            ref_labels: ``(M,)`` packed tags of a reference set; then pairs index into it, and
                a reference entry is a positive when related to the anchor (same source or label)
                and passes the positive selector, a negative under the bank rules.
        """
        tags = ViewTags.unpack(labels)
        out: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        if ref_labels is None:
            for lv, masks in zip(self.levels, level_masks(tags, self.levels), strict=True):
                a1, p = masks.positives.nonzero(as_tuple=True)
                a2, n = masks.negatives.nonzero(as_tuple=True)
                out[lv.name] = (a1, p, a2, n)
            return out
        ref = ViewTags.unpack(ref_labels).to(tags.device)
        for lv in validate_levels(self.levels, tags):
            key = tags.source if lv.relation == "source" else tags.label
            ref_key = ref.source if lv.relation == "source" else ref.label
            if key is None or ref_key is None:
                raise ValueError(f"Level {lv.name!r} pairs by label, but the tags carry no label")
            pos = lv.anchors(tags)[:, None] & (key[:, None] == ref_key[None, :]) & lv.positives(ref)[None, :]
            a1, p = pos.nonzero(as_tuple=True)
            a2, n = bank_negative_mask(tags, ref, lv).nonzero(as_tuple=True)
            out[lv.name] = (a1, p, a2, n)
        return out

    def mine(
        self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pairs of the chosen level, or the union over levels."""
        by_level = self.pairs_by_level(labels, None if ref_emb is embeddings else ref_labels)
        if self.level is not None:
            return by_level[self.level]
        n_ref = ref_emb.shape[0]
        parts = list(by_level.values())
        pos = torch.unique(torch.cat([a * n_ref + p for a, p, _, _ in parts]))
        neg = torch.unique(torch.cat([a * n_ref + n for _, _, a, n in parts]))
        return pos // n_ref, pos % n_ref, neg // n_ref, neg % n_ref


class MultiLevelCrossBatchMemory(CrossBatchMemory):
    """PML's ``CrossBatchMemory`` that also accepts :class:`MultiLevelInfoNCELoss`.

    PML checks wrapped losses by class name; this subclass adds ours. Use globally unique
    ``source`` (and ``image``) ids across batches: the memory keeps old batches, and entries
    that share the anchor's source are never its negatives.
    """

    @staticmethod
    def supported_losses() -> list[str]:
        """PML's list plus ``MultiLevelInfoNCELoss``."""
        return [*CrossBatchMemory.supported_losses(), "MultiLevelInfoNCELoss"]


class SelfPacedReducer(BaseReducer):
    """A PML reducer that weights per-element losses with self-paced weights, then averages.

    Gives PML users self-paced learning without this library's loss: the weights come
    from a :class:`~mlcl_losses.self_paced.SelfPacedWeighting` with ``target="anchors"``
    applied to the detached element losses; the result is ``mean(v * loss)``.

    Args:
        weighting: the self-paced weighting (``target="anchors"``).

    Examples:
        >>> from mlcl_losses.self_paced import PaceSchedule
        >>> reducer = SelfPacedReducer(SelfPacedWeighting("hard", PaceSchedule.constant(1.0), target="anchors"))
        >>> reducer.element_reduction(torch.tensor([0.5, 2.0]), None, None, None)
        tensor(0.2500)
    """

    def __init__(self, weighting: SelfPacedWeighting, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(weighting, SelfPacedWeighting) or weighting.target != "anchors":
            raise ValueError("Expected `weighting` to be a SelfPacedWeighting with target='anchors'")
        self.weighting = weighting

    def __deepcopy__(self, memo: dict[int, Any]) -> SelfPacedReducer:
        """PML deep-copies reducers; the copy shares the weighting, so ``weighting.step()`` reaches it."""
        return SelfPacedReducer(self.weighting)

    def element_reduction(self, losses: Tensor, *_: Any) -> Tensor:
        """``mean(v * losses)`` with ``v = weighting(losses.detach())``."""
        return (self.weighting(losses.detach()) * losses).mean()

    def pos_pair_reduction(self, losses: Tensor, *args: Any) -> Tensor:
        """Same as :meth:`element_reduction`."""
        return self.element_reduction(losses, *args)

    def neg_pair_reduction(self, losses: Tensor, *args: Any) -> Tensor:
        """Same as :meth:`element_reduction`."""
        return self.element_reduction(losses, *args)

    def triplet_reduction(self, losses: Tensor, *args: Any) -> Tensor:
        """Same as :meth:`element_reduction`."""
        return self.element_reduction(losses, *args)
