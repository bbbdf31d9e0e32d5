"""``MultiLevelContrastiveLoss``: the levels, self-paced weighting and a hard-negative index in one module.

.. py:type:: Weighting
   :canonical: SelfPacedWeighting | Mapping[str, SelfPacedWeighting] | None

   The ``weighting`` option: one weighting for every level, one per level name, or none
   (type alias).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mlcl_losses._core import Denominator, FusedBackend, Impl, LevelStats, check_options
from mlcl_losses._dispatch import PathLog, loss_with_options
from mlcl_losses._steps import check_steps
from mlcl_losses.levels import Level, comcl_levels, validate_levels
from mlcl_losses.self_paced import SelfPacedWeighting
from mlcl_losses.tags import ViewTags

if TYPE_CHECKING:
    from mlcl_losses.distributed import DistributedHardNegativeIndex
    from mlcl_losses.index import HardNegativeIndex

__all__ = ["MultiLevelContrastiveLoss"]

logger = logging.getLogger(__name__)

Weighting = SelfPacedWeighting | Mapping[str, SelfPacedWeighting] | None


class MultiLevelContrastiveLoss(nn.Module):
    r"""The multi-level contrastive loss of CoMCL as an ``nn.Module``.

    Holds the levels and options and calls :func:`~mlcl_losses.functional.multilevel_info_nce`.
    Optionally weights negatives (or anchors) with self-paced weighting and retrieves
    each level's hardest allowed bank negatives from a
    :class:`~mlcl_losses.index.HardNegativeIndex`.

    Args:
        levels: the levels; default :func:`~mlcl_losses.levels.comcl_levels`.
        temperature: softmax temperature, > 0.
        denominator: ``"pos_neg"`` or ``"all"`` (SupCon).
        weighting: a :class:`~mlcl_losses.self_paced.SelfPacedWeighting` for all levels, or a
            mapping level name -> weighting (levels not in it are unweighted). Weightings with
            ``target="negatives"`` weight negatives, ``target="anchors"`` weight anchors.
        index: a hard-negative index; each level's bank negatives are its ``k`` most similar
            allowed entries. Keys passed to :meth:`forward` are added after the loss is computed.
        k: how many bank negatives per anchor and level, >= 1.
        tau_plus: debiased negatives (Chuang et al. 2020), in ``[0, 1)``.
        beta: hardness-reweighted negatives (Robinson et al. 2021), >= 0.
        impl: ``"auto" | "fused" | "reference"``; ``stats[name].path`` says which path ran, and the
            module logs it once at INFO (again only when it changes).
        backend: the fused backend, ``"auto" | "torch" | "triton"``.
        block_rows: anchors per row tile of the torch fused path (default 256).
        block_cols: candidates per column tile of the torch fused path (default 4096).
        gather_distributed: under ``torch.distributed`` (DDP), all-gather the embeddings (with
            gradients) and tags of every rank, so that negatives (and positives) span the global
            batch, and search the index shards of all ranks (see below). Needs an initialised
            process group at :meth:`forward`.
        process_group: the process group to gather over (default: the default group).

    A batch in which no level has an anchor with a positive and a negative gives loss 0 (and no
    gradient) and logs a warning (``logging.getLogger("mlcl_losses.loss")``, once per module,
    then at debug level).

    Distributed training (``gather_distributed=True``):
        Every rank computes the *whole* loss over the gathered global batch: all gathered rows are
        anchors, so the loss value, the statistics and the self-paced state are identical on every
        rank and equal to a single process's on the concatenated batch. Anchors restricted to the
        local rows would save compute (``N_r x N_g`` instead of ``N_g x N_g`` similarities per rank)
        but need global anchor counts for the means and global hardness for quantile paces and
        anchor weights; the replicated loss needs neither, and the similarity pass is cheap next to
        the encoder. The gather's backward sums the gradients of all ranks (each rank's loss is the
        same :math:`L`), so each rank's embeddings receive :math:`W \cdot \partial L / \partial z`
        (:math:`W` = world size); DDP averages the parameter gradients over the :math:`W` ranks,
        which gives exactly :math:`\partial L / \partial \theta` of one process on the
        concatenated batch. No rescaling is needed (the returned loss is :math:`L`, not
        :math:`W L`). Without DDP, sum the parameter gradients over ranks and divide by :math:`W`.

        ``index`` is this rank's *shard* (a :class:`~mlcl_losses.index.HardNegativeIndex`, or a
        :class:`~mlcl_losses.distributed.DistributedHardNegativeIndex` wrapping it): every shard is
        searched for the gathered anchors and the per-shard top-k merge into the global top-k, so
        the bank negatives are those of one index holding all shards; ``keys`` are added to the
        local shard only. ``stats[name].valid`` is over the gathered batch (rank 0's rows first).
        ``source`` / ``image`` ids must be globally unique
        (:func:`~mlcl_losses.distributed.offset_ids_by_rank`); a warning is logged once when ids
        occur on several ranks.

    Shapes:
        ``forward(embeddings (N, D), tags (N,), keys (N', D) | None, key_tags (N',) | None)``
        returns ``(loss 0-dim, stats dict[str, LevelStats])``.

    Examples:
        >>> from mlcl_losses import ViewTags
        >>> criterion = MultiLevelContrastiveLoss(temperature=0.1)
        >>> tags = ViewTags(kind=[1, 1, 1, 0, 0], quality=[0, 0, 1, 0, 1], source=[0, 0, 0, 1, 1])
        >>> loss, stats = criterion(torch.randn(5, 16), tags)
        >>> sorted(stats)
        ['healthy', 'lesion', 'quality']
    """

    def __init__(
        self,
        levels: Sequence[Level] | Level | None = None,
        temperature: float = 0.1,
        denominator: Denominator = "pos_neg",
        weighting: Weighting = None,
        index: HardNegativeIndex | DistributedHardNegativeIndex | None = None,
        k: int = 64,
        tau_plus: float = 0.0,
        beta: float = 0.0,
        impl: Impl = "auto",
        gather_distributed: bool = False,
        process_group: Any = None,
        *,
        backend: FusedBackend = "auto",
        block_rows: int | None = None,
        block_cols: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"Expected `gather_distributed` to be a bool, but got {type(gather_distributed).__name__}")
        from mlcl_losses.distributed import DistributedHardNegativeIndex

        if isinstance(index, DistributedHardNegativeIndex):
            if not gather_distributed:
                raise ValueError(
                    "A DistributedHardNegativeIndex needs gather_distributed=True; "
                    "for a single process pass a HardNegativeIndex"
                )
            process_group = index.group if process_group is None else process_group
            index = index.shard
        self.levels = validate_levels(comcl_levels() if levels is None else levels)
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected unique level names, but got {names}")
        if weighting is not None and any(not name or "." in name for name in names):
            raise ValueError(f"With a `weighting`, level names must be non-empty and without '.', but got {names}")
        self.options = check_options(
            temperature, denominator, tau_plus, beta, "mean", impl, backend, block_rows, block_cols
        )
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"Expected `k` to be an int, but got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"Expected `k` an integer >= 1, but got {k!r}")
        self.k = k
        self._path_log = PathLog(type(self).__name__)
        self.weightings = nn.ModuleDict(self._weightings_by_level(weighting, names))
        self.index: HardNegativeIndex | None = index
        self.gather_distributed = gather_distributed
        self.process_group = process_group
        self._warned_shared_ids = False
        self._warned_no_anchor = False
        if index is not None and hasattr(index, "capacity") and k > index.capacity:
            raise ValueError(f"Expected `k` <= index capacity ({index.capacity}), but got {k}")

    @property
    def temperature(self) -> float:
        """The temperature (validated at construction; read-only)."""
        return self.options.temperature

    @property
    def denominator(self) -> Denominator:
        """``"pos_neg"`` or ``"all"`` (read-only)."""
        return self.options.denominator

    @property
    def tau_plus(self) -> float:
        """Class prior of the debiased estimator (read-only)."""
        return self.options.tau_plus

    @property
    def beta(self) -> float:
        """Concentration of hardness reweighting (read-only)."""
        return self.options.beta

    @property
    def impl(self) -> Impl:
        """``"auto" | "fused" | "reference"`` (read-only)."""
        return self.options.impl

    @staticmethod
    def _weightings_by_level(weighting: Weighting, names: list[str]) -> dict[str, SelfPacedWeighting]:
        if weighting is None:
            return {}
        if isinstance(weighting, SelfPacedWeighting):
            return dict.fromkeys(names, weighting)
        if isinstance(weighting, Mapping):
            unknown = sorted(set(weighting) - set(names))
            if unknown:
                raise ValueError(f"`weighting` names levels {unknown} that are not in the levels {names}")
            for name, w in weighting.items():
                if not isinstance(w, SelfPacedWeighting):
                    raise TypeError(
                        f"Expected `weighting[{name!r}]` to be a SelfPacedWeighting, got {type(w).__name__}"
                    )
            return dict(weighting)
        raise TypeError(f"Expected `weighting` to be a SelfPacedWeighting, a mapping or None, got {type(weighting)}")

    def step(self, n: int = 1) -> None:
        """Advance the pace of every self-paced weighting by ``n`` steps (once per training step).

        Raises:
            TypeError: ``n`` not an int (a bool or ``2.5`` is refused, not truncated).
            ValueError: ``n`` < 0 (the pace never moves backwards).
        """
        check_steps("n", n)
        unique: dict[int, SelfPacedWeighting] = {id(w): cast(SelfPacedWeighting, w) for w in self.weightings.values()}
        for weighting in unique.values():
            weighting.step(n)

    def _level_options(self) -> tuple[list[Any], Any]:
        negative: list[Any] = []
        anchor_fns: dict[str, SelfPacedWeighting] = {}
        for level in self.levels:
            weighting = cast(SelfPacedWeighting, self.weightings[level.name]) if level.name in self.weightings else None
            negative.append(weighting if weighting is not None and weighting.target == "negatives" else None)
            if weighting is not None and weighting.target == "anchors":
                anchor_fns[level.name] = weighting
        if not anchor_fns:
            return negative, None
        if len({id(w) for w in anchor_fns.values()}) > 1 or len(anchor_fns) != len(self.levels):
            raise ValueError("Anchor weighting must be one SelfPacedWeighting shared by all levels")
        return negative, next(iter(anchor_fns.values()))

    @torch.no_grad()
    def _search_bank(
        self, embeddings: Tensor, tags: ViewTags
    ) -> tuple[tuple[Tensor, ViewTags] | None, list[Tensor | None] | None]:
        """Each level's ``(N, k)`` bank candidates and the compact bank of their unique hits.

        One path for a single process and for ``gather_distributed=True``: every level with bank
        negatives searches the index (under DDP all ranks' shards, a collective, the same gathered
        batch on every rank) for its anchors; then the unique hits of all levels are fetched once
        (from the local buffer, or from their shards) onto the embeddings' device, and the
        candidates index that ``(U, D)`` bank (``-1`` = padding; rows of non-anchors all ``-1``).
        The cost is ``O(N k D)``, whatever the index's capacity.
        """
        if self.index is None:
            raise ValueError("This loss has no `index` to search")
        search: Callable[..., Any]
        gather: Callable[[list[Any]], tuple[Tensor, ViewTags, list[Tensor]]]
        if self.gather_distributed:
            from mlcl_losses.distributed import DistributedHardNegativeIndex

            sharded = DistributedHardNegativeIndex(self.index, self.process_group)
            search = functools.partial(sharded.search, replicated=True)
            gather = functools.partial(sharded.gather_hits, replicated=True)
        else:
            if len(self.index) == 0:
                return None, None
            search, gather = self.index.search, functools.partial(_gather_hits, self.index)
        results, rows_per_level = [], []
        for level in self.levels:
            rows = level.anchors(tags).nonzero()[:, 0]
            if not (level.bank_negatives and rows.numel() > 0):
                continue
            results.append(
                search(
                    embeddings.detach()[rows],
                    self.k,
                    negatives=level,
                    exclude_source=tags.source[rows],
                    exclude_image=None if tags.image is None else tags.image[rows],
                    exclude_label=None if (not level.needs_label or tags.label is None) else tags.label[rows],
                )
            )
            rows_per_level.append((level.name, rows))
        if not results:
            return None, None
        bank, bank_tags, found = gather(results)
        if bank.shape[0] == 0:
            return None, None
        by_level = {name: (rows, cand) for (name, rows), cand in zip(rows_per_level, found, strict=True)}
        candidates: list[Tensor | None] = []
        for level in self.levels:
            cand = torch.full((embeddings.shape[0], self.k), -1, dtype=torch.long, device=embeddings.device)
            if level.name in by_level:
                rows, hits = by_level[level.name]
                cand[rows] = hits.to(cand.device)
            candidates.append(cand)
        return (bank.to(embeddings.device), bank_tags.to(embeddings.device)), candidates

    def forward(
        self,
        embeddings: Tensor,
        tags: ViewTags,
        keys: Tensor | None = None,
        key_tags: ViewTags | None = None,
    ) -> tuple[Tensor, dict[str, LevelStats]]:
        """Loss and per-level statistics.

        Args:
            embeddings: ``(N, D)`` float, the batch.
            tags: ``(N,)`` tags of the batch.
            keys: ``(N', D)`` embeddings to enqueue into the index after the loss (e.g. from a
                momentum encoder); requires ``index``.
            key_tags: ``(N',)`` tags of ``keys`` (default: ``tags``, when ``N' == N``).

        With ``gather_distributed=True`` these are this rank's part of the batch (``N`` may differ
        between ranks); the loss is over the gathered batch and ``keys`` go to the local shard.

        Returns:
            ``(loss, stats)`` as :func:`~mlcl_losses.functional.multilevel_info_nce`.

        Raises:
            RuntimeError: with ``gather_distributed=True`` outside an initialised process group.
            ValueError: ``keys`` without an ``index``, ``key_tags`` without ``keys``, ``keys`` without
                ``key_tags`` whose length is not ``N``, or ``embeddings`` / ``keys`` whose dimension is
                not the index's ``dim`` (checked even while the index is empty); and every error of
                :func:`~mlcl_losses.functional.multilevel_info_nce`.

        With float16 embeddings of tiny norm and a small temperature, the gradient (of size
        ``1 / (temperature * norm)``) can exceed float16's range (65504) and become inf: that is
        what mixed-precision training's ``torch.amp.GradScaler`` is for (it skips such steps and
        lowers the scale).
        """
        self._check_index_inputs(embeddings, tags, keys, key_tags)
        negative_weights, anchor_weights = self._level_options()
        local_tags = tags
        if self.gather_distributed:
            from mlcl_losses.distributed import gather_batch, ids_shared_across_ranks

            gathered = gather_batch(embeddings, tags, self.process_group)
            embeddings, tags = gathered.embeddings, gathered.tags
            if not self._warned_shared_ids:
                shared = ids_shared_across_ranks(tags, gathered.sizes)
                if shared:
                    self._warned_shared_ids = True
                    logger.warning(
                        "%s ids occur on several ranks: if they name different patches (images), ids are "
                        "rank-local; make them globally unique (mlcl_losses.distributed.offset_ids_by_rank)",
                        " and ".join(shared),
                    )
        bank: tuple[Tensor, ViewTags] | None = None
        candidates: list[Tensor | None] | None = None
        if self.index is not None:
            bank, candidates = self._search_bank(embeddings, tags)
        loss, stats = loss_with_options(
            embeddings,
            tags,
            self.levels,
            self.options,
            bank=bank,
            candidates=candidates,
            negative_weights=negative_weights,
            anchor_weights=anchor_weights,
            path_log=self._path_log,
        )
        if embeddings.shape[0] and not bool(torch.stack([s.anchors for s in stats.values()]).any()):
            log = logger.debug if self._warned_no_anchor else logger.warning
            self._warned_no_anchor = True
            log(
                "%s: no level has an anchor with a positive and a negative in this batch of %d embeddings "
                "(levels %s), so the loss is 0 and has no gradient; check the tags (several sources per batch, "
                "the views each level needs). (Logged as a warning once per loss.)",
                type(self).__name__,
                embeddings.shape[0],
                [level.name for level in self.levels],
            )
        if keys is not None and self.index is not None:
            self.index.add(keys.detach(), local_tags if key_tags is None else key_tags)
        return loss, stats

    def _check_index_inputs(self, embeddings: Tensor, tags: ViewTags, keys: Tensor | None, key_tags: object) -> None:
        """``keys`` / ``key_tags`` and the dimension the index holds, checked before any work (an empty index too)."""
        if key_tags is not None and keys is None:
            raise ValueError(
                "`key_tags` were given without `keys`: they tag the keys to enqueue into the index; pass `keys` too"
            )
        if self.index is None:
            if keys is not None:
                raise ValueError("`keys` are enqueued into the index, but this loss has no `index`")
            return
        dim = self.index.dim
        for name, value in (("embeddings", embeddings), ("keys", keys)):
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape[1] != dim:
                raise ValueError(
                    f"Expected `{name}` of dimension {dim} (the `dim` of the loss's index), but got shape "
                    f"{tuple(value.shape)}"
                )
        if isinstance(keys, Tensor) and key_tags is None and isinstance(tags, ViewTags) and keys.shape[0] != len(tags):
            raise ValueError(
                f"`keys` without `key_tags` take the batch's `tags`, so they need as many rows ({len(tags)}), "
                f"but got {keys.shape[0]}; pass `key_tags`"
            )

    def extra_repr(self) -> str:
        """Levels and temperature."""
        extra = ", gather_distributed=True" if self.gather_distributed else ""
        return f"levels={[level.name for level in self.levels]}, temperature={self.temperature}{extra}"


def _gather_hits(index: HardNegativeIndex, results: list[Any]) -> tuple[Tensor, ViewTags, list[Tensor]]:
    """The unique hits of some searches of one index: ``(bank (U, D), bank_tags (U,), candidates)``.

    The single-process counterpart of
    :meth:`~mlcl_losses.distributed.DistributedHardNegativeIndex.gather_hits`: only the ``U``
    rows the results name are read (on the index's device), and each result's ``(N_i, k)`` slot
    indices become indices into them (``-1`` where padded).
    """
    slots = [result.indices for result in results]
    flat = torch.cat([s.reshape(-1) for s in slots])
    used = torch.unique(flat[flat >= 0])  # (U,) sorted slots
    candidates = [torch.where(s >= 0, torch.searchsorted(used, s.clamp_min(0)), -1) for s in slots]
    return index.embeddings[used], index.tags[used], candidates
