"""PML's ``DistributedLossWrapper`` / ``DistributedMinerWrapper`` around our adapters: two gloo processes vs one.

Two CPU processes (gloo, 127.0.0.1), started once for the module, each compute the wrapped loss on
their part of a batch and save what they saw (tensors only); the tests compare it with this process
on the concatenated batch. The wrappers gather without gradients for the other ranks' rows and
return ``W * loss``, so each rank's embeddings receive ``W * dL/dz`` (DDP's average then gives dL/dθ).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from pytorch_metric_learning.miners import TripletMarginMiner
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import Tensor

from gloo_ranks import run_on_ranks
from mlcl_losses.distributed import offset_ids_by_rank
from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.levels import Level, comcl_levels
from mlcl_losses.pml import MultiLevelInfoNCELoss, MultiLevelMiner
from mlcl_losses.tags import ViewTags
from test_pml import TOL64, four_views, grads

WORLD = 2
CPU = torch.device("cpu")


def comcl_part(rank: int) -> tuple[Tensor, ViewTags]:
    """Rank ``rank``'s rows: two boxes of four views, dataset-wide ids (rank 0: sources 0-3, rank 1: 4-7)."""
    tags = ViewTags.cat([four_views(CPU, offset=4 * rank), four_views(CPU, offset=4 * rank + 2)])
    gen = torch.Generator().manual_seed(50 + rank)
    return torch.randn(len(tags), 8, generator=gen, dtype=torch.float64), tags


def instance_part(rank: int, rank_local: bool = False) -> tuple[Tensor, ViewTags]:
    """Three sources with four identical-tag views each; ids from 0 on every rank if ``rank_local``."""
    source = torch.arange(3).repeat_interleave(4) + (0 if rank_local else 3 * rank)
    tags = ViewTags(kind=torch.ones_like(source), quality=torch.zeros_like(source), source=source, image=source)
    gen = torch.Generator().manual_seed(60 + rank)
    return torch.randn(len(tags), 8, generator=gen, dtype=torch.float64), tags


def _scenarios(rank: int) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def run(name: str, loss_fn: torch.nn.Module, z: Tensor, labels: Tensor, *args: object) -> None:
        z = z.clone().requires_grad_(True)
        loss = loss_fn(z, labels, *args)
        out[f"{name}/loss"] = loss.detach()
        out[f"{name}/grad"] = grads(loss, z)

    z, tags = comcl_part(rank)
    comcl = MultiLevelInfoNCELoss(comcl_levels())
    run("plain", DistributedLossWrapper(comcl), z, tags.pack())
    pairs = DistributedMinerWrapper(MultiLevelMiner(comcl_levels()))(z, tags.pack())
    out["miner/a1"], out["miner/p"] = pairs[0], pairs[1]
    run("miner", DistributedLossWrapper(comcl), z, tags.pack(), pairs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(
            "efficient-comcl",
            DistributedLossWrapper(MultiLevelInfoNCELoss(comcl_levels()), efficient=True),
            z,
            tags.pack(),
        )
    out["efficient-comcl/warned"] = torch.tensor([("without any" in str(w.message)) for w in record]).any()

    zi, ti = instance_part(rank)
    instance = MultiLevelInfoNCELoss(Level.instance())
    triplets = DistributedMinerWrapper(TripletMarginMiner(margin=0.2))(zi, ti.pack())
    out["triplets/a"] = triplets[0]
    run("triplets", DistributedLossWrapper(instance), zi, ti.pack(), triplets)
    run("efficient", DistributedLossWrapper(instance, efficient=True), zi, ti.pack())

    zl, tl = instance_part(rank, rank_local=True)
    run("rank-local", DistributedLossWrapper(instance), zl, tl.pack())
    run("offset", DistributedLossWrapper(instance), zl, offset_ids_by_rank(tl).pack())
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Tensor]]:
    """What each of the two ranks saw (one spawn for the module)."""
    return run_on_ranks(_scenarios, WORLD, tmp_path_factory.mktemp("pml_distributed"), weights_only=True)


def single(parts: list[tuple[Tensor, ViewTags]], levels: list[Level], *args: object) -> tuple[Tensor, Tensor]:
    """One process on the concatenated batch (rank order): loss and gradient."""
    z = torch.cat([p[0] for p in parts]).requires_grad_(True)
    labels = ViewTags.cat([p[1] for p in parts]).pack()
    loss = MultiLevelInfoNCELoss(levels)(z, labels, *args)
    return loss.detach(), grads(loss, z)


def rows(rank: int, sizes: list[int]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


@pytest.mark.parametrize("name", ["plain", "miner"])
def test_loss_wrapper_gives_one_process_loss_and_gradients(ranks: list[dict[str, Tensor]], name: str) -> None:
    parts = [comcl_part(r) for r in range(WORLD)]
    loss, grad = single(parts, comcl_levels())
    sizes = [len(p[1]) for p in parts]
    for rank, seen in enumerate(ranks):
        torch.testing.assert_close(seen[f"{name}/loss"] / WORLD, loss, **TOL64)
        torch.testing.assert_close(seen[f"{name}/grad"] / WORLD, grad[rows(rank, sizes)], **TOL64)


def test_miner_wrapper_mines_the_gathered_batch(ranks: list[dict[str, Tensor]]) -> None:
    """Each rank gathers its own rows first: the pairs are one process's on that order."""
    for rank, seen in enumerate(ranks):
        order = [comcl_part(rank), comcl_part(1 - rank)]
        labels = ViewTags.cat([p[1] for p in order]).pack()
        a1, p, _, _ = MultiLevelMiner(comcl_levels())(torch.cat([p[0] for p in order]), labels)
        assert torch.equal(seen["miner/a1"], a1)
        assert torch.equal(seen["miner/p"], p)


def test_pml_miner_wrapper_with_our_loss(ranks: list[dict[str, Tensor]]) -> None:
    for rank, seen in enumerate(ranks):
        order = [instance_part(rank), instance_part(1 - rank)]
        z = torch.cat([p[0] for p in order])
        triplets = TripletMarginMiner(margin=0.2)(z, ViewTags.cat([p[1] for p in order]).pack())
        assert torch.equal(seen["triplets/a"], triplets[0])
        loss, grad = single(order, [Level.instance()], triplets)
        torch.testing.assert_close(seen["triplets/loss"] / WORLD, loss, **TOL64)
        torch.testing.assert_close(seen["triplets/grad"] / WORLD, grad[: len(order[0][1])], **TOL64)


def test_efficient_loss_wrapper_takes_local_anchors_against_all_ranks(ranks: list[dict[str, Tensor]]) -> None:
    """``efficient=True``: this rank's anchors against every rank's rows (PML's equal-label pairs)."""
    parts = [instance_part(r) for r in range(WORLD)]
    z = torch.cat([p[0] for p in parts])
    tags = ViewTags.cat([p[1] for p in parts])
    per_anchor, stats = multilevel_info_nce(z, tags, Level.instance(), 0.1, reduction="none", impl="reference")
    sizes = [len(p[1]) for p in parts]
    for rank, seen in enumerate(ranks):
        mine = per_anchor[0, rows(rank, sizes)][stats["instance"].valid[rows(rank, sizes)]]
        torch.testing.assert_close(seen["efficient/loss"] / WORLD, mine.mean(), **TOL64)


def test_efficient_loss_wrapper_warns_that_cross_view_levels_get_no_pair(ranks: list[dict[str, Tensor]]) -> None:
    """PML's ``efficient=True`` pairs equal packed labels only: our loss says so (use ``efficient=False``)."""
    assert all(bool(seen["efficient-comcl/warned"]) for seen in ranks)


def test_rank_local_ids_need_offset_ids_by_rank(ranks: list[dict[str, Tensor]]) -> None:
    """Item 5: the loss cannot see ranks; with ``offset_ids_by_rank`` it is one process's loss."""
    parts = [instance_part(r, rank_local=True) for r in range(WORLD)]
    offset = [(z, offset_ids_by_rank(t, rank=r, world_size=WORLD)) for r, (z, t) in enumerate(parts)]
    loss, _ = single(offset, [Level.instance()])
    for seen in ranks:
        torch.testing.assert_close(seen["offset/loss"] / WORLD, loss, **TOL64)
        # rank-local ids make rank 0's source 0 and rank 1's source 0 one source: a different loss
        assert not torch.isclose(seen["rank-local/loss"] / WORLD, loss, rtol=1e-3)
