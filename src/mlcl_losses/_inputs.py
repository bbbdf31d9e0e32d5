"""Validation and preparation of the loss's tensor inputs: embeddings, tags, bank, candidates, pair masks.

Every check names the argument, the expectation and the value. :func:`normalize_embeddings` is
public as :func:`mlcl_losses.functional.normalize_embeddings`.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from mlcl_losses.tags import ViewTags

__all__ = [
    "check_candidates",
    "check_pair_mask",
    "check_tags",
    "compute_dtype",
    "normalize_embeddings",
    "per_level",
    "prepare_bank",
]


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_embeddings(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    """Validate and L2-normalise rows, in float32 (float64 stays float64).

    Args:
        embeddings: ``(N, D)`` floating point, finite, no all-zero row.
        name: argument name used in error messages.

    Returns:
        ``(N, D)`` unit rows. Rows are first divided by their largest absolute entry,
        so huge or tiny (but non-zero) inputs neither overflow nor underflow.

    Raises:
        TypeError: if not a floating-point tensor.
        ValueError: wrong rank, ``D = 0``, NaN/inf, a zero row, or, when ``embeddings`` requires a
            gradient, a row whose largest absolute entry is below the smallest normal number of its
            dtype (``torch.finfo(dtype).tiny``, 1.2e-38 for float32): the gradient of
            ``x / ||x||`` is of size ``1 / ||x||`` and would overflow to inf. Without a gradient such rows
            are normalised as usual.
    """
    if not isinstance(embeddings, Tensor) or not embeddings.dtype.is_floating_point:
        got = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise TypeError(f"Expected `{name}` to be a floating-point tensor, but got {got}")
    if embeddings.dim() != 2:
        raise ValueError(f"Expected `{name}` of shape (N, D), but got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"Expected `{name}` of shape (N, D) with D >= 1, but got shape {tuple(embeddings.shape)}")
    if embeddings.numel() == 0:
        return embeddings.to(compute_dtype(embeddings))
    x = embeddings.to(compute_dtype(embeddings))
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"Expected finite `{name}`, but row {row} contains NaN or inf")
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    if bool((scale == 0).any()):
        row = int((scale[:, 0] == 0).nonzero()[0, 0])
        raise ValueError(f"Expected non-zero rows in `{name}` (cosine similarity is undefined), but row {row} is zero")
    tiny = torch.finfo(embeddings.dtype).tiny
    if embeddings.requires_grad and torch.is_grad_enabled() and bool((scale < tiny).any()):
        row = int((scale[:, 0] < tiny).nonzero()[0, 0])
        raise ValueError(
            f"Expected the rows of `{name}` to have a largest absolute entry of at least {tiny:.3g} (the smallest "
            f"normal {embeddings.dtype}) when a gradient is needed, but row {row} has {float(scale[row, 0]):.3g}: "
            f"the gradient of the normalised row is of size 1/norm and would overflow to inf"
        )
    x = x / scale
    return x / x.norm(dim=1, keepdim=True)


def check_tags(tags: object, n: int, name: str) -> None:
    if not isinstance(tags, ViewTags):
        raise TypeError(f"Expected `{name}` to be a ViewTags, but got {type(tags).__name__}")
    if tags.kind.dim() != 1 or len(tags) != n:
        raise ValueError(f"`embeddings` and `{name}` must have the same length, got {n} and {tuple(tags.shape)}")


def per_level(values: object, n_levels: int, name: str) -> list:
    """Broadcast a per-level option: one value for all levels, or a sequence of one per level."""
    if isinstance(values, (list, tuple)):
        if len(values) != n_levels:
            raise ValueError(f"Expected `{name}` to have one entry per level ({n_levels}), but got {len(values)}")
        return list(values)
    return [values] * n_levels


def check_candidates(candidates: list[Tensor | None], n: int, m: int) -> None:
    for cand in candidates:
        if cand is None:
            continue
        if not isinstance(cand, Tensor) or cand.dtype not in (torch.int64, torch.int32) or cand.dim() != 2:
            raise TypeError("Expected `candidates` to be an int64 tensor of shape (N, k)")
        if cand.shape[0] != n:
            raise ValueError(f"Expected `candidates` with {n} rows (one per embedding), but got {cand.shape[0]}")
        if cand.numel() and (int(cand.min()) < -1 or int(cand.max()) >= m):
            bad = int(cand.min()) if int(cand.min()) < -1 else int(cand.max())
            raise ValueError(
                f"Expected `candidates` in [-1, {m - 1}] (-1 = padding, else a row of the bank of {m} entries), "
                f"but got {bad}"
            )


def check_pair_mask(pair_mask: object, n: int, bank_z: Tensor | None, candidates: list[Tensor | None]) -> None:
    if not (isinstance(pair_mask, (tuple, list)) and len(pair_mask) == 2):
        raise TypeError("Expected `pair_mask` to be a tuple (positives, negatives) of bool tensors or None")
    m = 0 if bank_z is None else bank_z.shape[0]
    whole_bank = all(c is None for c in candidates)
    n_cols = n + (m if whole_bank else max(c.shape[1] for c in candidates if c is not None))
    pos, neg = pair_mask
    allowed_pos = [(n, n), (n, n + m)] if bank_z is not None and whole_bank else [(n, n)]
    for name, mask, shapes in (("positives", pos, allowed_pos), ("negatives", neg, [(n, n_cols)])):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) not in shapes:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"Expected `pair_mask` {name} a bool tensor of shape {' or '.join(map(str, shapes))}, but got {got}"
            )


def prepare_bank(
    raw: object, bank_tags: object, candidates: list[Tensor | None], z: Tensor
) -> tuple[Tensor, ViewTags, list[Tensor | None]]:
    """Validated, normalised bank on ``z``'s device, and the candidates that index it.

    With candidates for every level only the rows they use are read: the bank becomes the
    ``(U, D)`` unique hits and the candidates are renumbered into it, so the cost is
    ``O(N k D)``, never ``O(M)`` (an index's ring buffer may hold millions of slots, unfilled
    ones zero, which no search returns). Otherwise the whole bank is normalised.
    """
    n, d = z.shape
    if not isinstance(raw, Tensor) or raw.dim() != 2:
        raise ValueError(f"Expected bank embeddings of shape (M, D), but got {getattr(raw, 'shape', type(raw))}")
    if raw.shape[1] != d:
        raise ValueError(f"Expected bank embeddings of dimension {d} (as `embeddings`), but got {raw.shape[1]}")
    check_tags(bank_tags, raw.shape[0], "bank tags")
    tags_m = cast(ViewTags, bank_tags)
    check_candidates(candidates, n, raw.shape[0])
    if any(cand is None for cand in candidates):
        return normalize_embeddings(raw.to(z.device), "bank embeddings").to(z.dtype), tags_m.to(z.device), candidates
    distinct = {id(cand): cand for cand in candidates if cand is not None}  # levels may share one tensor
    flat = torch.cat([cand.reshape(-1).to(z.device, torch.int64) for cand in distinct.values()])
    used = torch.unique(flat[flat >= 0])  # (U,) sorted
    renumbered: dict[int, Tensor] = {}
    for key, cand in distinct.items():
        cand = cand.to(z.device, torch.int64)
        renumbered[key] = torch.where(cand >= 0, torch.searchsorted(used, cand.clamp_min(0)), -1)
    out: list[Tensor | None] = [None if cand is None else renumbered[id(cand)] for cand in candidates]
    if used.numel() == 0:  # only padding: a placeholder row that no candidate names
        zero = torch.zeros(1, dtype=torch.int64, device=z.device)
        optional = {name: zero if getattr(tags_m, name) is not None else None for name in ("label", "image")}
        return z.new_zeros(1, d), ViewTags(zero, zero, zero, **optional, validate=False), out
    rows = normalize_embeddings(raw[used.to(raw.device)].to(z.device), "bank embeddings").to(z.dtype)
    return rows, tags_m[used.to(tags_m.device)].to(z.device), out
