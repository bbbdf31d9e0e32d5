"""Tests of the synthetic look-alike datasets (mlcl_losses.synthetic)."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlcl_losses._blur import gaussian_blur
from mlcl_losses.degrade.fundus import _fov_geometry
from mlcl_losses.synthetic import (
    CHESTXRAY14_LABELS,
    FUNDUS_LESIONS,
    SyntheticChestXray,
    SyntheticFundus,
    render_fundus,
    view_records,
)
from mlcl_losses.synthetic._draw import draw_lines, splat, walk
from mlcl_losses.synthetic.fundus import _centred_fov_geometry
from mlcl_losses.synthetic.xray import LOCALISED
from mlcl_losses.views import FourViewDataset, FourViewSampler, collate_four_views

logger = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("one_thread")


SIZE = 64


@pytest.mark.parametrize("cls", [SyntheticFundus, SyntheticChestXray])
def test_deterministic_and_independent_of_access_order(cls) -> None:  # noqa: ANN001
    a = cls(n=6, size=SIZE, seed=3)
    first = a[4]
    for i in range(6):
        a[i]
    again = a[4]
    fresh = cls(n=6, size=SIZE, seed=3)[4]
    other_seed = cls(n=6, size=SIZE, seed=4)[4]
    for s in (again, fresh):
        assert torch.equal(first.image, s.image)
        assert torch.equal(first.clean_image, s.clean_image)
        assert torch.equal(first.boxes, s.boxes)
    assert not torch.equal(first.clean_image, other_seed.clean_image)
    assert torch.equal(a[-2].image, first.image)


@pytest.mark.parametrize("cls", [SyntheticFundus, SyntheticChestXray])
def test_images_shape_dtype_range(cls) -> None:  # noqa: ANN001
    sample = cls(n=2, size=SIZE, seed=0)[1]
    channels = 3 if cls is SyntheticFundus else 1
    for img in (sample.image, sample.clean_image):
        assert img.shape == (channels, SIZE, SIZE)
        assert img.dtype == torch.float32
        assert float(img.min()) >= 0.0
        assert float(img.max()) <= 1.0
    assert sample.boxes.dtype == torch.float32
    assert sample.boxes.shape[1] == 4


# ---------------------------------------------------------------- fundus lesions follow the grade
def _lesions(grade: int, seeds: int = 6) -> list[torch.Tensor]:
    return [render_fundus(SIZE, grade, torch.Generator().manual_seed(s))[3] for s in range(seeds)]


def test_lesion_counts_and_kinds_follow_grade() -> None:
    mean_counts = []
    for grade in range(5):
        kinds = _lesions(grade)
        mean_counts.append(sum(k.numel() for k in kinds) / len(kinds))
        present = set(torch.cat(kinds).tolist())
        if grade == 0:
            assert present == set()
        if grade == 1:
            assert present == {FUNDUS_LESIONS.index("microaneurysm")}
        if grade >= 1:
            assert all(k.numel() > 0 for k in kinds)
        if grade < 4:
            assert FUNDUS_LESIONS.index("neovascularisation") not in present
        else:
            assert FUNDUS_LESIONS.index("neovascularisation") in present
    assert all(a < b for a, b in zip(mean_counts, mean_counts[1:], strict=False)), mean_counts


@given(seed=st.integers(0, 10_000), grade=st.integers(1, 4))
def test_fundus_boxes_inside_image_and_fov(seed: int, grade: int) -> None:
    image, fov, boxes, kinds = render_fundus(SIZE, grade, torch.Generator().manual_seed(seed))
    assert boxes.shape == (kinds.numel(), 4)
    assert bool((boxes >= 0).all())
    assert bool((boxes <= SIZE - 1).all())
    assert bool((boxes[:, 2] >= boxes[:, 0]).all())
    assert bool((boxes[:, 3] >= boxes[:, 1]).all())
    corners = torch.cat([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]]).round().long()
    assert bool(fov[0, corners[:, 1], corners[:, 0]].all())
    assert bool((image[:, ~fov[0]] == 0).all())


def test_grade_zero_samples_have_no_boxes() -> None:
    data = SyntheticFundus(n=8, size=SIZE, seed=0, grade_probs=(1, 0, 0, 0, 0))
    for i in range(len(data)):
        sample = data[i]
        assert sample.grade == 0
        assert sample.boxes.shape == (0, 4)
        assert sample.lesion_names == []


# ---------------------------------------------------------------- quality labels
@pytest.mark.parametrize("cls", [SyntheticFundus, SyntheticChestXray])
def test_quality_labels_ordered_by_severity(cls) -> None:  # noqa: ANN001
    data = cls(n=40, size=32, seed=1)
    by_quality: dict[int, list[float]] = {0: [], 1: [], 2: []}
    mse: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for i in range(len(data)):
        s = data[i]
        by_quality[s.quality].append(s.severity)
        mse[s.quality].append(float(((s.image - s.clean_image) ** 2).mean()))
        if s.severity == 0:
            assert torch.equal(s.image, s.clean_image)
            assert s.degradations == ()
    assert all(by_quality[q] for q in range(3)), by_quality
    assert max(by_quality[0]) < min(by_quality[1])
    assert max(by_quality[1]) < min(by_quality[2])
    means = [sum(v) / len(v) for v in mse.values()]
    assert means[0] < means[1] < means[2], means


# ---------------------------------------------------------------- chest X-ray labels
def test_chestxray14_label_names_in_official_order() -> None:
    assert CHESTXRAY14_LABELS == (
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural_Thickening",
        "Hernia",
    )


def test_chest_xray_boxes_match_localised_labels() -> None:
    data = SyntheticChestXray(n=40, size=SIZE, seed=2)
    seen = set()
    normals = 0
    for i in range(len(data)):
        s = data[i]
        assert s.labels.shape == (14,)
        assert set(s.labels.unique().tolist()) <= {0.0, 1.0}
        positive = set(torch.nonzero(s.labels).flatten().tolist())
        seen |= positive
        normals += not positive
        assert set(s.box_labels.tolist()) == positive & LOCALISED
        assert s.box_labels.numel() == len(positive & LOCALISED)
        assert bool((s.boxes >= 0).all())
        assert bool((s.boxes <= SIZE - 1).all())
        assert bool((s.boxes[:, 2] > s.boxes[:, 0]).all())
        assert bool((s.boxes[:, 3] > s.boxes[:, 1]).all())
    assert normals > 0
    assert len(seen) >= 8


def test_every_finding_renders_and_changes_the_image() -> None:
    from mlcl_losses.synthetic import render_chest_xray

    base = render_chest_xray(SIZE, torch.zeros(14), torch.Generator().manual_seed(0))[0]
    for label in range(14):
        labels = torch.zeros(14)
        labels[label] = 1
        img, boxes, box_labels = render_chest_xray(SIZE, labels, torch.Generator().manual_seed(0))
        assert float((img - base).abs().max()) > 0.02, CHESTXRAY14_LABELS[label]
        assert box_labels.tolist() == ([label] if label in LOCALISED else [])


# ---------------------------------------------------------------- views from synthetic records
def test_view_records_feed_the_four_view_dataset() -> None:
    from mlcl_losses.degrade import XrayDegradation

    with pytest.warns(DeprecationWarning, match="build the records directly"):
        records = view_records(SyntheticChestXray(n=3, size=SIZE, seed=0))
    data = FourViewDataset(records, FourViewSampler(patch_size=16), XrayDegradation(0.6, "random"))
    views, tags = collate_four_views([data[i] for i in range(3)])
    assert views.shape[1:] == (1, 16, 16)
    assert len(tags) == views.shape[0]
    assert tags.label is None


# ---------------------------------------------------------------- throughput (reported, never asserted)
@pytest.mark.parametrize("cls", [SyntheticFundus, SyntheticChestXray])
def test_throughput_is_reported(cls, record_property) -> None:  # noqa: ANN001
    data = cls(n=10, size=256, seed=0)  # one thread (fixture)
    data[0]
    start_cpu, start = time.process_time(), time.perf_counter()
    for i in range(1, 10):
        data[i]
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    rate = f"{cls.__name__}: {9 / cpu:.0f} images/s (CPU time), {9 / wall:.0f} images/s (wall), 256 px, 1 thread"
    record_property("throughput", rate)
    logger.info(rate)
    print(rate)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": -1}, ValueError),
        ({"size": 16}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"quality_probs": (1, 1)}, ValueError),
        ({"quality_probs": (-1, 1, 1)}, ValueError),
        ({"severity_ranges": ((0.5, 0.6), (0.1, 0.2), (0.7, 1.0))}, ValueError),
        ({"severity_ranges": ((0.0, 0.1), (0.3, 1.2), (0.7, 1.0))}, ValueError),
    ],
    ids=["n", "size", "seed", "probs-len", "probs-neg", "ranges-order", "ranges-bound"],
)
@pytest.mark.parametrize("cls", [SyntheticFundus, SyntheticChestXray])
def test_dataset_validation(cls, kwargs: dict, error: type[Exception]) -> None:  # noqa: ANN001
    with pytest.raises(error):
        cls(**({"n": 2} | kwargs))


def test_index_validation() -> None:
    data = SyntheticFundus(n=2, size=SIZE)
    with pytest.raises(IndexError):
        data[2]
    with pytest.raises(TypeError):
        data["0"]  # type: ignore[index]
    with pytest.raises(ValueError, match="grade_probs"):
        SyntheticFundus(n=2, grade_probs=(1, 1))
    with pytest.raises(ValueError, match="normal_prob"):
        SyntheticChestXray(n=2, normal_prob=1.5)


def _draw_lines_whole_map(
    points: torch.Tensor,
    widths: torch.Tensor,
    step: float,
    h: int,
    w: int,
    bins: torch.Tensor,
    groups: torch.Tensor | None,
    n_groups: int,
) -> torch.Tensor:
    """Slow, obviously correct draw_lines: splat every bin, blur each whole map, take the maximum."""
    nb = bins.numel()
    which = torch.argmin((widths[:, None] - bins[None, :]).abs(), dim=1)
    maps = which * n_groups + (0 if groups is None else groups)
    dens = splat(points, torch.full((points.shape[0],), step), h, w, maps, nb * n_groups).view(nb, n_groups, h, w)
    out = torch.zeros(n_groups, h, w)
    for b in range(nb):
        sigma = float(bins[b])
        out = torch.maximum(out, gaussian_blur(dens[b : b + 1], sigma)[0] * (sigma * math.sqrt(2 * math.pi)))
    return out.mul_(1.4).clamp_(0, 1)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (64, 48), (256, 256)], ids=["32", "64x48", "256"])
@pytest.mark.parametrize("seed", range(4))
def test_draw_lines_windows_equal_whole_map_blur(h: int, w: int, seed: int) -> None:
    """Blurring each width bin in a window around its points gives the whole-map result, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    n = 12
    # curves from anywhere (some start or run off the image), a few widths per curve
    start = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    pts, _ = walk(g, start, 6.3 * torch.rand(n, generator=g), torch.randn(n, generator=g) * 0.02, 60, 1.2, 0.1)
    widths = (0.3 + 2.5 * torch.rand(n, generator=g))[:, None].expand(n, 60).reshape(-1)
    groups = torch.randint(0, 2, (n,), generator=g)[:, None].expand(n, 60).reshape(-1)
    pts = pts.reshape(-1, 2)
    for bins in (torch.tensor([0.55, 0.9, 1.35]), torch.tensor([0.5]), torch.tensor([0.6, 1.1, 2.5, 9.0])):
        fast = draw_lines(pts, widths, 1.2, h, w, bins, groups, 2)
        slow = _draw_lines_whole_map(pts, widths, 1.2, h, w, bins, groups, 2)
        assert torch.equal(fast, slow), f"bins {bins.tolist()}: max difference {(fast - slow).abs().max():.3g}"
    # a bin whose points all lie off the image, and no points at all
    off = torch.tensor([[-5.0, 3.0], [w + 4.0, 2.0]])
    bins = torch.tensor([0.55, 1.35])
    fast = draw_lines(off, torch.tensor([0.5, 1.4]), 1.2, h, w, bins)
    assert torch.equal(fast, _draw_lines_whole_map(off, torch.tensor([0.5, 1.4]), 1.2, h, w, bins, None, 1))
    assert torch.equal(draw_lines(torch.zeros(0, 2), torch.zeros(0), 1.2, h, w, bins), torch.zeros(1, h, w))


@pytest.mark.parametrize("size", [32, 64, 255, 256], ids=lambda s: f"S{s}")
def test_fov_geometry_equals_mean_of_pixel_indices(size: int) -> None:
    """The fast FOV centre (from row and column counts) equals the float32 mean of the FOV pixels' indices."""
    g = torch.Generator().manual_seed(size)
    xs = torch.arange(size, dtype=torch.float32).view(1, size)
    ys = xs.view(size, 1)
    for _ in range(20):
        cx, cy = (size - 1) / 2 + 4 * torch.randn(2, generator=g)
        radius = size * (0.25 + 0.25 * float(torch.rand(1, generator=g)))
        fov = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        rows, cols = torch.nonzero(fov, as_tuple=True)
        expected = (float(cols.float().mean()), float(rows.float().mean()), math.sqrt(int(fov.sum()) / math.pi))
        assert _fov_geometry(fov) == expected


@pytest.mark.parametrize("size", [32, 33, 64, 255, 256], ids=lambda s: f"S{s}")
def test_renderer_fov_geometry_is_the_moment_geometry(size: int) -> None:
    """The renderer hands the degradation its FOV's centre and radius; they equal those from the moments."""
    for seed in range(10):
        _, fov, _, _ = render_fundus(size, 0, torch.Generator().manual_seed(seed))
        assert _centred_fov_geometry(fov) == _fov_geometry(fov[0])


@pytest.mark.parametrize("cls", [SyntheticFundus, SyntheticChestXray])
def test_samples_are_ordinary_tensors(cls) -> None:  # noqa: ANN001
    # rendered under inference mode for speed; what a user gets must allow in-place ops and autograd
    sample = cls(n=2, size=64, seed=0)[1]
    tensors = [v for v in vars(sample).values() if isinstance(v, torch.Tensor)]
    assert tensors
    assert not any(t.is_inference() for t in tensors)
    sample.image.mul_(1.0)
    assert sample.image.clone().requires_grad_().sum().requires_grad
