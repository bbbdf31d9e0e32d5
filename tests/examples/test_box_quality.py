"""Recall, precision and baselines of box proposals (examples.common.box_quality)."""

from __future__ import annotations

import pytest
import torch
from examples.common.box_quality import ImageBoxes, grid_boxes, match_quality, random_like


def test_recall_precision_and_centre_hits_of_a_known_case() -> None:
    true = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 24.0, 24.0], [50.0, 50.0, 60.0, 60.0]])
    kinds = torch.tensor([0, 1, 0])
    proposed = torch.tensor([[0.0, 0.0, 10.0, 12.0], [18.0, 18.0, 30.0, 30.0], [80.0, 80.0, 90.0, 90.0]])
    q = match_quality([ImageBoxes(true, kinds, proposed)], ["a", "b", "c"], (0.3, 0.5))
    # box 0 matches proposal 0 (IoU 100/120); box 1 (16 px^2) inside proposal 1 (144 px^2): IoU 0.11
    assert q["recall"]["0.3"] == {"a": 0.5, "b": 0.0, "c": None, "all": pytest.approx(1 / 3)}
    assert q["recall"]["0.5"]["all"] == pytest.approx(1 / 3)
    assert q["precision"]["0.3"] == pytest.approx(1 / 3)
    assert q["centre_hit"] == {"a": 0.5, "b": 1.0, "c": None, "all": pytest.approx(2 / 3)}
    assert q["n_true"] == {"a": 2, "b": 1, "c": 0}
    assert q["boxes_per_image"] == 3.0


def test_proposals_naming_a_kind_match_only_that_kind() -> None:
    true = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    proposed = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    wrong = ImageBoxes(true, torch.tensor([0, 1]), proposed, proposed_kinds=torch.tensor([1, 1]))
    q = match_quality([wrong], ["a", "b"])
    assert q["recall"]["0.3"] == {"a": 0.0, "b": 1.0, "all": 0.5}
    assert q["precision"]["0.3"] == 0.5
    assert q["centre_hit"]["a"] == 0.0


def test_no_proposals_score_zero_and_count_their_images() -> None:
    true = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    q = match_quality([ImageBoxes(true, torch.tensor([0]), torch.zeros(0, 4))] * 2, ["a"])
    assert q["recall"]["0.3"]["all"] == 0.0
    assert q["precision"]["0.3"] is None
    assert q["n_images"] == 2


def test_random_like_keeps_sizes_inside_the_image() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [3.0, 3.0, 43.0, 23.0], [0.0, 0.0, 200.0, 10.0]])
    out = random_like(boxes, (60, 80), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:2, 2:] - out[:2, :2], boxes[:2, 2:] - boxes[:2, :2])
    assert float(out[2, 2] - out[2, 0]) == 80.0  # wider than the image: clipped to it
    assert bool((out[:, 0::2] >= 0).all())
    assert bool((out[:, 0::2] <= 80).all())
    assert bool((out[:, 1::2] <= 60).all())


def test_grid_tiles_the_image() -> None:
    grid = grid_boxes((20, 30), 10.0)
    assert grid.shape == (6, 4)
    area = ((grid[:, 2] - grid[:, 0]) * (grid[:, 3] - grid[:, 1])).sum()
    assert float(area) == 600.0
    with pytest.raises(ValueError, match="`cell` > 0"):
        grid_boxes((20, 30), 0.0)


def test_quality_table_rows_and_hidden_empty_classes() -> None:
    from examples.common.box_quality import quality_table

    def entry(recall: float | None, precision: float) -> dict:
        rec = {"a": recall, "b": None, "all": recall}
        return {
            "n_true": {"a": 3, "b": 0},
            "recall": {"0.3": rec, "0.5": rec},
            "precision": {"0.3": precision, "0.5": precision},
            "boxes_per_image": 2.0,
        }

    results = [{"cam": entry(0.5, 0.25), "random": entry(None, 0.0), "grid": entry(0.125, 0.5), "layer": "l1"}]
    text = quality_table(results, ["a", "b"], lambda r: r["layer"], ious=(0.3,))
    lines = text.splitlines()
    assert lines[0] == "IoU >= 0.3:"
    assert lines[2] == "| setting | boxes | boxes/img | R a (3) | R all | precision |"  # b has no true box
    assert lines[4] == "| l1 | cam | 2.0 | 0.50 | 0.50 | 0.25 |"
    assert lines[5] == "|  | random | 2.0 | – | – | 0.00 |"
    assert lines[6] == "|  | grid | 2.0 | 0.12 | 0.12 | 0.50 |"
    assert len(lines) == 7  # one IoU given: one table
