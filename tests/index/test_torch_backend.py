"""The torch backend (mlcl_losses.index.torch_backend): chunked search and half-precision banks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from index_cases import assert_matches_brute_force, bank_of, brute_force, filled_index, random_tags

from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Select

# ---------------------------------------------------------------------------------------------- chunking, dtypes


@given(
    n=st.integers(1, 9),
    size=st.integers(1, 60),
    chunk=st.integers(1, 17),
    k=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_torch_chunked_equals_brute_force(n: int, size: int, chunk: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    index = HardNegativeIndex(5, 64, backend="torch", chunk_size=chunk)
    index.add(torch.randn(size, 5, generator=gen), random_tags(size, gen))
    q = torch.randn(n, 5, generator=gen)
    excl = torch.randint(0, 10, (n,), generator=gen)
    result = index.search(q, k, negatives=Select(kind=1), exclude_source=excl)
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(q, dim=1), k, Select(kind=1), exclude_source=excl)
    assert_matches_brute_force(result, ref, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_bank_torch(dtype: torch.dtype, device: torch.device) -> None:
    index, gen = filled_index("torch", device, n=200, capacity=256, dtype=dtype)
    q = torch.randn(9, 16, generator=gen)
    result = index.search(q.to(device), 10, negatives=Select(kind=0))
    bank, tags = bank_of(index)  # the rounded bank: similarities against it, within the query rounding
    ref = brute_force(bank, tags, torch.nn.functional.normalize(q, dim=1), 10, Select(kind=0))
    atol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(result.similarities.cpu(), torch.topk(ref, 10).values.float(), atol=atol, rtol=0)
    assert (result.tags.kind == 0).all()
