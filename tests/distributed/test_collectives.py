"""The shared checks (mlcl_losses.distributed.collectives): no process group, ranks that disagree."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_cases import (
    DIM,
    batch_parts,
    criterion,
    shard,
)

from mlcl_losses.distributed import (
    DistributedHardNegativeIndex,
    all_gather_tags,
    all_gather_with_grad,
    gather_batch,
    offset_ids_by_rank,
)


@pytest.mark.parametrize(
    ("name", "match"),
    [("label", "`tags.label` must be given on every rank"), ("dim", "same size"), ("dtype", "same dtype")],
)
def test_inconsistent_ranks_raise_on_every_rank(ranks: list[dict[str, Any]], name: str, match: str) -> None:
    for seen in ranks:
        assert match in seen["errors"][name]


# ---------------------------------------------------------------------------------------------- no process group


def test_not_in_a_process_group() -> None:
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x, tags: all_gather_with_grad(x), id="all_gather_with_grad"),
        pytest.param(lambda x, tags: all_gather_tags(tags), id="all_gather_tags"),
        pytest.param(lambda x, tags: gather_batch(x, tags), id="gather_batch"),
        pytest.param(lambda x, tags: offset_ids_by_rank(tags), id="offset_ids_by_rank"),
        pytest.param(
            lambda x, tags: DistributedHardNegativeIndex(shard(0)).search(x.float()[:, :DIM], 2), id="index-search"
        ),
        pytest.param(lambda x, tags: DistributedHardNegativeIndex(shard(0)).global_len(), id="index-global_len"),
        pytest.param(lambda x, tags: DistributedHardNegativeIndex(shard(0)).add(x.float(), tags), id="index-add"),
        pytest.param(lambda x, tags: criterion("reference", gather_distributed=True)(x, tags), id="loss"),
    ],
)
def test_outside_a_process_group_raises(call: Any) -> None:
    x, tags = batch_parts((1,))[0]
    x = torch.cat([x, x], dim=1)[:, :DIM]
    with pytest.raises(RuntimeError, match=r"call torch\.distributed\.init_process_group"):
        call(x, tags)
