"""The torch backend of the index: exact chunked ``matmul`` + ``topk``, masked before the top-k.

The bank is searched in chunks of rows with a running top-k merge, so a 4M-entry bank never
allocates ``N x 4M``; disallowed entries are set to ``-inf`` *before* the top-k, so a filter never
drops a true neighbour. CPU and CUDA, float32 / float16 / bfloat16 banks (on CPU the similarities
are computed in float32). The fallback everywhere, and the exact finish of FAISS GPU searches that
need more than :data:`~mlcl_losses.index.FAISS_GPU_MAX_K` hits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlcl_losses.index.backend import merge_topk, pad_hits
from mlcl_losses.index.filters import SearchFilter

__all__ = ["TorchBackend"]


class TorchBackend:
    """Exact chunked ``matmul`` + ``topk`` with masking before the top-k.

    Args:
        chunk_size: bank rows per ``matmul`` block; None: about 64 MiB of float32 similarities per block.
    """

    name = "torch"

    def __init__(self, chunk_size: int | None) -> None:
        self.chunk_size = chunk_size

    def _chunk_rows(self, n_queries: int, size: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # Keep the (N, chunk) float32 similarity block around 64 MiB.
        rows = (1 << 24) // max(1, n_queries)
        return int(min(max(rows, 1024), 1 << 16, max(size, 1)))

    def search(self, bank: Tensor, queries: Tensor, k: int, flt: SearchFilter) -> tuple[Tensor, Tensor]:
        """``(N, k)`` float32 similarities and int64 slots of the ``k`` best allowed entries of ``bank``."""
        size, n = bank.shape[0], queries.shape[0]
        compute_dtype = bank.dtype if bank.is_cuda else torch.float32
        q = queries.to(compute_dtype)
        exclusions = list(flt.exclusions) + ([flt.label] if flt.label is not None else [])
        rows = self._chunk_rows(n, size)
        best_s: Tensor | None = None
        best_i: Tensor | None = None
        for start in range(0, size, rows):
            stop = min(start + rows, size)
            chunk = bank[start:stop].to(compute_dtype)
            sims = (q @ chunk.T).float()  # (N, C)
            if flt.allowed is not None or exclusions:
                keep = torch.ones_like(sims, dtype=torch.bool)
                if flt.allowed is not None:
                    keep &= flt.allowed[None, start:stop]
                for qv, bv in exclusions:
                    keep &= qv[:, None] != bv[None, start:stop]
                sims.masked_fill_(~keep, -math.inf)
            kk = min(k, stop - start)
            top_s, top_pos = torch.topk(sims, kk, dim=1)
            best_s, best_i = merge_topk(best_s, best_i, top_s, top_pos + start, k)
        return pad_hits(best_s, best_i, n, k, queries.device)
