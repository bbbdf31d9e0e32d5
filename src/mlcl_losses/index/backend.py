"""The one interface of the index's search backends, and the top-k helpers they share.

A backend (:class:`~mlcl_losses.index.torch_backend.TorchBackend`,
:class:`~mlcl_losses.index.faiss_backend.FaissBackend`) searches the valid prefix ``[0, size)`` of
the bank for ``(N, D)`` queries under a :class:`~mlcl_losses.index.filters.SearchFilter` and
returns ``(N, k)`` float32 similarities and int64 slot indices, best first, padded with ``-inf`` /
``-1`` where fewer than ``k`` entries are allowed (:func:`pad_hits`). Every backend is exact under
the filter (the FAISS IVF option excepted, which is approximate by design).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from mlcl_losses.index.filters import SearchFilter

__all__ = ["SearchBackend", "merge_topk", "pad_hits"]


class SearchBackend(Protocol):
    """What :class:`~mlcl_losses.index.HardNegativeIndex` asks of a backend."""

    name: str

    def search(self, bank: Tensor, queries: Tensor, k: int, flt: SearchFilter) -> tuple[Tensor, Tensor]:
        """``(N, k)`` float32 similarities and int64 slots of the ``k`` best allowed entries of ``bank``."""
        ...


def merge_topk(
    best_s: Tensor | None, best_i: Tensor | None, sims: Tensor, idx: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge a running ``(N, k)`` top-k with new candidates ``(N, c)`` (both sorted or not)."""
    if best_s is None or best_i is None:
        s, i = sims, idx
    else:
        s, i = torch.cat([best_s, sims], dim=1), torch.cat([best_i, idx], dim=1)
    kk = min(k, s.shape[1])
    top_s, pos = torch.topk(s, kk, dim=1)
    return top_s, torch.gather(i, 1, pos)


def pad_hits(sims: Tensor | None, idx: Tensor | None, n: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pad a top-k result to ``(n, k)`` with ``-inf`` / ``-1``; entries at ``-inf`` get index ``-1``."""
    out_s = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
    out_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
    if sims is not None and idx is not None and sims.shape[1] > 0:
        c = min(k, sims.shape[1])
        out_s[:, :c] = sims[:, :c].float()
        out_i[:, :c] = idx[:, :c]
    out_i[torch.isneginf(out_s)] = -1
    return out_s, out_i
