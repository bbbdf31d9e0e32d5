"""pytorch-metric-learning adapters: a loss, a miner, a cross-batch memory and a self-paced reducer.

PML passes one integer label per embedding; here that label is the packed
:class:`~mlcl_losses.tags.ViewTags` (:meth:`~mlcl_losses.tags.ViewTags.pack`)::

    loss_fn = MultiLevelInfoNCELoss(comcl_levels(), temperature=0.1)
    loss = loss_fn(embeddings, tags.pack())

Conventions (PML's, with positives and negatives defined by the levels):

* without a reference set, every embedding is an anchor and its positives and negatives
  come from the batch, as in :func:`~mlcl_losses.functional.multilevel_info_nce`;
* with ``ref_emb``/``ref_labels`` (also inside :class:`MultiLevelCrossBatchMemory`), the
  anchors are the batch and *both* positives and negatives are reference entries: a
  reference entry is a positive of an anchor when the level relates them (same source or
  label, positive selector) and a negative under the level's bank rules
  (``bank_negatives``). The reference set may hold the anchor itself (a memory does):
  the cross-batch memory removes those self-pairs, a direct caller must not pass them;
  views given only in ``ref_emb`` are positives but never anchors (concatenate them to
  ``embeddings`` to make them anchors too);
* ``indices_tuple`` restricts the pairs: ``(a1, p)`` the positives and ``(a2, n)`` the
  negatives, ``p``/``n`` indexing the reference set when one is given (PML's convention).
  A triplet tuple ``(a, p, n)`` becomes the pairs ``(a, p)`` and ``(a, n)``. PML's miners
  pair only equal packed labels (same kind, quality and source), so cross-view levels
  (quality, healthy) get no pairs from them: mine those with :class:`MultiLevelMiner`
  (a warning names each level left without any pair);
* the loss is float32 for float16/bfloat16 input (float64 for float64), whatever the
  reducer, as :func:`~mlcl_losses.functional.multilevel_info_nce` returns it.

Under PML's ``DistributedLossWrapper`` the packed labels of all ranks are compared, so
``source`` and ``image`` ids must be unique across ranks: if a pipeline numbers them per
rank, apply :func:`~mlcl_losses.distributed.offset_ids_by_rank` before packing (the loss
cannot see ranks; rank-local ids give a wrong loss without an error).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import Tensor

from mlcl_losses._core import Denominator, check_options
from mlcl_losses._dispatch import PathLog, loss_with_options
from mlcl_losses._pml_reducer import SelfPacedReducer
from mlcl_losses._pml_support import (
    Pairs,
    check_indices_tuple,
    check_memory_inputs,
    check_reducer,
    level_pair_masks,
    pairs_to_mask,
    reference_tags,
    unpack_labels,
    warn_class_labels,
)
from mlcl_losses.levels import Level, comcl_levels, validate_levels
from mlcl_losses.tags import ViewTags

__all__ = [
    "MultiLevelCrossBatchMemory",
    "MultiLevelInfoNCELoss",
    "MultiLevelMiner",
    "SelfPacedReducer",
]

logger = logging.getLogger(__name__)

IndicesTuple = tuple[Tensor, ...]
_HALF = (torch.float16, torch.bfloat16)


class MultiLevelInfoNCELoss(BaseMetricLossFunction):
    """The multi-level InfoNCE loss as a PML ``BaseMetricLossFunction``.

    Called as PML losses are: ``loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None,
    ref_labels=None)`` with ``labels = tags.pack()`` (see the module docstring for the
    conventions with a reference set and with ``indices_tuple``). Each level is a sub-loss of
    per-anchor ``"element"`` losses (already multiplied by the level weight), so any PML
    reducer applies; the default (mean per level, summed over levels) equals
    :func:`~mlcl_losses.functional.multilevel_info_nce`.

    With a pair restriction or a reference set of ``M`` entries the loss runs on the dense
    reference path (memory ``O(N (N + M))`` per level).

    Args:
        levels: the levels; default :func:`~mlcl_losses.levels.comcl_levels`.
        temperature: > 0.
        denominator: ``"pos_neg"`` or ``"all"``.
        **kwargs: passed to ``BaseMetricLossFunction`` (``reducer``, ``embedding_regularizer``...).
            Only the default ``CosineSimilarity()`` is accepted as ``distance``.

    Raises:
        ValueError: an option out of range, a non-default ``distance``; at call time,
            ``labels`` not packed tags, ``indices_tuple`` indices out of range. Labels that look
            like plain class labels (every value of ``labels`` and ``ref_labels`` in ``[0, 3]``:
            decoded, one source and no label, so the loss is 0 whatever the embeddings) give a
            ``UserWarning``, not an error: one patch's views in a batch of their own look the same.
        TypeError: ``indices_tuple`` of non-integer tensors.

    A batch in which no level has an anchor with a positive and a negative gives loss 0 and
    logs a warning (``logging.getLogger("mlcl_losses.pml")``, once per loss, then at debug level).

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
        default = CosineSimilarity()
        if type(self.distance) is not CosineSimilarity or any(
            getattr(self.distance, key) != getattr(default, key) for key in ("power", "normalize_embeddings", "p")
        ):
            raise ValueError(
                "Expected `distance` to be the default CosineSimilarity() (the loss uses cosine similarity "
                f"itself), but got {self.distance}"
                f"{'' if type(self.distance) is not CosineSimilarity else f' with power={self.distance.power}'}"
            )
        check_reducer(self.reducer)
        # one checker for the module, the function and this adapter; per-anchor losses for PML's reducers
        self._options = check_options(temperature, denominator, reduction="none")
        self._path_log = PathLog(type(self).__name__)
        self.temperature = self._options.temperature
        self.denominator: Denominator = self._options.denominator
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)
        self._warned_levels: set[str] = set()
        self._warned_no_anchor = False

    def _sub_loss_names(self) -> list[str]:
        return [level.name for level in self.levels]

    def get_default_distance(self) -> Any:
        """Cosine similarity, the only distance this loss uses."""
        return CosineSimilarity()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """PML's forward; float16/bfloat16 embeddings are computed and reduced in float32."""
        if isinstance(embeddings, Tensor) and embeddings.dtype in _HALF:
            same = ref_emb is embeddings
            embeddings = embeddings.float()
            if same:
                ref_emb = embeddings
            elif isinstance(ref_emb, Tensor):
                ref_emb = ref_emb.float()
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        """Per-level element losses for PML's reducers (only anchors with a positive and a negative)."""
        if labels is None:
            raise ValueError("MultiLevelInfoNCELoss needs `labels` (packed ViewTags), but got None")
        tags = unpack_labels(labels, "labels").to(embeddings.device)
        warn_class_labels(labels, None if ref_emb is embeddings or not isinstance(ref_labels, Tensor) else ref_labels)
        n = embeddings.shape[0]
        if len(tags) != n:
            raise ValueError(f"`embeddings` and `labels` must have the same length, got {n} and {len(tags)}")
        if ref_emb is embeddings:
            pairs = None if indices_tuple is None else check_indices_tuple(indices_tuple, n, None)
            losses, valid = self._in_batch(embeddings, tags, pairs)
            candidate_tags: tuple[ViewTags, ViewTags | None] = (tags, None)
        else:
            candidate_tags = reference_tags(embeddings, tags, ref_emb, ref_labels, self.levels)
            pairs = None if indices_tuple is None else check_indices_tuple(indices_tuple, n, ref_emb.shape[0])
            losses, valid = self._with_reference(embeddings, ref_emb, *candidate_tags, pairs)
        if pairs is not None:
            self._warn_levels_without_pairs(*candidate_tags, valid)
        if n and not any(bool(ok.any()) for ok in valid):
            log = logger.debug if self._warned_no_anchor else logger.warning
            self._warned_no_anchor = True
            log(
                "MultiLevelInfoNCELoss: no level has an anchor with a positive and a negative in this batch "
                "(%d embeddings), so the loss is 0. `labels` must be packed ViewTags (ViewTags.pack()), not class "
                "labels; a batch needs several sources. (Logged as a warning once per loss.)",
                n,
            )
        out: dict[str, dict[str, Any]] = {}
        for row, ok, level in zip(losses, valid, self.levels, strict=True):
            if bool(ok.any()):
                idx = ok.nonzero()[:, 0]
                out[level.name] = {"losses": row[idx], "indices": idx, "reduction_type": "element"}
            else:
                out[level.name] = self.zero_loss()
        return out

    def _in_batch(self, embeddings: Tensor, tags: ViewTags, pairs: Pairs | None) -> tuple[Tensor, list[Tensor]]:
        """``(L, N)`` per-anchor losses and per-level valid anchors, pairs from the batch."""
        n = embeddings.shape[0]
        pair_mask = None
        if pairs is not None:
            a1, p, a2, neg = pairs
            device = embeddings.device
            pair_mask = (pairs_to_mask(a1, p, (n, n), device), pairs_to_mask(a2, neg, (n, n), device))
        losses, stats = loss_with_options(
            embeddings, tags, self.levels, self._options, pair_mask=pair_mask, path_log=self._path_log
        )
        return losses, [stats[level.name].valid for level in self.levels]

    def _with_reference(
        self,
        embeddings: Tensor,
        ref_emb: Tensor,
        tags: ViewTags,
        ref_tags: ViewTags,
        pairs: Pairs | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Anchors from the batch, positives and negatives from the reference set.

        The reference set is the bank of :func:`~mlcl_losses.functional.multilevel_info_nce`,
        admitted as positives too by a ``(N, N + M)`` positive pair mask; no in-batch pair.
        """
        n, m, device = embeddings.shape[0], ref_emb.shape[0], embeddings.device
        pos = torch.zeros(n, n + m, dtype=torch.bool, device=device)
        neg = torch.zeros_like(pos)
        if pairs is None:
            pos[:, n:] = True
            neg[:, n:] = True
        else:
            a1, p, a2, ng = pairs
            pos[:, n:] = pairs_to_mask(a1, p, (n, m), device)
            neg[:, n:] = pairs_to_mask(a2, ng, (n, m), device)
        levels = [dataclasses.replace(level, in_batch_negatives=False) for level in self.levels]
        losses, stats = loss_with_options(
            embeddings,
            tags,
            levels,
            self._options,
            bank=(ref_emb.to(device=device, dtype=embeddings.dtype), ref_tags),
            pair_mask=(pos, neg),
            path_log=self._path_log,
        )
        return losses, [stats[level.name].valid for level in levels]

    def _warn_levels_without_pairs(self, tags: ViewTags, ref_tags: ViewTags | None, valid: list[Tensor]) -> None:
        """Warn once per level when ``indices_tuple`` took away every pair a level had."""
        for level, ok in zip(self.levels, valid, strict=True):
            if level.name in self._warned_levels or bool(ok.any()):
                continue
            pos, neg = level_pair_masks(tags, ref_tags, level)
            if not bool((pos.any(dim=1) & neg.any(dim=1)).any()):
                continue  # the level has no pair in this batch anyway
            self._warned_levels.add(level.name)
            warnings.warn(
                f"`indices_tuple` leaves level {level.name!r} without any anchor-positive-negative pair, so it "
                "adds 0. PML miners pair only equal packed labels (same kind, quality and source): mine the "
                "pairs of cross-view levels with mlcl_losses.pml.MultiLevelMiner. (Warned once per level.)",
                UserWarning,
                stacklevel=2,
            )


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

        Raises:
            ValueError: ``labels`` / ``ref_labels`` not packed tags (labels that look like plain
                class labels, every value in ``[0, 3]``, give a ``UserWarning``; see
                :class:`MultiLevelInfoNCELoss`).
        """
        tags = unpack_labels(labels, "labels")
        ref = None if ref_labels is None else unpack_labels(ref_labels, "ref_labels").to(tags.device)
        warn_class_labels(labels, ref_labels)
        out: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for lv in validate_levels(self.levels, tags):
            pos, neg = level_pair_masks(tags, ref, lv)
            a1, p = pos.nonzero(as_tuple=True)
            a2, n = neg.nonzero(as_tuple=True)
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

    PML checks wrapped losses by class name; this subclass adds ours. The batch's anchors
    take their positives and negatives from the memory (which holds the current batch too;
    self-pairs are removed), as PML's losses do. Without a ``miner``, PML pairs only equal
    labels; here the memory then mines every level's pairs with :class:`MultiLevelMiner`, so
    ``MultiLevelCrossBatchMemory(loss, ...)`` with the memory equal to the batch is ``loss``.

    Use globally unique ``source`` (and ``image``) ids across batches: the memory keeps old
    batches, and entries that share the anchor's source are its positives, never its
    negatives. Every batch must carry the same optional tags (``label``, ``image``).

    Args:
        loss: the wrapped loss (ours or one of PML's supported losses).
        embedding_size: ``D``.
        memory_size: entries kept.
        miner: a PML miner; default :class:`MultiLevelMiner` of the loss's levels for our loss.
        **kwargs: passed to ``CrossBatchMemory``.

    Raises:
        TypeError: ``embedding_size`` or ``memory_size`` not an int; at call time, ``embeddings``
            not a float tensor, ``enqueue_mask`` not a bool tensor.
        ValueError: ``embedding_size`` or ``memory_size`` < 1; at call time, ``embeddings`` not
            ``(N, embedding_size)``, ``labels`` or ``enqueue_mask`` of another length, or more
            entries to enqueue than ``memory_size``.
    """

    def __init__(
        self, loss: Any, embedding_size: int, memory_size: int = 1024, miner: BaseMiner | None = None, **kwargs: Any
    ) -> None:
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"Expected `{name}` >= 1, but got {value}")
        if miner is None and isinstance(loss, MultiLevelInfoNCELoss):
            miner = MultiLevelMiner(loss.levels)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: IndicesTuple | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """PML's ``CrossBatchMemory.forward``, with its inputs checked first.

        Args:
            embeddings: ``(N, embedding_size)`` float.
            labels: ``(N,)`` packed tags (for our loss) or the wrapped loss's labels.
            indices_tuple: extra pairs or triplets, as PML's.
            enqueue_mask: ``(N,)`` bool or None: the rows to enqueue (not anchors), as PML's.
        """
        check_memory_inputs(embeddings, labels, enqueue_mask, self.embedding_size, self.memory_size)
        return super().forward(embeddings, labels, indices_tuple, enqueue_mask)

    @staticmethod
    def supported_losses() -> list[str]:
        """PML's list plus ``MultiLevelInfoNCELoss``."""
        return [*CrossBatchMemory.supported_losses(), "MultiLevelInfoNCELoss"]
