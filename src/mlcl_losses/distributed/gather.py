"""Gather a batch from every rank: embeddings with gradients, and their tags.

:func:`torch.distributed.all_gather` returns tensors without a gradient history, so a loss over
the gathered batch would not train the other ranks' rows. :func:`all_gather_with_grad` is an
autograd function whose backward *sums* (all-reduces) the gradient that every rank computed for
the gathered tensor and returns this rank's rows. :func:`gather_batch` gathers embeddings and
tags together; :func:`all_gather_tags` the tags alone.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from mlcl_losses.distributed.collectives import (
    AllGatherWithGrad,
    ProcessGroup,
    all_gather_header,
    all_gather_rows,
    check_shapes,
    check_tags,
    dtype_code,
    optional_flags,
    process_group_info,
    tag_matrix,
    tags_from_matrix,
)
from mlcl_losses.tags import ViewTags

__all__ = ["GatheredBatch", "all_gather_tags", "all_gather_with_grad", "gather_batch"]


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
    header = all_gather_header(
        [x.shape[0], x.dim(), x[0].numel() if x.shape[0] else -1, dtype_code(x.dtype)], x.device, group
    )
    check_shapes(header, "all_gather_with_grad")
    sizes = tuple(int(n) for n in header[:, 0])
    return AllGatherWithGrad.apply(x, sizes, rank, group)


def all_gather_tags(tags: ViewTags, group: ProcessGroup = None) -> ViewTags:
    """All-gather ``(N_r,)`` tags from every rank into ``(sum_r N_r,)`` tags, in rank order.

    ``label`` and ``image`` must be present on every rank or on none.

    Raises:
        RuntimeError: outside an initialised process group.
        ValueError: if the optional tags are present on some ranks only (on every rank).
    """
    process_group_info(group, "all_gather_tags")
    check_tags(tags, None, "all_gather_tags")
    header = all_gather_header([len(tags), tags.label is not None, tags.image is not None], tags.device, group)
    has_label, has_image = optional_flags(header, 1, "all_gather_tags")
    sizes = [int(n) for n in header[:, 0]]
    return tags_from_matrix(all_gather_rows(tag_matrix(tags), sizes, group), has_label, has_image)


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
    check_tags(tags, embeddings.shape[0], "gather_batch")
    if tags.device != embeddings.device:
        raise ValueError(f"`embeddings` and `tags` must be on one device, got {embeddings.device} and {tags.device}")
    header = all_gather_header(
        [
            embeddings.shape[0],
            2,
            embeddings.shape[1],
            dtype_code(embeddings.dtype),
            tags.label is not None,
            tags.image is not None,
        ],
        embeddings.device,
        group,
    )
    check_shapes(header, "gather_batch")
    has_label, has_image = optional_flags(header, 4, "gather_batch")
    sizes = tuple(int(n) for n in header[:, 0])
    gathered = AllGatherWithGrad.apply(embeddings, sizes, rank, group)
    gathered_tags = tags_from_matrix(all_gather_rows(tag_matrix(tags), sizes, group), has_label, has_image)
    start = sum(sizes[:rank])
    return GatheredBatch(gathered, gathered_tags, sizes, rank, slice(start, start + sizes[rank]))
