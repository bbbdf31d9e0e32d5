"""Every backend honours the one interface (mlcl_losses.index.backend): brute-force hits, padding, CUDA = CPU."""

from __future__ import annotations

import pytest
import torch
from index_cases import BACKENDS, assert_matches_brute_force, bank_of, brute_force, filled_index, random_tags

from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Select
from mlcl_losses.tags import ViewTags

# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 7, 64], ids=lambda k: f"k{k}")
def test_unfiltered_equals_brute_force(backend: str, k: int, device: torch.device) -> None:
    index, gen = filled_index(backend, device, n=500, capacity=512)
    queries = torch.randn(37, 16, generator=gen)
    result = index.search(queries.to(device), k)
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(queries, dim=1), k)
    assert_matches_brute_force(result, ref, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_allowed_than_k_pads(backend: str, device: torch.device) -> None:
    index = HardNegativeIndex(4, 10, device=device, backend=backend)
    index.add(torch.eye(4), ViewTags([0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 2, 3]))
    result = index.search(torch.ones(2, 4, device=device), 8, negatives=Select(kind=1))
    assert (result.indices[:, :3] >= 1).all()
    assert (result.indices[:, 3:] == -1).all()
    assert torch.isneginf(result.similarities[:, 3:]).all()
    assert (result.tags.kind[:, 3:] == -1).all()
    assert result.tags.label is None


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_equals_cpu(backend: str) -> None:
    cpu, gen = filled_index("torch", torch.device("cpu"), n=3000, capacity=4096)
    gpu = HardNegativeIndex(16, 4096, device="cuda", backend=backend)
    gpu.load_state_dict(cpu.state_dict())
    q = torch.randn(64, 16, generator=gen)
    qt = random_tags(64, gen)
    kwargs = {"negatives": Select(kind=1), "exclude_source": qt.source, "exclude_image": qt.image}
    a = cpu.search(q, 100, **kwargs)
    b = gpu.search(q.cuda(), 100, **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    torch.testing.assert_close(b.similarities.cpu(), a.similarities, atol=1e-5, rtol=0)
