"""MultiLevelContrastiveLoss(gather_distributed=True) on two gloo ranks equals one process on the whole batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_cases import (
    CONFIGS,
    DIM,
    SPLITS,
    TOL64,
    WORLD,
    bank_parts,
    batch_parts,
    concat,
    criterion,
    encoder,
    shard,
)
from torch import Tensor, nn

from mlcl_losses.distributed import (
    DistributedHardNegativeIndex,
)
from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.loss import MultiLevelContrastiveLoss
from mlcl_losses.tags import ViewTags

# ---------------------------------------------------------------------------------------------- one process


def single_step(
    crit: MultiLevelContrastiveLoss, x: Tensor, tags: ViewTags
) -> tuple[Tensor, dict[str, Any], list[Tensor], Tensor]:
    model = encoder()
    emb = model(x)
    emb.retain_grad()
    loss, stats = crit(emb, tags)
    loss.backward()
    assert emb.grad is not None
    return loss.detach(), stats, [p.grad for p in model.parameters() if p.grad is not None], emb.grad


def assert_matches_single(seen: list[dict[str, Any]], crit: MultiLevelContrastiveLoss, split: tuple[int, ...]) -> None:
    x, tags = concat(batch_parts(split))
    loss, stats, param_grads, emb_grad = single_step(crit, x, tags)
    sizes = [len(t) for _, t in batch_parts(split)]
    for rank, result in enumerate(seen):
        torch.testing.assert_close(result["loss"], loss, **TOL64)
        for name, s in stats.items():
            torch.testing.assert_close(result["stats"][name][0], s.loss, **TOL64)
            assert result["stats"][name][1] == int(s.anchors)
        # DDP averaged the parameter gradients: exactly the single-process gradients
        for got, expected in zip(result["param_grads"], param_grads, strict=True):
            torch.testing.assert_close(got, expected, **TOL64)
        # each rank's own embeddings got world_size times their single-process gradient
        start = sum(sizes[:rank])
        torch.testing.assert_close(result["emb_grad"], WORLD * emb_grad[start : start + sizes[rank]], **TOL64)


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("split", list(SPLITS))
def test_gathered_loss_and_ddp_gradients_equal_one_process(
    ranks: list[dict[str, Any]], split: str, config: str
) -> None:
    seen = [r[f"loss/{split}/{config}"] for r in ranks]
    crit = criterion(config)
    assert_matches_single(seen, crit, SPLITS[split])
    assert not any(result["warned"] for result in seen)
    if config in ("spl-quantile", "anchor-weighting"):  # the pace is identical on every rank and as one process
        weighting = crit.weightings["lesion"]
        assert [result["lam"] for result in seen] == [weighting.schedule.last_lam] * WORLD


def test_loss_with_sharded_index_equals_one_index_holding_all_entries(ranks: list[dict[str, Any]]) -> None:
    seen = [r["loss/index"] for r in ranks]
    whole = HardNegativeIndex(dim=DIM, capacity=64, backend="torch")
    whole.add(*concat(bank_parts()))
    assert_matches_single(seen, criterion("reference", index=whole, k=4), SPLITS["unequal"])
    assert [result["shard_growth"] for result in seen] == [len(t) for _, t in batch_parts(SPLITS["unequal"])]


def test_loss_with_one_empty_shard(ranks: list[dict[str, Any]]) -> None:
    seen = [r["loss/index-one-empty"] for r in ranks]
    whole = shard(0)  # rank 0's shard is the only non-empty one
    assert_matches_single(seen, criterion("reference", index=whole, k=4), SPLITS["unequal"])


def test_rank_local_ids_are_warned_about(ranks: list[dict[str, Any]]) -> None:
    assert [seen["warned_rank_local_ids"] for seen in ranks] == [True] * WORLD


def test_bad_loss_options_raise() -> None:
    with pytest.raises(ValueError, match="gather_distributed=True"):
        MultiLevelContrastiveLoss(index=DistributedHardNegativeIndex(shard(0)), k=4)
    with pytest.raises(TypeError, match="gather_distributed"):
        MultiLevelContrastiveLoss(gather_distributed="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="HardNegativeIndex"):
        DistributedHardNegativeIndex(nn.Linear(2, 2))  # type: ignore[arg-type]
    crit = MultiLevelContrastiveLoss(index=DistributedHardNegativeIndex(shard(0)), k=4, gather_distributed=True)
    assert isinstance(crit.index, HardNegativeIndex)
    assert "gather_distributed=True" in repr(crit)
