"""DistributedHardNegativeIndex (mlcl_losses.distributed.sharded_index): merged search equals one index."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_cases import (
    BANK_SPLIT,
    DIM,
    INDEX_LEVEL,
    WORLD,
    bank_parts,
    concat,
    queries,
)
from torch import Tensor

from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Level, Select


def _single_search(q: Tensor, k: int, negatives: Select | Level, sizes: tuple[int, ...] = BANK_SPLIT, **kw: Any):
    index = HardNegativeIndex(dim=DIM, capacity=64, backend="torch")
    index.add(*concat([part for part in bank_parts(sizes) if len(part[1])]))
    return index, index.search(q, k, negatives, **kw)


def _assert_same_hits(got: Any, index: HardNegativeIndex, expected: Any) -> None:
    torch.testing.assert_close(got.similarities, expected.similarities, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.tags.source, expected.tags.source)  # sources identify the entries
    assert got.tags.equal(expected.tags)
    valid = expected.indices >= 0
    assert torch.equal(got.indices >= 0, valid)
    assert torch.equal(got.ranks >= 0, valid)
    bank = index.embeddings[expected.indices.clamp_min(0)].masked_fill(~valid[:, :, None], 0.0)
    torch.testing.assert_close(got.embeddings, bank)


@pytest.mark.parametrize("case", ["local", "one-empty"])
def test_merged_search_equals_one_index_holding_all_entries(ranks: list[dict[str, Any]], case: str) -> None:
    sizes = BANK_SPLIT if case == "local" else (BANK_SPLIT[0], 0)
    for rank, seen in enumerate(ranks):
        q, exclude = queries(7 + 3 * rank, seed=10 + rank)
        kw = {f"exclude_{name}": value for name, value in exclude.items()}
        index, expected = _single_search(q, 5, INDEX_LEVEL, sizes, **kw)
        got = seen[f"search/{case}"]
        assert got.similarities.shape == (7 + 3 * rank, 5)
        _assert_same_hits(got, index, expected)
        if case == "one-empty":  # every hit comes from rank 0's shard, the only non-empty one
            assert bool((got.ranks[got.ranks >= 0] == 0).all())


def test_replicated_search_is_identical_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    q_all = torch.cat([queries(7 + 3 * r, seed=10 + r)[0] for r in range(WORLD)])
    index, expected = _single_search(q_all, 6, Select(kind=1))
    for seen in ranks:
        _assert_same_hits(seen["search/replicated"], index, expected)
    assert {int(r) for r in ranks[0]["search/replicated"].ranks.unique()} >= {0, 1}  # hits from both shards
    assert [seen["global_len"] for seen in ranks] == [sum(BANK_SPLIT)] * WORLD
