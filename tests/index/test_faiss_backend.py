"""The FAISS backend (mlcl_losses.index.faiss_backend): IVF, blockwise filtered search, GPU limit, errors."""

from __future__ import annotations

import pytest
import torch
from index_cases import HAS_FAISS, assert_matches_brute_force, bank_of, brute_force, filled_index, random_tags

from mlcl_losses.index import HardNegativeIndex, faiss_gpu_available
from mlcl_losses.levels import Select


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_ivf_recall_and_filters() -> None:
    # Clustered data, every list probed: IVF must equal exact search; with few probes, high recall.
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(20, 16, generator=gen)
    x = centers[torch.randint(0, 20, (2000,), generator=gen)] + 0.3 * torch.randn(2000, 16, generator=gen)
    tags = random_tags(2000, gen)
    ivf = HardNegativeIndex(16, 2000, backend="faiss", ivf_nlist=16, nprobe=16)
    exact = HardNegativeIndex(16, 2000, backend="torch")
    for index in (ivf, exact):
        index.add(x[:1500], tags[:1500])
    q = x[:50] + 0.1 * torch.randn(50, 16, generator=gen)
    qt = random_tags(50, gen)
    kwargs = {"negatives": Select(kind=1), "exclude_source": qt.source, "exclude_label": qt.label}
    a, b = ivf.search(q, 10, **kwargs), exact.search(q, 10, **kwargs)
    torch.testing.assert_close(a.similarities, b.similarities, atol=1e-5, rtol=0)
    # the IVF index follows the ring buffer through wrap-around
    for index in (ivf, exact):
        index.add(x[1500:], tags[1500:])
        index.add(x[:700], tags[:700])
    a, b = ivf.search(q, 10, **kwargs), exact.search(q, 10, **kwargs)
    torch.testing.assert_close(a.similarities, b.similarities, atol=1e-5, rtol=0)
    ivf.nprobe = 2
    ivf._backends.clear()
    ivf._backend_for(ivf.embeddings)
    a = ivf.search(q, 10)
    b = exact.search(q, 10)
    recall = (
        sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a.indices, b.indices, strict=True))
        / b.indices.numel()
    )
    assert recall > 0.8
    assert (a.tags.kind[a.indices >= 0] >= 0).all()


def test_missing_faiss_names_package_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"pip install mlcl-losses\[faiss\].*backend='torch'"):
        HardNegativeIndex(4, 10, backend="faiss")
    assert HardNegativeIndex(4, 10, backend="auto").backend_name == "torch"


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_cpu_needs_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        HardNegativeIndex(4, 10, backend="faiss", dtype=torch.float16)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"chunk{c}")
def test_faiss_blockwise_filtered_search_equals_one_block(chunk: int) -> None:
    """The FAISS CPU filtered search gathers the allowed entries block by block; the hits are those of
    one search over the whole sub-bank (same ids in the same order, same similarities), with tag
    predicates, source / image / label exclusions, over-fetch refills and fewer allowed than k."""
    size, n, dim = 300, 37, 8
    gen = torch.Generator().manual_seed(chunk)
    x, tags = torch.randn(size, dim, generator=gen), random_tags(size, gen, n_sources=40)
    whole = HardNegativeIndex(dim, size, backend="faiss")  # default block (131072 rows) holds the whole bank
    blocks = HardNegativeIndex(dim, size, backend="faiss", chunk_size=chunk)
    whole.add(x, tags)
    blocks.add(x, tags)
    q, qtags = torch.randn(n, dim, generator=gen), random_tags(n, gen, n_sources=40)
    cases = [
        (Select(kind=0), {"exclude_source": qtags.source}),
        (Select(kind=1, quality=1), {"exclude_source": qtags.source, "exclude_image": qtags.image}),
        (Select(quality=0), {"exclude_source": qtags.source, "exclude_label": qtags.label}),
        (Select(kind=1, quality=0), {}),
    ]
    for select, kwargs in cases:
        for k in (10, 200):  # 200 > the allowed entries of some rows: padded
            a = whole.search(q, k, negatives=select, **kwargs)
            b = blocks.search(q, k, negatives=select, **kwargs)
            assert torch.equal(a.indices, b.indices), (select, list(kwargs), k)
            torch.testing.assert_close(a.similarities, b.similarities, atol=1e-6, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not faiss_gpu_available(), reason="faiss has no GPU")
def test_faiss_gpu_over_2048_falls_back_exactly() -> None:
    index, gen = filled_index("faiss", torch.device("cuda"), n=5000, capacity=5000)
    q = torch.randn(8, 16, generator=gen).cuda()
    result = index.search(q, 3000, exclude_source=torch.zeros(8, dtype=torch.long, device="cuda"))
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(q.cpu(), dim=1), 3000, exclude_source=torch.zeros(8))
    assert_matches_brute_force(result, ref, 3000)
