"""What the distributed tests run: the data of each rank, and every scenario two gloo ranks go through.

Two CPU processes (gloo, 127.0.0.1), started once for the session by the ``ranks`` fixture
(``conftest.py``), run every distributed scenario (:func:`scenarios`) on their own part of a batch and
save what they saw; the tests then compare it with one process (the test process, outside any
process group) on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mlcl_losses.distributed import (
    DistributedHardNegativeIndex,
    all_gather_tags,
    all_gather_with_grad,
    gather_batch,
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


# ---------------------------------------------------------------------------------------------- the scenarios


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


def scenarios(rank: int) -> dict[str, Any]:
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
