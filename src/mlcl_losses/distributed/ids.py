"""Globally unique ``source`` and ``image`` ids once a batch spans ranks.

``source`` and ``image`` tags decide positives and which pairs may never be negatives, so an id
must name the same patch (image) on every rank. :func:`offset_ids_by_rank` makes rank-local ids
distinct; :func:`ids_shared_across_ranks` finds ids that occur on several ranks of a gathered batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mlcl_losses.distributed.collectives import ProcessGroup, check_tags, process_group_info
from mlcl_losses.tags import MAX_IMAGE, MAX_SOURCE, ViewTags

__all__ = ["ids_shared_across_ranks", "offset_ids_by_rank"]


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
    check_tags(tags, None, "offset_ids_by_rank")
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
