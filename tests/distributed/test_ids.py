"""Global ids (mlcl_losses.distributed.ids): offsets by rank, ids shared across ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_cases import (
    SPLITS,
    WORLD,
    batch_parts,
)

from mlcl_losses.distributed import (
    ids_shared_across_ranks,
    offset_ids_by_rank,
)
from mlcl_losses.tags import ViewTags


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
