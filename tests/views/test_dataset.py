"""Tests of the four-view dataset and its collate function (mlcl_losses.views.dataset)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from views_cases import BOXES, P, random_image

from mlcl_losses.degrade import FundusDegradation
from mlcl_losses.synthetic import SyntheticFundus
from mlcl_losses.views import FourViewDataset, FourViewRecord, FourViewSampler, collate_four_views

pytestmark = pytest.mark.usefixtures("one_thread")


def view_records(data: SyntheticFundus) -> list[FourViewRecord]:
    """The records of a synthetic fundus set (what the deprecated ``mlcl_losses.synthetic.view_records`` gave)."""
    samples = (data[i] for i in range(len(data)))
    return [FourViewRecord(s.clean_image, s.boxes, label=s.grade, quality=s.quality, image_id=s.index) for s in samples]


# ---------------------------------------------------------------- dataset and collate
def _dataset(n: int = 4) -> FourViewDataset:
    records = view_records(SyntheticFundus(n=n, size=64, seed=0, grade_probs=(0, 0, 1, 1, 1)))
    return FourViewDataset(records, FourViewSampler(patch_size=P, n_healthy=2), FundusDegradation((0.4, 0.9), "random"))


def test_collate_makes_sources_unique() -> None:
    data = _dataset()
    items = [data[i] for i in range(3)]
    views, tags = collate_four_views(items)
    assert views.shape[0] == sum(item.views.shape[0] for item in items)
    # a source never spans two images
    for src in tags.source.unique():
        assert tags.image is not None
        assert tags.image[tags.source == src].unique().numel() == 1
    n_sources = sum(item.tags.source.unique().numel() for item in items)
    assert tags.source.unique().numel() == n_sources


def test_dataset_source_ids_are_dataset_wide_and_stable_across_epochs() -> None:
    data = _dataset()
    first = collate_four_views([data[2], data[0]]).tags
    data.set_epoch(1)
    again = collate_four_views([data[0], data[2]]).tags
    # record i owns [i * 64, (i + 1) * 64): kept by the collate function, whatever the batch
    assert set(first.source[first.image == 2].tolist()) <= set(range(2 * 64, 3 * 64))
    lesion = first.kind == 1
    lesion_again = again.kind == 1
    assert set(first.source[lesion & (first.image == 0)].tolist()) == set(
        again.source[lesion_again & (again.image == 0)].tolist()
    )


def test_collate_renumbers_only_when_items_share_sources() -> None:
    data = _dataset()
    tags = collate_four_views([data[1], data[1]]).tags
    n = data[1].tags.source.unique().numel()
    assert tags.source.unique().numel() == 2 * n


def test_dataset_refuses_more_patches_than_reserved_ids() -> None:
    records = view_records(SyntheticFundus(n=2, size=64, seed=0, grade_probs=(0, 0, 0, 0, 1)))
    data = FourViewDataset(
        records, FourViewSampler(patch_size=P, n_healthy=2), FundusDegradation(0.5), sources_per_image=2
    )
    with pytest.raises(ValueError, match="sources_per_image"):
        data[0]
    with pytest.raises(ValueError, match="sources_per_image"):
        FourViewDataset(records, FourViewSampler(patch_size=P), FundusDegradation(0.5), sources_per_image=0)


def test_dataset_seeding_by_epoch_and_index() -> None:
    data = _dataset()
    a = data[1]
    assert torch.equal(a.views, data[1].views)
    data.set_epoch(1)
    assert not torch.equal(a.views, data[1].views)
    data.set_epoch(0)
    assert torch.equal(a.views, data[1].views)


def _batches(num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = _dataset()
    data.set_epoch(2)
    loader = DataLoader(data, batch_size=2, num_workers=num_workers, collate_fn=collate_four_views)
    return [(views, tags.pack()) for views, tags in loader]


def test_dataloader_workers_give_identical_batches() -> None:
    serial, parallel = _batches(0), _batches(2)
    assert len(serial) == len(parallel) == 2
    for (va, ta), (vb, tb) in zip(serial, parallel, strict=True):
        assert torch.equal(va, vb)
        assert torch.equal(ta, tb)


def test_record_from_file_path(tmp_path) -> None:  # noqa: ANN001
    pil = pytest.importorskip("PIL.Image")
    image = (random_image() * 255).round().byte()
    path = tmp_path / "img.png"
    pil.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    record = FourViewRecord(image=str(path), boxes=BOXES, degraded=lambda: random_image(2), label=1)
    data = FourViewDataset([record], FourViewSampler(patch_size=P, augment=None))
    views, tags = data[0]
    assert views.shape == (10, 3, P, P)
    assert tags.label is not None
    loaded = image.float() / 255
    # V1a is an exact copy (augment=None) of some 16x16 window of the file's pixels
    assert any(
        torch.equal(views[0], loaded[:, y : y + P, x : x + P])
        for y in range(0, 64 - P + 1)
        for x in range(0, 64 - P + 1)
    )


def test_dataset_negative_indices_count_from_the_end() -> None:
    data = _dataset(n=3)
    for negative, positive in ((-1, 2), (-3, 0)):
        views, tags = data[negative]
        expected_views, expected_tags = data[positive]
        assert torch.equal(views, expected_views)
        assert tags.equal(expected_tags)
    for bad in (3, -4):
        with pytest.raises(IndexError, match=rf"`index` in \[-3, 3\) \(3 records\), but got {bad}"):
            data[bad]
    with pytest.raises(TypeError, match=r"`index` to be an int, but got float 1.0"):
        data[1.0]  # type: ignore[index]
    with pytest.raises(TypeError, match=r"`index` to be an int, but got bool"):
        data[True]


def test_collate_and_dataset_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate_four_views([])
    small = FourViewSampler(patch_size=8, augment=None)(random_image(), BOXES, degraded=random_image(2))
    large = FourViewSampler(patch_size=P, augment=None)(random_image(), BOXES, degraded=random_image(2))
    with pytest.raises(ValueError, match=r"views of one shape.*item 0 has \(3, 8, 8\) and item 1 has \(3, 16, 16\)"):
        collate_four_views([small, large])
    with pytest.raises(TypeError, match="sampler"):
        FourViewDataset([], sampler=None)  # type: ignore[arg-type]
    data = FourViewDataset([FourViewRecord(image=random_image(), boxes=BOXES)], FourViewSampler(patch_size=P))
    with pytest.raises(ValueError, match="degradation"):
        data[0]
    with pytest.raises(ValueError, match="epoch"):
        data.set_epoch(-1)
