"""Four-view records of the example pipelines (examples/common/views.py): indexing as a sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from examples.common.views import RealViewItem, RealViewRecords, RecordSequence, SyntheticViewRecords
from PIL import Image

N = 4


def _synthetic() -> SyntheticViewRecords:
    g = torch.Generator().manual_seed(0)
    corners = torch.randint(0, 8, (N, 5, 2), generator=g).float()
    data = {
        "clean": torch.randint(0, 256, (N, 3, 16, 16), generator=g, dtype=torch.uint8),
        "boxes": [torch.cat([c, c + 6], dim=1) for c in corners],  # five (x1, y1, x2, y2) boxes per image
        "view_degraded": torch.randint(0, 256, (2, N, 3, 16, 16), generator=g, dtype=torch.uint8),
        "quality": torch.tensor([0, 1, 2, 0]),
        "grade": torch.tensor([0, 1, 2, 3]),
    }
    return SyntheticViewRecords(data, max_lesions=2, seed=7, label_key="grade")


def _real(tmp_path: Path) -> RealViewRecords:
    items = []
    for i in range(N):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (20 + i, 24), (10 * i, 40, 90)).save(path)
        items.append(RealViewItem(path, [(1.0, 2.0, 9.0, 10.0), (3.0, 3.0, 12.0, 14.0), (0.0, 0.0, 5.0, 5.0)], None, i))
    return RealViewRecords(items, size=16, max_lesions=2, seed=7)


@pytest.fixture(params=["synthetic", "real"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> RecordSequence:
    return _synthetic() if request.param == "synthetic" else _real(tmp_path)


def test_negative_index_is_the_same_record(records: RecordSequence) -> None:
    last, also_last = records[N - 1], records[-1]
    assert also_last.image_id == last.image_id == N - 1  # not -1: the image tag names the image
    torch.testing.assert_close(also_last.boxes, last.boxes)  # the same seeded box subset
    assert records[-N].image_id == 0


def test_slice_is_a_list_of_records(records: RecordSequence) -> None:
    part = records[1:3]
    assert isinstance(part, list)
    assert [r.image_id for r in part] == [1, 2]
    assert [r.image_id for r in records[::-2]] == [3, 1]
    torch.testing.assert_close(part[0].boxes, records[1].boxes)


@pytest.mark.parametrize("index", [N, -N - 1], ids=["past-the-end", "before-the-start"])
def test_index_out_of_range(records: RecordSequence, index: int) -> None:
    with pytest.raises(IndexError, match=rf"record index {index} out of range for {N} records"):
        records[index]


def test_iteration_ends_after_the_last_record(records: RecordSequence) -> None:
    assert [r.image_id for r in records] == list(range(N))
