"""Tag filtering (mlcl_losses.index.filters) is exact in every backend: predicates, exclusions, levels."""

from __future__ import annotations

import pytest
import torch
from index_cases import BACKENDS, assert_matches_brute_force, bank_of, brute_force, filled_index, random_tags

from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import ViewTags


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "select",
    [Select(), Select(kind=0), Select(kind=1, quality=1), Select(quality=0)],
    ids=["any", "healthy", "lesion-low", "high"],
)
@pytest.mark.parametrize("exclude", ["none", "source", "source+image", "all"])
def test_filtered_equals_brute_force_over_filtered_bank(
    backend: str, select: Select, exclude: str, device: torch.device
) -> None:
    index, gen = filled_index(backend, device, n=300, capacity=300)
    n = 41
    queries = torch.randn(n, 16, generator=gen)
    qtags = random_tags(n, gen)
    kwargs = {}
    if exclude != "none":
        kwargs["exclude_source"] = qtags.source
    if exclude in ("source+image", "all"):
        kwargs["exclude_image"] = qtags.image
    if exclude == "all":
        kwargs["exclude_label"] = qtags.label
    k = 50
    result = index.search(queries.to(device), k, negatives=select, **{a: v.to(device) for a, v in kwargs.items()})
    bank, tags = bank_of(index)
    ref = brute_force(bank, tags, torch.nn.functional.normalize(queries, dim=1), k, select, **kwargs)
    assert_matches_brute_force(result, ref, k)
    # hit tags are the tags of the hit slots, -1 where padded
    idx = result.indices.cpu()
    hit_tags = result.tags.to("cpu")
    assert hit_tags.shape == idx.shape
    pad = idx < 0
    for name, field in hit_tags.fields().items():
        assert field is not None
        assert (field[pad] == -1).all()
        torch.testing.assert_close(field[~pad], getattr(tags, name)[idx[~pad]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusions_never_returned_with_many_duplicates(backend: str, device: torch.device) -> None:
    # Half the bank shares the query's source and sits right next to it: the over-fetch must refill.
    dim, gen = 8, torch.Generator().manual_seed(3)
    index = HardNegativeIndex(dim, 400, device=device, backend=backend)
    query = torch.randn(1, dim, generator=gen)
    near = query + 0.01 * torch.randn(200, dim, generator=gen)
    far = torch.randn(200, dim, generator=gen)
    source = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 201)])
    tags = ViewTags(torch.zeros(400, dtype=torch.long), torch.zeros(400, dtype=torch.long), source)
    index.add(torch.cat([near, far]), tags)
    result = index.search(query.to(device), 20, exclude_source=torch.tensor([0], device=device))
    assert (result.tags.source != 0).all()
    assert (result.indices >= 200).all()
    bank, btags = bank_of(index)
    ref = brute_force(bank, btags, torch.nn.functional.normalize(query, dim=1), 20, exclude_source=torch.tensor([0]))
    assert_matches_brute_force(result, ref, 20)


def test_level_negatives(device: torch.device) -> None:
    index, gen = filled_index("torch", device, n=100, capacity=100)
    queries = torch.randn(5, 16, generator=gen).to(device)
    src = torch.arange(5, device=device)
    level = Level("l", negatives=Select(kind=0))
    via_level = index.search(queries, 10, negatives=level, exclude_source=src)
    via_select = index.search(queries, 10, negatives=Select(kind=0), exclude_source=src)
    assert torch.equal(via_level.indices, via_select.indices)
    off = Level("off", bank_negatives=False)
    assert (index.search(queries, 10, negatives=off).indices == -1).all()
    with pytest.raises(ValueError, match="exclude_label"):
        index.search(queries, 10, negatives=Level.supervised())
    lab = index.search(queries, 10, negatives=Level.supervised(), exclude_label=torch.zeros(5, dtype=torch.long))
    assert (lab.tags.label != 0).all()
