r"""Multi-process training: gather embeddings and tags with gradients, search a sharded index.

Under ``torch.distributed`` (DDP launched by ``torchrun``) every rank holds its own part of the
batch. Contrastive losses want negatives from the *global* batch, so the embeddings and their
:class:`~mlcl_losses.tags.ViewTags` are all-gathered (``docs/architecture.md``, ``docs/distributed.md``).

**Gradients.** :func:`torch.distributed.all_gather` returns tensors without a gradient
history, so a loss over the gathered batch would not train the other ranks' rows.
:func:`all_gather_with_grad` is an autograd function whose backward *sums* (all-reduces) the
gradient that every rank computed for the gathered tensor and returns this rank's rows: the
gradient of :math:`\sum_r L_r` (the sum of all ranks' losses) with respect to the local input.
Ranks may hold different numbers of rows (sizes are gathered first; rows are padded to the
largest part, gathered, and trimmed), which the gloo backend's ``all_gather`` does not allow by
itself. :func:`torch.distributed.nn.functional.all_gather` has the same gradient but needs equal
sizes. Every rank must run the backward pass: it is a collective.

**Ids must be globally unique.** ``source`` and ``image`` tags decide positives and which pairs
may never be negatives, so once the batch spans ranks an id must name the same patch (image) on
every rank: use dataset-wide ids (e.g. the dataset index of the image). If a data pipeline
numbers ids per rank (0, 1, 2, ... on every rank), :func:`offset_ids_by_rank` makes them
distinct (``id * world_size + rank``). ``label`` is a class, shared by all ranks, and is left
as is.

**Sharded index.** Each rank keeps its own :class:`~mlcl_losses.index.HardNegativeIndex` (the
keys it produced); :class:`DistributedHardNegativeIndex` searches every shard and merges the
per-shard top-k into the global top-k. The exclusion rules are per entry, so the global top-k
is always among the per-shard top-k's: the merged result equals one index holding all entries.

Every function here raises :class:`RuntimeError` when no process group is initialised (call
:func:`torch.distributed.init_process_group` first), except :func:`offset_ids_by_rank` with an
explicit ``rank`` and ``world_size``.

.. py:type:: ProcessGroup
   :canonical: typing.Any

   A :class:`torch.distributed.ProcessGroup`, or ``None`` for the default (WORLD) group
   (type alias).

Examples:
    >>> from mlcl_losses.tags import ViewTags
    >>> tags = ViewTags(kind=[1, 0], quality=[0, 0], source=[0, 1], image=[0, 0])
    >>> offset_ids_by_rank(tags, rank=1, world_size=2).source.tolist()
    [1, 3]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import MAX_IMAGE, MAX_SOURCE, ViewTags

__all__ = [
    "DistributedHardNegativeIndex",
    "DistributedSearchResult",
    "GatheredBatch",
    "all_gather_tags",
    "all_gather_with_grad",
    "gather_batch",
    "ids_shared_across_ranks",
    "offset_ids_by_rank",
    "process_group_info",
]

logger = logging.getLogger(__name__)

ProcessGroup = Any  # torch.distributed.ProcessGroup; None = the default (WORLD) group

_TAG_FIELDS = ("kind", "quality", "source", "label", "image")
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
)
_SLOT_BITS = 40  # a hit's key is rank << 40 | slot


# ---------------------------------------------------------------------------------------------- basics


def process_group_info(group: ProcessGroup = None, what: str = "This operation") -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``.

    Args:
        group: a process group, or None for the default group.
        what: named in the error message.

    Raises:
        RuntimeError: if ``torch.distributed`` is unavailable or no process group is initialised.
    """
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this PyTorch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs an initialised torch.distributed process group, but none is: call "
            "torch.distributed.init_process_group(backend=...) first (under torchrun, "
            "init_process_group('nccl') or ('gloo') reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
            "from the environment), or run without the distributed option in a single process"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _all_gather_rows(x: Tensor, sizes: Sequence[int], group: ProcessGroup) -> Tensor:
    """Concatenate every rank's ``x`` (``(sizes[r], ...)``, same trailing shape and dtype) along dim 0.

    Pads each part to the largest, all-gathers, trims. No gradient history.
    """
    largest = max(sizes)
    x = x.detach()
    if largest == 0:
        return x.new_zeros((0, *x.shape[1:]))
    if x.shape[0] < largest:
        x = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def _all_gather_header(values: Sequence[int], device: torch.device, group: ProcessGroup) -> Tensor:
    """``(world_size, len(values))`` int64: every rank's ``values``."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows; backward all-reduces (sums) the gradient and returns this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup) -> Tensor:
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        total = grad.contiguous().clone()  # (sum(sizes), ...): every rank's gradient of its own loss
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.start : ctx.stop], None, None, None


def _check_header(header: Tensor, names: Sequence[str], what: str) -> None:
    """Columns ``names`` of the gathered header must agree across ranks (raised on every rank alike)."""
    for column, name in enumerate(names):
        values = header[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"{what}: every rank must pass the same {name}, but the ranks have {values}")


def all_gather_with_grad(x: Tensor, group: ProcessGroup = None) -> Tensor:
    r"""All-gather ``x`` along dim 0 from every rank, with gradients flowing back to each rank's ``x``.

    Args:
        x: ``(N_r, ...)`` on this rank; ``N_r`` may differ between ranks, the trailing shape and the
            dtype may not.
        group: process group (default: the default group).

    Returns:
        ``(sum_r N_r, ...)``: the ranks' parts in rank order. Its backward all-reduces (sums) the
        incoming gradients of all ranks and returns this rank's rows, i.e. the gradient of
        :math:`\sum_r L_r` with respect to ``x`` when rank ``r`` computes a loss :math:`L_r`.
        When every rank computes the same loss :math:`L` over the gathered rows, ``x`` receives
        :math:`W \cdot \partial L / \partial x` (``W`` = world size), and DDP's averaging of the
        parameter gradients over the ``W`` ranks yields exactly :math:`\partial L / \partial \theta`.

    Raises:
        RuntimeError: outside an initialised process group.
        ValueError: if the ranks' trailing shapes or dtypes differ (on every rank).
    """
    rank, _ = process_group_info(group, "all_gather_with_grad")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(f"Expected `x` to be a tensor of shape (N, ...), but got {getattr(x, 'shape', type(x))}")
    header = _all_gather_header(
        [x.shape[0], x.dim(), x[0].numel() if x.shape[0] else -1, _dtype_code(x.dtype)], x.device, group
    )
    _check_shapes(header, "all_gather_with_grad")
    sizes = tuple(int(n) for n in header[:, 0])
    return _AllGatherWithGrad.apply(x, sizes, rank, group)


def _check_shapes(header: Tensor, what: str) -> None:
    """Header columns: size, ndim, row numel (-1 when empty), dtype code."""
    _check_header(header[:, 1:2], ["number of dimensions"], what)
    row = [v for v in header[:, 2].tolist() if v >= 0]
    if len(set(row)) > 1:
        raise ValueError(f"{what}: every rank's rows must have the same size, but the ranks have {row}")
    codes = header[:, 3].tolist()
    if len(set(codes)) > 1:
        names = [str(_DTYPES[c]) if c >= 0 else "other" for c in codes]
        raise ValueError(f"{what}: every rank must pass the same dtype, but the ranks have {names}")


# ---------------------------------------------------------------------------------------------- tags


def _tag_matrix(tags: ViewTags) -> Tensor:
    """``(N, 5)`` int64: the five tag fields (absent optional fields as 0)."""
    fields = [getattr(tags, name) for name in _TAG_FIELDS]
    return torch.stack([torch.zeros_like(tags.kind) if f is None else f for f in fields], dim=1)


def _tags_from_matrix(matrix: Tensor, has_label: bool, has_image: bool) -> ViewTags:
    return ViewTags(
        matrix[:, 0],
        matrix[:, 1],
        matrix[:, 2],
        matrix[:, 3] if has_label else None,
        matrix[:, 4] if has_image else None,
        validate=False,
    )


def _check_tags(tags: ViewTags, n: int | None, what: str) -> None:
    if not isinstance(tags, ViewTags):
        raise TypeError(f"Expected `tags` to be a ViewTags, but got {type(tags).__name__}")
    if tags.kind.dim() != 1:
        raise ValueError(f"Expected `tags` of shape (N,), but got {tuple(tags.shape)}")
    if n is not None and len(tags) != n:
        raise ValueError(f"{what}: `embeddings` and `tags` must have the same length, got {n} and {len(tags)}")


def _optional_flags(header: Tensor, label_col: int, what: str) -> tuple[bool, bool]:
    """Whether ``label`` / ``image`` tags are present; they must be on every rank or on none."""
    flags = []
    for column, name in ((label_col, "label"), (label_col + 1, "image")):
        values = [bool(v) for v in header[:, column].tolist()]
        if len(set(values)) > 1:
            raise ValueError(
                f"{what}: `tags.{name}` must be given on every rank or on none, but it is given on ranks "
                f"{[r for r, v in enumerate(values) if v]} only"
            )
        flags.append(values[0])
    return flags[0], flags[1]


def all_gather_tags(tags: ViewTags, group: ProcessGroup = None) -> ViewTags:
    """All-gather ``(N_r,)`` tags from every rank into ``(sum_r N_r,)`` tags, in rank order.

    ``label`` and ``image`` must be present on every rank or on none.

    Raises:
        RuntimeError: outside an initialised process group.
        ValueError: if the optional tags are present on some ranks only (on every rank).
    """
    process_group_info(group, "all_gather_tags")
    _check_tags(tags, None, "all_gather_tags")
    header = _all_gather_header([len(tags), tags.label is not None, tags.image is not None], tags.device, group)
    has_label, has_image = _optional_flags(header, 1, "all_gather_tags")
    sizes = [int(n) for n in header[:, 0]]
    return _tags_from_matrix(_all_gather_rows(_tag_matrix(tags), sizes, group), has_label, has_image)


class GatheredBatch(NamedTuple):
    """The global batch as every rank sees it after :func:`gather_batch`.

    Attributes:
        embeddings: ``(N_g, D)``, ``N_g = sum(sizes)``, rank 0's rows first; gradients flow back to
            every rank's own rows (see :func:`all_gather_with_grad`).
        tags: ``(N_g,)`` tags in the same order.
        sizes: rows per rank.
        rank: this process's rank; its rows are ``local``.
        local: ``slice`` of this rank's rows in the gathered batch.
    """

    embeddings: Tensor
    tags: ViewTags
    sizes: tuple[int, ...]
    rank: int
    local: slice


def gather_batch(embeddings: Tensor, tags: ViewTags, group: ProcessGroup = None) -> GatheredBatch:
    """All-gather a batch of embeddings (with gradients) and its tags from every rank.

    Args:
        embeddings: ``(N_r, D)`` float on this rank (``N_r`` may differ between ranks; ``D`` and the
            dtype may not).
        tags: ``(N_r,)`` tags; ``label`` / ``image`` on every rank or on none. Source and image ids
            must be globally unique (see the module docstring and :func:`offset_ids_by_rank`).
        group: process group (default: the default group).

    Returns:
        :class:`GatheredBatch`. Three collectives: a header (sizes, dimension, dtype, optional
        tags), the embeddings and the tags.

    Raises:
        RuntimeError: outside an initialised process group.
        ValueError: if the ranks disagree on ``D``, the dtype or the optional tags (on every rank).
    """
    rank, _ = process_group_info(group, "gather_batch")
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"Expected `embeddings` of shape (N, D), but got {got}")
    _check_tags(tags, embeddings.shape[0], "gather_batch")
    if tags.device != embeddings.device:
        raise ValueError(f"`embeddings` and `tags` must be on one device, got {embeddings.device} and {tags.device}")
    header = _all_gather_header(
        [
            embeddings.shape[0],
            2,
            embeddings.shape[1],
            _dtype_code(embeddings.dtype),
            tags.label is not None,
            tags.image is not None,
        ],
        embeddings.device,
        group,
    )
    _check_shapes(header, "gather_batch")
    has_label, has_image = _optional_flags(header, 4, "gather_batch")
    sizes = tuple(int(n) for n in header[:, 0])
    gathered = _AllGatherWithGrad.apply(embeddings, sizes, rank, group)
    gathered_tags = _tags_from_matrix(_all_gather_rows(_tag_matrix(tags), sizes, group), has_label, has_image)
    start = sum(sizes[:rank])
    return GatheredBatch(gathered, gathered_tags, sizes, rank, slice(start, start + sizes[rank]))


# ---------------------------------------------------------------------------------------------- ids


def offset_ids_by_rank(
    tags: ViewTags,
    rank: int | None = None,
    world_size: int | None = None,
    group: ProcessGroup = None,
) -> ViewTags:
    """Make rank-local ``source`` and ``image`` ids globally unique: ``id * world_size + rank``.

    Use it when a data pipeline numbers patches or images per rank (each rank counting from 0);
    dataset-wide ids need no offset. Apply it to every batch *and* to every key added to an index,
    so that ids in the bank and in the batch agree. ``label`` (a class) is unchanged.

    Args:
        tags: ``(N,)`` tags with rank-local ids.
        rank: this process's rank; default: from ``group``.
        world_size: the number of ranks; default: from ``group``.
        group: process group used when ``rank`` / ``world_size`` are not given.

    Returns:
        New tags with ``source`` and ``image`` mapped to ``id * world_size + rank``.

    Raises:
        RuntimeError: if ``rank`` or ``world_size`` is missing and no process group is initialised.
        ValueError: if ``rank`` is out of range or an offset id exceeds the tag range.

    Examples:
        >>> tags = ViewTags(kind=[1, 1], quality=[0, 1], source=[0, 0])
        >>> [offset_ids_by_rank(tags, rank=r, world_size=4).source.tolist() for r in range(2)]
        [[0, 0], [1, 1]]
    """
    _check_tags(tags, None, "offset_ids_by_rank")
    if rank is None or world_size is None:
        group_rank, group_world = process_group_info(group, "offset_ids_by_rank without `rank` and `world_size`")
        rank = group_rank if rank is None else rank
        world_size = group_world if world_size is None else world_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Expected `world_size` an integer >= 1, but got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not (0 <= rank < world_size):
        raise ValueError(f"Expected `rank` an integer in [0, {world_size}), but got {rank!r}")
    fields: dict[str, Any] = dict(tags.fields())
    for name, upper in (("source", MAX_SOURCE), ("image", MAX_IMAGE)):
        value = fields[name]
        if value is None:
            continue
        shifted = value * world_size + rank
        if shifted.numel() and int(shifted.max()) > upper:
            raise ValueError(
                f"`{name}` ids offset by rank exceed the tag range: {int(value.max())} * {world_size} + {rank} "
                f"> {upper}; use dataset-wide ids instead"
            )
        fields[name] = shifted
    return ViewTags(**fields)


def ids_shared_across_ranks(tags: ViewTags, sizes: Sequence[int]) -> list[str]:
    """Which of ``source`` / ``image`` has an id that occurs on more than one rank of a gathered batch.

    Either views of one patch (image) were split between ranks, which the gathered loss handles,
    or two different patches (images) got the same id, which makes them each other's positives
    (never negatives): the usual cause is rank-local ids (see :func:`offset_ids_by_rank`).

    Args:
        tags: ``(N_g,)`` gathered tags (:attr:`GatheredBatch.tags`).
        sizes: rows per rank (:attr:`GatheredBatch.sizes`).

    Returns:
        The names among ``["source", "image"]`` with ids on several ranks.
    """
    sizes_t = torch.tensor(list(sizes), device=tags.device)
    ranks = torch.repeat_interleave(torch.arange(len(sizes), device=tags.device), sizes_t)
    shared = []
    for name in ("source", "image"):
        ids = getattr(tags, name)
        if ids is None or ids.numel() == 0:
            continue
        pairs = torch.unique(ids * len(sizes) + ranks)
        if pairs.numel() > torch.unique(ids).numel():
            shared.append(name)
    return shared


# ---------------------------------------------------------------------------------------------- index


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
        header = _all_gather_header([len(self.shard)], self.shard.embeddings.device, self.group)
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
        header = _all_gather_header(
            [queries.shape[0], 2, queries.shape[1], _dtype_code(queries.dtype), *given], device, self.group
        )
        _check_shapes(header, "DistributedHardNegativeIndex.search")
        _check_header(header[:, 4:], ["exclude_source", "exclude_image", "exclude_label"], "search (None or not)")
        sizes = [int(n) for n in header[:, 0]]
        gathered = _all_gather_rows(queries, sizes, self.group)
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
            out[name] = _all_gather_rows(value.to(device=device, dtype=torch.int64), sizes, self.group)
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
            header = _all_gather_header([wanted.numel()], device, self.group)
            wanted = torch.unique(_all_gather_rows(wanted, [int(n) for n in header[:, 0]], self.group))
        owner = wanted >> _SLOT_BITS
        sizes = [int((owner == r).sum()) for r in range(world)]
        mine = (wanted[owner == rank] & ((1 << _SLOT_BITS) - 1)).long()
        rows = self.shard.embeddings[mine]  # (U_rank, D)
        slot_tags = _tag_matrix(self.shard.tags)[mine]  # (U_rank, 5)
        if max(sizes, default=0) == 0:
            bank = self.shard.embeddings.new_zeros(0, self.shard.dim)
            matrix = torch.zeros(0, 5, dtype=torch.int64, device=device)
        else:
            bank = _all_gather_rows(rows, sizes, self.group)
            matrix = _all_gather_rows(slot_tags, sizes, self.group)
        has_label = any(r.tags.label is not None for r in results)
        has_image = any(r.tags.image is not None for r in results)
        bank_tags = _tags_from_matrix(matrix, has_label, has_image)
        candidates = []
        for key in keys:
            key = key.to(device)
            pos = torch.searchsorted(wanted, key.clamp_min(0))
            candidates.append(torch.where(key >= 0, pos, -1))
        return bank, bank_tags, candidates


def _tag_matrix_2d(tags: ViewTags) -> list[Tensor]:
    """The five ``(N, k)`` tag fields of search hits (absent optional fields as -1)."""
    return [torch.full_like(tags.kind, -1) if f is None else f for f in (getattr(tags, n) for n in _TAG_FIELDS)]
