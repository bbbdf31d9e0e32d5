"""The building blocks of the distributed helpers: process-group checks, padded all-gathers, tags as rows.

Used by :mod:`mlcl_losses.distributed.gather`, :mod:`mlcl_losses.distributed.ids` and
:mod:`mlcl_losses.distributed.sharded_index`. Every rank must make the same calls in the same
order (they are collectives). A gather first all-gathers a small int64 *header* (sizes, number of
dimensions, row size, dtype code, which optional tags are given) so that inconsistent inputs are
refused on every rank alike instead of leaving a rank waiting; rows of unequal sizes are padded to
the largest part, gathered and trimmed, which the gloo backend's ``all_gather`` does not do by
itself. Tags travel as one ``(N, 5)`` int64 matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mlcl_losses.tags import ViewTags

__all__ = [
    "DTYPES",
    "TAG_FIELDS",
    "AllGatherWithGrad",
    "ProcessGroup",
    "all_gather_header",
    "all_gather_rows",
    "check_header",
    "check_shapes",
    "check_tags",
    "dtype_code",
    "optional_flags",
    "process_group_info",
    "tag_matrix",
    "tags_from_matrix",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup; None = the default (WORLD) group

#: The tag fields in the order of the columns of :func:`tag_matrix`.
TAG_FIELDS = ("kind", "quality", "source", "label", "image")
#: The dtypes a header names by their position (:func:`dtype_code`).
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
)


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


def dtype_code(dtype: torch.dtype) -> int:
    """Position of ``dtype`` in :data:`DTYPES` (``-1`` for any other dtype), as a header carries it."""
    return DTYPES.index(dtype) if dtype in DTYPES else -1


def all_gather_rows(x: Tensor, sizes: Sequence[int], group: ProcessGroup) -> Tensor:
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


def all_gather_header(values: Sequence[int], device: torch.device, group: ProcessGroup) -> Tensor:
    """``(world_size, len(values))`` int64: every rank's ``values``."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu()


class AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows; backward all-reduces (sums) the gradient and returns this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup) -> Tensor:
        """Every rank's rows (``sizes[r]`` each) concatenated in rank order."""
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        """The sum over ranks of the gradients of the gathered rows, at this rank's rows."""
        total = grad.contiguous().clone()  # (sum(sizes), ...): every rank's gradient of its own loss
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.start : ctx.stop], None, None, None


def check_header(header: Tensor, names: Sequence[str], what: str) -> None:
    """Columns ``names`` of the gathered header must agree across ranks (raised on every rank alike)."""
    for column, name in enumerate(names):
        values = header[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"{what}: every rank must pass the same {name}, but the ranks have {values}")


def check_shapes(header: Tensor, what: str) -> None:
    """Header columns: size, ndim, row numel (-1 when empty), dtype code."""
    check_header(header[:, 1:2], ["number of dimensions"], what)
    row = [v for v in header[:, 2].tolist() if v >= 0]
    if len(set(row)) > 1:
        raise ValueError(f"{what}: every rank's rows must have the same size, but the ranks have {row}")
    codes = header[:, 3].tolist()
    if len(set(codes)) > 1:
        names = [str(DTYPES[c]) if c >= 0 else "other" for c in codes]
        raise ValueError(f"{what}: every rank must pass the same dtype, but the ranks have {names}")


# ---------------------------------------------------------------------------------------------- tags


def tag_matrix(tags: ViewTags) -> Tensor:
    """``(N, 5)`` int64: the five tag fields (absent optional fields as 0)."""
    fields = [getattr(tags, name) for name in TAG_FIELDS]
    return torch.stack([torch.zeros_like(tags.kind) if f is None else f for f in fields], dim=1)


def tags_from_matrix(matrix: Tensor, has_label: bool, has_image: bool) -> ViewTags:
    """Inverse of :func:`tag_matrix`: ``(N,)`` tags, ``label`` / ``image`` only where present (not validated)."""
    return ViewTags(
        matrix[:, 0],
        matrix[:, 1],
        matrix[:, 2],
        matrix[:, 3] if has_label else None,
        matrix[:, 4] if has_image else None,
        validate=False,
    )


def check_tags(tags: ViewTags, n: int | None, what: str) -> None:
    """Refuse anything but ``(N,)`` :class:`~mlcl_losses.tags.ViewTags` (of length ``n`` when given)."""
    if not isinstance(tags, ViewTags):
        raise TypeError(f"Expected `tags` to be a ViewTags, but got {type(tags).__name__}")
    if tags.kind.dim() != 1:
        raise ValueError(f"Expected `tags` of shape (N,), but got {tuple(tags.shape)}")
    if n is not None and len(tags) != n:
        raise ValueError(f"{what}: `embeddings` and `tags` must have the same length, got {n} and {len(tags)}")


def optional_flags(header: Tensor, label_col: int, what: str) -> tuple[bool, bool]:
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
