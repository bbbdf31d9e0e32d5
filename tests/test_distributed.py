"""Tests of mlcl_losses.distributed and ``MultiLevelContrastiveLoss(gather_distributed=True)``.

Two CPU processes (gloo, 127.0.0.1), started once for the module by ``torch.multiprocessing.spawn``,
run every distributed scenario on their own part of a batch and save what they saw; the tests then
compare it with one process (this one, outside any process group) on the concatenated batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from mlcl_losses.distributed import (
    DistributedHardNegativeIndex,
    all_gather_tags,
    all_gather_with_grad,
    gather_batch,
    ids_shared_across_ranks,
    offset_ids_by_rank,
)
from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Level, Select, comcl_levels
from mlcl_losses.loss import MultiLevelContrastiveLoss
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting
from mlcl_losses.tags import ViewTags

WORLD = 2
IN_DIM, DIM = 6, 8
TOL64 = {"rtol": 1e-10, "atol": 1e-10}
SPLITS = {"equal": (3, 3), "unequal": (2, 5)}  # boxes (5 rows each) per rank
BANK_SPLIT = (13, 27)  # index entries per rank
CONFIGS = ["reference", "auto", "spl-quantile", "anchor-weighting"]


# ---------------------------------------------------------------------------------------------- data


def batch_parts(split: tuple[int, ...], seed: int = 0) -> list[tuple[Tensor, ViewTags]]:
    """Per rank: ``(n_r, IN_DIM)`` float64 inputs and tags; ``split[r]`` boxes, dataset-wide ids."""
    gen = torch.Generator().manual_seed(seed)
    parts, box = [], 0
    for boxes in split:
        kind: list[int] = []
        quality: list[int] = []
        source: list[int] = []
        image: list[int] = []
        label: list[int] = []
        for _ in range(boxes):
            kind += [1, 1, 1, 0, 0]
            quality += [0, 0, 1, 0, 1]
            source += [2 * box] * 3 + [2 * box + 1] * 2
            image += [box] * 5
            label += [box % 3] * 5
            box += 1
        x = torch.randn(len(kind), IN_DIM, generator=gen, dtype=torch.float64)
        parts.append((x, ViewTags(kind, quality, source, label=label, image=image)))
    return parts


def bank_parts(sizes: tuple[int, ...] = BANK_SPLIT, seed: int = 1) -> list[tuple[Tensor, ViewTags]]:
    """Per rank: ``(m_r, DIM)`` float32 index entries and tags with dataset-wide ids."""
    gen = torch.Generator().manual_seed(seed)
    parts, start = [], 0
    for m in sizes:
        ids = torch.arange(start, start + m)
        tags = ViewTags(
            kind=torch.randint(0, 2, (m,), generator=gen),
            quality=torch.randint(0, 2, (m,), generator=gen),
            source=1000 + ids,
            label=ids % 3,
            image=500 + ids,
        )
        parts.append((torch.randn(m, DIM, generator=gen), tags))
        start += m
    return parts


def concat(parts: list[tuple[Tensor, ViewTags]]) -> tuple[Tensor, ViewTags]:
    return torch.cat([x for x, _ in parts]), ViewTags.cat([t for _, t in parts])


def levels() -> list[Level]:
    return [*comcl_levels(), Level.supervised(weight=0.5, name="sup")]


def criterion(config: str, **kwargs: Any) -> MultiLevelContrastiveLoss:
    options: dict[str, Any] = {"levels": levels(), "temperature": 0.2, "impl": "reference"}
    if config == "auto":
        options = {"temperature": 0.2}  # the default levels and implementation (fused where supported)
    elif config == "spl-quantile":
        options["weighting"] = SelfPacedWeighting("hard", PaceSchedule.quantile(0.5, 1.0, 10))
    elif config == "anchor-weighting":
        options["weighting"] = SelfPacedWeighting("linear", PaceSchedule.quantile(0.5, 1.0, 10), target="anchors")
    return MultiLevelContrastiveLoss(**options, **kwargs)


def encoder() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN_DIM, DIM, dtype=torch.float64)


def queries(n: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``(n, DIM)`` queries and exclusions that hit bank entries (sources 1000.., images 500..)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(BANK_SPLIT)
    pick = torch.randint(0, total, (n,), generator=gen)
    exclude = {"source": 1000 + pick, "image": 500 + (pick + 1) % total, "label": torch.arange(n) % 3}
    return torch.randn(n, DIM, generator=gen), exclude


INDEX_LEVEL = Level(name="x", negatives=Select(kind=0), exclude_same_label=True)


def shard(rank: int, sizes: tuple[int, ...] = BANK_SPLIT) -> HardNegativeIndex:
    index = HardNegativeIndex(dim=DIM, capacity=64, backend="torch")
    bank, tags = bank_parts(sizes)[rank]
    if len(tags):
        index.add(bank, tags)
    return index


# ---------------------------------------------------------------------------------------------- the workers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(_scenarios(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _step(model: nn.Module, crit: MultiLevelContrastiveLoss, x: Tensor, tags: ViewTags, **kw: Any) -> dict[str, Any]:
    model.zero_grad()
    emb = model(x)
    emb.retain_grad()
    loss, stats = crit(emb, tags, **kw)
    loss.backward()
    for p in model.parameters():  # what DistributedDataParallel does: average the gradients over the ranks
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    grad = emb.grad
    assert grad is not None
    return {
        "loss": loss.detach(),
        "stats": {name: (s.loss, int(s.anchors)) for name, s in stats.items()},
        "param_grads": [p.grad.clone() for p in model.parameters() if p.grad is not None],
        "emb_grad": grad.clone(),
    }


def _scenarios(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = encoder()  # the same parameters on every rank (seeded), as DDP would broadcast them
    # the loss over the gathered batch, with DDP averaging the parameter gradients
    for split_name, split in SPLITS.items():
        x, tags = batch_parts(split)[rank]
        for config in CONFIGS:
            crit = criterion(config, gather_distributed=True)
            result = _step(model, crit, x, tags)
            weighting = crit.weightings["lesion"] if "lesion" in crit.weightings else None
            result["lam"] = None if weighting is None else weighting.schedule.last_lam
            result["warned"] = crit._warned_shared_ids
            out[f"loss/{split_name}/{config}"] = result
    # the loss with a sharded index; keys go to the local shard
    x, tags = batch_parts(SPLITS["unequal"])[rank]
    crit = criterion("reference", gather_distributed=True, index=shard(rank), k=4)
    before = len(crit.index or [])
    result = _step(model, crit, x, tags, keys=torch.randn(len(tags), DIM))
    result["shard_growth"] = len(crit.index or []) - before
    out["loss/index"] = result
    # the same with a wrapper and one empty shard
    empty_sizes = (BANK_SPLIT[0], 0)
    wrapped = DistributedHardNegativeIndex(shard(rank, empty_sizes))
    out["loss/index-one-empty"] = _step(
        model, criterion("reference", index=wrapped, gather_distributed=True, k=4), x, tags
    )
    # rank-local ids are noticed
    local_ids = ViewTags(
        tags.kind, tags.quality, tags.source - tags.source.min(), tags.label, tags.image - tags.image.min()
    )
    crit = criterion("reference", gather_distributed=True)
    _step(model, crit, x, local_ids)
    out["warned_rank_local_ids"] = crit._warned_shared_ids
    # the sharded index on its own
    index = DistributedHardNegativeIndex(shard(rank))
    q, exclude = queries(7 + 3 * rank, seed=10 + rank)
    kw = {f"exclude_{name}": value for name, value in exclude.items()}
    out["search/local"] = index.search(q, 5, INDEX_LEVEL, **kw, return_embeddings=True)
    q_all = torch.cat([queries(7 + 3 * r, seed=10 + r)[0] for r in range(WORLD)])
    out["search/replicated"] = index.search(q_all, 6, Select(kind=1), replicated=True, return_embeddings=True)
    out["search/one-empty"] = DistributedHardNegativeIndex(shard(rank, empty_sizes)).search(
        q, 5, INDEX_LEVEL, **kw, return_embeddings=True
    )
    out["global_len"] = index.global_len()
    # tags, ids and gathered rows
    out["tags"] = all_gather_tags(tags)
    out["offset"] = (offset_ids_by_rank(tags), offset_ids_by_rank(tags, rank=rank, world_size=WORLD))
    rows = torch.full((rank + 1, 3), float(rank), requires_grad=True)
    gathered = all_gather_with_grad(rows)
    (gathered * torch.arange(1.0, gathered.shape[0] + 1)[:, None]).sum().backward()
    out["rows"] = (gathered.detach(), rows.grad)
    out["batch"] = gather_batch(x, tags)._replace(embeddings=None)
    # inconsistent inputs raise on every rank (no rank is left waiting)
    errors = {}
    bad_tags = tags if rank == 0 else ViewTags(tags.kind, tags.quality, tags.source)
    bad_dim = x if rank == 0 else x[:, :3]
    for name, call in (
        ("label", lambda: gather_batch(x, bad_tags)),
        ("dim", lambda: gather_batch(bad_dim, tags)),
        ("dtype", lambda: all_gather_with_grad(x if rank == 0 else x.float())),
    ):
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two ranks saw (one spawn for the whole module)."""
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


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


def test_offset_ids_by_rank_in_a_process_group(ranks: list[dict[str, Any]]) -> None:
    for rank, seen in enumerate(ranks):
        from_group, explicit = seen["offset"]
        tags = batch_parts(SPLITS["unequal"])[rank][1]
        assert from_group.equal(explicit)
        assert torch.equal(explicit.source, tags.source * WORLD + rank)
        assert explicit.image is not None
        assert tags.image is not None
        assert torch.equal(explicit.image, tags.image * WORLD + rank)
        assert explicit.label is not None
        assert tags.label is not None
        assert torch.equal(explicit.label, tags.label)


def test_rank_local_ids_are_warned_about(ranks: list[dict[str, Any]]) -> None:
    assert [seen["warned_rank_local_ids"] for seen in ranks] == [True] * WORLD


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


def test_offset_ids_with_explicit_rank_needs_no_process_group() -> None:
    tags = ViewTags(kind=[1, 0], quality=[0, 1], source=[0, 5], image=[2, 2])
    shifted = offset_ids_by_rank(tags, rank=2, world_size=3)
    assert shifted.source.tolist() == [2, 17]
    assert shifted.image is not None
    assert shifted.image.tolist() == [8, 8]
    assert offset_ids_by_rank(ViewTags([1], [0], [0]), rank=0, world_size=1).image is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "world_size": 2}, "`rank`"),
        ({"rank": 0, "world_size": 0}, "`world_size`"),
        ({"rank": 1, "world_size": 1 << 20}, "exceed the tag range"),
    ],
)
def test_offset_ids_bad_arguments_raise(kwargs: dict[str, int], match: str) -> None:
    tags = ViewTags(kind=[1], quality=[0], source=[100])
    with pytest.raises(ValueError, match=match):
        offset_ids_by_rank(tags, **kwargs)


def test_ids_shared_across_ranks() -> None:
    tags = ViewTags(kind=[1, 1, 0, 0], quality=[0, 0, 0, 0], source=[0, 1, 1, 2], image=[0, 0, 1, 1])
    assert ids_shared_across_ranks(tags, [2, 2]) == ["source"]
    assert ids_shared_across_ranks(tags, [1, 3]) == ["image"]
    assert ids_shared_across_ranks(tags, [4, 0]) == []


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
