"""Gathering a batch (mlcl_losses.distributed.gather): rows and tags in rank order, gradients summed."""

from __future__ import annotations

from typing import Any

import torch
from distributed_cases import (
    SPLITS,
    WORLD,
    batch_parts,
    concat,
)


def test_tags_and_rows_are_gathered_in_rank_order(ranks: list[dict[str, Any]]) -> None:
    parts = batch_parts(SPLITS["unequal"])
    full_tags = concat(parts)[1]
    sizes = tuple(len(t) for _, t in parts)
    for rank, seen in enumerate(ranks):
        assert seen["tags"].equal(full_tags)
        batch = seen["batch"]
        assert batch.tags.equal(full_tags)
        assert batch.sizes == sizes
        assert batch.rank == rank
        assert batch.local == slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        gathered, grad = seen["rows"]
        assert torch.equal(gathered, torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))
        # the loss weights row i by i + 1 on both ranks; the gradient sums both ranks' contributions
        expected = WORLD * torch.arange(1.0, 4.0)[:, None].expand(3, 3)
        assert torch.equal(grad, expected[:1] if rank == 0 else expected[1:])
