"""A hard-negative index sharded over ranks, searched as one.

Each rank keeps its own :class:`~mlcl_losses.index.HardNegativeIndex` (the keys it produced);
:class:`DistributedHardNegativeIndex` searches every shard and merges the per-shard top-k into the
global top-k. The exclusion rules are per entry, so the global top-k is always among the per-shard
top-k's: the merged result equals one index holding all entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mlcl_losses.distributed.collectives import (
    TAG_FIELDS,
    ProcessGroup,
    all_gather_header,
    all_gather_rows,
    check_header,
    check_shapes,
    dtype_code,
    process_group_info,
    tag_matrix,
    tags_from_matrix,
)
from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import ViewTags

__all__ = ["DistributedHardNegativeIndex", "DistributedSearchResult"]

_SLOT_BITS = 40  # a hit's key is rank << 40 | slot


class DistributedSearchResult(NamedTuple):
    """Hits of :meth:`DistributedHardNegativeIndex.search`, best first, merged over all shards.

    Attributes:
        similarities: ``(N, k)`` float32; ``-inf`` where padded.
        ranks: ``(N, k)`` int64, the rank whose shard holds the hit; ``-1`` where padded.
        indices: ``(N, k)`` int64 slot in that rank's shard; ``-1`` where padded.
        tags: ``(N, k)`` tags of the hits; ``-1`` in every field where padded.
        embeddings: ``(N, k, D)`` embeddings of the hits (zeros where padded) when asked for, else None.
    """

    similarities: Tensor
    ranks: Tensor
    indices: Tensor
    tags: ViewTags
    embeddings: Tensor | None = None


class DistributedHardNegativeIndex(nn.Module):
    """A :class:`~mlcl_losses.index.HardNegativeIndex` sharded over ranks, searched as one.

    Every rank wraps its own shard, adds its own keys to it (:meth:`add`, no communication), and
    calls :meth:`search` collectively. A search runs on every shard with the same queries,
    all-gathers the per-shard top-k (similarities, ranks, slots, tags) and merges them into the
    global top-k with a stable sort (ties: lower rank, then the shard's own order), so every rank
    gets the same result. The tag filters and exclusions are applied per entry in each shard, so
    the merged result equals the search of one index holding all shards' entries. Hit embeddings
    are fetched from their owners only for the unique hits (:meth:`gather_hits`).

    Args:
        shard: this rank's index.
        group: process group (default: the default group).

    ``state_dict()`` holds this rank's shard only: save it per rank (e.g. ``index_rank{r}.pt``).
    """

    def __init__(self, shard: HardNegativeIndex, group: ProcessGroup = None) -> None:
        super().__init__()
        if not isinstance(shard, HardNegativeIndex):
            raise TypeError(f"Expected `shard` to be a HardNegativeIndex, but got {type(shard).__name__}")
        self.shard = shard
        self.group = group

    def add(self, embeddings: Tensor, tags: ViewTags) -> None:
        """Add this rank's keys to its own shard.

        No communication; see :meth:`~mlcl_losses.index.HardNegativeIndex.add`.

        Raises:
            RuntimeError: no process group is initialised (the shard would be filled, but every
                search, a collective, would fail later); use a plain
                :class:`~mlcl_losses.index.HardNegativeIndex` in a single process.
        """
        process_group_info(self.group, "DistributedHardNegativeIndex.add")
        self.shard.add(embeddings, tags)

    def global_len(self) -> int:
        """Number of entries in all shards together (a collective: call it on every rank)."""
        process_group_info(self.group, "DistributedHardNegativeIndex.global_len")
        header = all_gather_header([len(self.shard)], self.shard.embeddings.device, self.group)
        return int(header.sum())

    @torch.no_grad()
    def search(
        self,
        queries: Tensor,
        k: int,
        negatives: Select | Level | None = None,
        exclude_source: Tensor | None = None,
        exclude_image: Tensor | None = None,
        exclude_label: Tensor | None = None,
        *,
        replicated: bool = False,
        return_embeddings: bool = False,
    ) -> DistributedSearchResult:
        """The ``k`` most similar allowed entries of all shards for each query (a collective).

        Args:
            queries: ``(N, D)`` float. With ``replicated=False`` each rank passes its own queries
                (they are all-gathered, every shard searches all of them, and each rank gets the
                results of its own rows); with ``replicated=True`` every rank passes the *same*
                queries (e.g. a gathered batch) and no queries are communicated.
            k: hits per query, ``1 <= k <= capacity`` of every shard.
            negatives: which entries may be returned, as in :meth:`~mlcl_losses.index.HardNegativeIndex.search`.
            exclude_source: ``(N,)`` int64 or None, aligned with ``queries``: never return the query's source.
            exclude_image: likewise for the image.
            exclude_label: likewise for the label.
            replicated: whether ``queries`` and the exclusions are identical on every rank.
            return_embeddings: also fetch the hits' embeddings from their shards.

        Returns:
            :class:`DistributedSearchResult` with ``(N, k)`` fields.

        Raises:
            RuntimeError: outside an initialised process group.
        """
        rank, world = process_group_info(self.group, "DistributedHardNegativeIndex.search")
        device = self.shard.embeddings.device
        exclusions = {"source": exclude_source, "image": exclude_image, "label": exclude_label}
        local = slice(0, queries.shape[0] if isinstance(queries, Tensor) else 0)
        if not replicated:
            queries, exclusions, local = self._gather_queries(queries, exclusions, rank)
        hits = self.shard.search(
            queries,
            k,
            negatives,
            exclude_source=exclusions["source"],
            exclude_image=exclusions["image"],
            exclude_label=exclusions["label"],
        )
        n = hits.indices.shape[0]
        ints = torch.stack([hits.indices, *(_tag_matrix_2d(hits.tags))], dim=2)  # (N, k, 6)
        sims = [torch.empty_like(hits.similarities) for _ in range(world)]
        dist.all_gather(sims, hits.similarities.contiguous(), group=self.group)
        parts = [torch.empty_like(ints) for _ in range(world)]
        dist.all_gather(parts, ints.contiguous(), group=self.group)
        all_sims = torch.cat(sims, dim=1)  # (N, W k): rank 0's hits first
        all_ints = torch.cat(parts, dim=1)  # (N, W k, 6)
        all_ranks = torch.arange(world, device=device).repeat_interleave(k).expand(n, -1)
        order = torch.sort(all_sims, dim=1, descending=True, stable=True).indices[:, :k]
        top_sims = torch.gather(all_sims, 1, order)
        top_ints = torch.gather(all_ints, 1, order[:, :, None].expand(-1, -1, all_ints.shape[2]))
        pad = torch.isneginf(top_sims)
        top_ranks = torch.gather(all_ranks, 1, order).masked_fill(pad, -1)
        top_ints = top_ints.masked_fill(pad[:, :, None], -1)
        # Optional tags from the merged hits, so every rank decides alike (an empty shard has no flags):
        # shards that carry a tag give it to every valid hit, shards without it give -1.
        has_label = bool((top_ints[:, :, 4] >= 0).any())
        has_image = bool((top_ints[:, :, 5] >= 0).any())
        tags = ViewTags(
            top_ints[:, :, 1],
            top_ints[:, :, 2],
            top_ints[:, :, 3],
            top_ints[:, :, 4] if has_label else None,
            top_ints[:, :, 5] if has_image else None,
            validate=False,
        )
        result = DistributedSearchResult(top_sims, top_ranks, top_ints[:, :, 0], tags)
        if return_embeddings:
            bank, _, (cand,) = self.gather_hits([result], replicated=True)  # merged results are replicated
            emb = bank[cand.clamp_min(0)].masked_fill((cand < 0)[:, :, None], 0.0)
            result = result._replace(embeddings=emb)
        if not replicated:
            result = DistributedSearchResult(
                result.similarities[local],
                result.ranks[local],
                result.indices[local],
                result.tags[local],
                None if result.embeddings is None else result.embeddings[local],
            )
        return result

    def _gather_queries(
        self, queries: Tensor, exclusions: dict[str, Tensor | None], rank: int
    ) -> tuple[Tensor, dict[str, Tensor | None], slice]:
        """All-gather every rank's queries and exclusion ids; this rank's rows as a slice."""
        if not isinstance(queries, Tensor) or queries.dim() != 2:
            raise ValueError(f"Expected `queries` of shape (N, D), but got {getattr(queries, 'shape', type(queries))}")
        device = self.shard.embeddings.device
        queries = queries.detach().to(device)
        given = [exclusions[name] is not None for name in ("source", "image", "label")]
        header = all_gather_header(
            [queries.shape[0], 2, queries.shape[1], dtype_code(queries.dtype), *given], device, self.group
        )
        check_shapes(header, "DistributedHardNegativeIndex.search")
        check_header(header[:, 4:], ["exclude_source", "exclude_image", "exclude_label"], "search (None or not)")
        sizes = [int(n) for n in header[:, 0]]
        gathered = all_gather_rows(queries, sizes, self.group)
        out: dict[str, Tensor | None] = {}
        for name, is_given in zip(("source", "image", "label"), given, strict=True):
            value = exclusions[name]
            if not is_given or value is None:
                out[name] = None
                continue
            if not isinstance(value, Tensor) or value.shape != (queries.shape[0],):
                raise ValueError(
                    f"`exclude_{name}` and `queries` must have the same length, got "
                    f"{getattr(value, 'shape', type(value))} for {queries.shape[0]} queries"
                )
            out[name] = all_gather_rows(value.to(device=device, dtype=torch.int64), sizes, self.group)
        start = sum(sizes[:rank])
        return gathered, out, slice(start, start + sizes[rank])

    @torch.no_grad()
    def gather_hits(
        self, results: Sequence[DistributedSearchResult], replicated: bool = True
    ) -> tuple[Tensor, ViewTags, list[Tensor]]:
        """The embeddings and tags of the unique hits of some searches, fetched from their shards.

        A collective. Each rank sends the rows of its own shard that any of the results names, once.

        Args:
            results: search results (each ``(N_i, k)``).
            replicated: whether ``results`` are identical on every rank (searches with
                ``replicated=True``); otherwise the requested hits are all-gathered first.

        Returns:
            ``(bank (U, D), bank_tags (U,), candidates)``: the ``U`` unique hits (ordered by rank,
            then slot) and, per result, ``(N_i, k)`` int64 indices into the bank (``-1`` where padded),
            ready for ``multilevel_info_nce(bank=(bank, bank_tags), candidates=...)``.
        """
        rank, world = process_group_info(self.group, "DistributedHardNegativeIndex.gather_hits")
        device = self.shard.embeddings.device
        keys = [torch.where(r.ranks >= 0, (r.ranks << _SLOT_BITS) | r.indices.clamp_min(0), -1) for r in results]
        flat = torch.cat([key.reshape(-1) for key in keys]) if keys else torch.empty(0, dtype=torch.int64)
        flat = flat.to(device)
        wanted = torch.unique(flat[flat >= 0])  # sorted: by rank, then slot
        if not replicated:
            header = all_gather_header([wanted.numel()], device, self.group)
            wanted = torch.unique(all_gather_rows(wanted, [int(n) for n in header[:, 0]], self.group))
        owner = wanted >> _SLOT_BITS
        sizes = [int((owner == r).sum()) for r in range(world)]
        mine = (wanted[owner == rank] & ((1 << _SLOT_BITS) - 1)).long()
        rows = self.shard.embeddings[mine]  # (U_rank, D)
        slot_tags = tag_matrix(self.shard.tags)[mine]  # (U_rank, 5)
        if max(sizes, default=0) == 0:
            bank = self.shard.embeddings.new_zeros(0, self.shard.dim)
            matrix = torch.zeros(0, 5, dtype=torch.int64, device=device)
        else:
            bank = all_gather_rows(rows, sizes, self.group)
            matrix = all_gather_rows(slot_tags, sizes, self.group)
        has_label = any(r.tags.label is not None for r in results)
        has_image = any(r.tags.image is not None for r in results)
        bank_tags = tags_from_matrix(matrix, has_label, has_image)
        candidates = []
        for key in keys:
            key = key.to(device)
            pos = torch.searchsorted(wanted, key.clamp_min(0))
            candidates.append(torch.where(key >= 0, pos, -1))
        return bank, bank_tags, candidates


def _tag_matrix_2d(tags: ViewTags) -> list[Tensor]:
    """The five ``(N, k)`` tag fields of search hits (absent optional fields as -1)."""
    return [torch.full_like(tags.kind, -1) if f is None else f for f in (getattr(tags, n) for n in TAG_FIELDS)]
