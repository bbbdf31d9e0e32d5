"""Helpers of the index tests: random tags, a float64 brute-force search, filled indexes, the backends to run."""

from __future__ import annotations

import math

import pytest
import torch

from mlcl_losses.index import HardNegativeIndex, SearchResult, faiss_available
from mlcl_losses.levels import Select
from mlcl_losses.tags import ViewTags

HAS_FAISS = faiss_available()
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("faiss", id="faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")),
]


def random_tags(n: int, gen: torch.Generator, *, n_sources: int = 10, label: bool = True, image: bool = True):
    return ViewTags(
        kind=torch.randint(0, 2, (n,), generator=gen),
        quality=torch.randint(0, 2, (n,), generator=gen),
        source=torch.randint(0, n_sources, (n,), generator=gen),
        label=torch.randint(0, 3, (n,), generator=gen) if label else None,
        image=torch.randint(0, n_sources // 2 + 1, (n,), generator=gen) if image else None,
    )


def brute_force(
    bank: torch.Tensor,
    bank_tags: ViewTags,
    queries: torch.Tensor,
    k: int,
    select: Select | None = None,
    exclude_source: torch.Tensor | None = None,
    exclude_image: torch.Tensor | None = None,
    exclude_label: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, M)`` float64 similarities with disallowed entries at -inf (bank and queries already normalised)."""
    sims = queries.double() @ bank.double().T
    allowed = torch.ones_like(sims, dtype=torch.bool)
    if select is not None:
        allowed &= select(bank_tags)[None, :]
    for q, b in (
        (exclude_source, bank_tags.source),
        (exclude_image, bank_tags.image),
        (exclude_label, bank_tags.label),
    ):
        if q is not None:
            allowed &= q[:, None] != b[None, :]
    return sims.masked_fill(~allowed, -math.inf)


def assert_matches_brute_force(result: SearchResult, ref_sims: torch.Tensor, k: int, atol: float = 1e-5) -> None:
    """Same hits as brute force up to exact ties; padding where fewer than k entries are allowed."""
    sims, idx = result.similarities.cpu(), result.indices.cpu()
    assert sims.dtype == torch.float32
    assert idx.dtype == torch.int64
    assert sims.shape == idx.shape == (ref_sims.shape[0], k)
    ref_top = torch.topk(ref_sims, min(k, ref_sims.shape[1]), dim=1).values.float()
    n_allowed = torch.isfinite(ref_sims).sum(dim=1)
    for row in range(sims.shape[0]):
        n_hit = min(k, int(n_allowed[row]))
        # padding: -inf and -1, never garbage
        assert torch.isneginf(sims[row, n_hit:]).all()
        assert (idx[row, n_hit:] == -1).all()
        hits = idx[row, :n_hit]
        assert (hits >= 0).all()
        assert len(set(hits.tolist())) == n_hit, "duplicate hits"
        # every hit is allowed and carries its true similarity ...
        true = ref_sims[row, hits].float()
        assert torch.isfinite(true).all(), "a disallowed entry was returned"
        torch.testing.assert_close(sims[row, :n_hit], true, atol=atol, rtol=0)
        # ... and the similarities are exactly the top n_hit allowed ones (same ids up to ties)
        torch.testing.assert_close(sims[row, :n_hit], ref_top[row, :n_hit], atol=atol, rtol=0)


def filled_index(backend: str, device: torch.device, n: int, capacity: int, dim: int = 16, seed: int = 0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    index = HardNegativeIndex(dim, capacity, device=device, backend=backend, **kwargs)
    x = torch.randn(n, dim, generator=gen)
    tags = random_tags(n, gen)
    index.add(x, tags)
    return index, gen


def bank_of(index: HardNegativeIndex) -> tuple[torch.Tensor, ViewTags]:
    size = len(index)
    return index.embeddings[:size].float().cpu(), index.tags[:size].to("cpu")
