"""Tests of cutting the four views of one image (mlcl_losses.views.sampler)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from views_cases import BOXES, P, random_image

from mlcl_losses.degrade import FundusDegradation
from mlcl_losses.synthetic import SyntheticFundus
from mlcl_losses.tags import Kind, Quality
from mlcl_losses.views import FourViews, FourViewSampler, crop_square

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shapes_and_tags_follow_design() -> None:
    sampler = FourViewSampler(patch_size=P, n_healthy=3)
    image = random_image()
    out = sampler(image, BOXES, degraded=image * 0.5, label=2, image_id=7, source_offset=10, seed=0)
    assert isinstance(out, FourViews)
    k, m = 2, 3
    assert out.views.shape == (3 * k + 2 * m, 3, P, P)
    assert out.views.dtype == torch.float32
    t = out.tags
    lesion, healthy = int(Kind.LESION), int(Kind.HEALTHY)
    high, low = int(Quality.HIGH), int(Quality.LOW)
    assert t.kind.tolist() == [lesion] * 6 + [healthy] * 6
    # V1a x K, V1b x K, V2 x K, V3 x M, V4 x M
    assert t.quality.tolist() == [high] * 4 + [low] * 2 + [high] * 3 + [low] * 3
    assert t.source.tolist() == [10, 11] * 3 + [12, 13, 14] * 2
    assert t.label is not None
    assert t.label.tolist() == [2] * 12
    assert t.image is not None
    assert t.image.tolist() == [7] * 12


def test_optional_tags_absent_when_not_given() -> None:
    out = FourViewSampler(patch_size=P)(random_image(), BOXES, degraded=random_image(1), seed=0)
    assert out.tags.label is None
    assert out.tags.image is None


def test_v2_and_v4_are_the_same_crops_from_the_degraded_image() -> None:
    image = random_image()
    degraded = 1.0 - image
    sampler = FourViewSampler(patch_size=P, n_healthy=2, augment=None)
    views, _ = sampler(image, BOXES, degraded=degraded, seed=1)
    k, m = 2, 2
    v1a, v1b, v2 = views[:k], views[k : 2 * k], views[2 * k : 3 * k]
    v3, v4 = views[3 * k : 3 * k + m], views[3 * k + m :]
    torch.testing.assert_close(v1a, v1b)
    torch.testing.assert_close(v2, 1.0 - v1a)
    torch.testing.assert_close(v4, 1.0 - v3)


def test_augmented_views_differ_but_stay_in_range() -> None:
    image = random_image()
    views, _ = FourViewSampler(patch_size=P)(image, BOXES, degraded=image, seed=3)
    assert not torch.equal(views[:2], views[2:4])
    assert float(views.min()) >= 0.0
    assert float(views.max()) <= 1.0


def _marked(box: tuple[int, int, int, int], size: int = 64) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    return image


@given(
    x1=st.integers(0, 60),
    y1=st.integers(0, 60),
    w=st.integers(1, 14),
    h=st.integers(1, 14),
    seed=st.integers(0, 1000),
)
def test_small_box_is_wholly_inside_its_jittered_patch(x1: int, y1: int, w: int, h: int, seed: int) -> None:
    x2, y2 = min(64, x1 + w), min(64, y1 + h)
    image = _marked((x1, y1, x2, y2))
    sampler = FourViewSampler(patch_size=P, n_healthy=0, augment=None)
    views, _ = sampler(image, [[x1, y1, x2, y2]], degraded=image, seed=seed)
    # an exact copy (no resizing): the whole box content is in the patch
    assert float(views[0].sum()) == float((x2 - x1) * (y2 - y1))


@given(
    x1=st.integers(0, 40),
    y1=st.integers(0, 40),
    w=st.integers(20, 64),
    h=st.integers(8, 64),
    seed=st.integers(0, 1000),
)
def test_large_box_is_resized_not_cut(x1: int, y1: int, w: int, h: int, seed: int) -> None:
    x2, y2 = min(64, x1 + w), min(64, y1 + h)
    box = torch.tensor([x1, y1, x2, y2], dtype=torch.float32)
    sampler = FourViewSampler(patch_size=P, n_healthy=0, augment=None)
    x0, y0, side = sampler.lesion_region(box, 64, 64, (0.3, 0.8))
    assert side >= max(P, x2 - x1, y2 - y1)
    assert x0 <= x1
    assert y0 <= y1
    assert x0 + side >= x2
    assert y0 + side >= y2
    image = _marked((x1, y1, x2, y2))
    views, _ = sampler(image, box[None], degraded=image, seed=seed)
    # area is preserved up to the scale factor (and the resampling at the patch border): nothing was cut
    scale = (views.shape[-1] / side) ** 2
    assert float(views[0].sum()) == pytest.approx((x2 - x1) * (y2 - y1) * scale, rel=0.05, abs=1.0)


def test_box_larger_than_image_is_padded_not_cut() -> None:
    image = torch.ones(1, 20, 40)
    views, _ = FourViewSampler(patch_size=P, n_healthy=0, augment=None)(image, [[0, 0, 40, 20]], degraded=image, seed=0)
    assert float(views[0].sum()) == pytest.approx(40 * 20 * (P / 40) ** 2, rel=0.05)


def test_crop_square_is_exact_copy_at_patch_size() -> None:
    image = random_image()
    torch.testing.assert_close(crop_square(image, 5, 7, P, P), image[:, 7 : 7 + P, 5 : 5 + P], rtol=0, atol=0)


def test_healthy_patches_avoid_lesions_and_background() -> None:
    image = random_image()
    image[:, :, :20] = 0.0  # background strip
    boxes = torch.tensor([[20.0, 0.0, 40.0, 64.0]])
    sampler = FourViewSampler(patch_size=P, n_healthy=4)
    regions = sampler.healthy_regions(image, boxes, torch.Generator().manual_seed(0))
    assert len(regions) == 4
    for x0, _, side in regions:
        assert x0 >= 40
        assert side == P


def test_given_healthy_boxes_are_used() -> None:
    image = random_image()
    out = FourViewSampler(patch_size=P, n_healthy=5, augment=None)(
        image, BOXES, degraded=image, healthy_boxes=[[40, 40, 56, 56]], seed=0
    )
    assert out.views.shape[0] == 3 * 2 + 2
    torch.testing.assert_close(out.views[-1], image[:, 40:56, 40:56])


def test_degradation_callable_and_seed_reproducible() -> None:
    image = SyntheticFundus(n=1, size=64, seed=0)[0].clean_image
    sampler = FourViewSampler(patch_size=P)
    degrade = FundusDegradation(severity=0.8)
    a = sampler(image, BOXES, degradation=degrade, seed=11)
    b = sampler(image, BOXES, degradation=degrade, seed=11)
    assert torch.equal(a.views, b.views)
    assert a.tags.equal(b.tags)


def test_no_lesions_gives_only_healthy_views() -> None:
    out = FourViewSampler(patch_size=P, n_healthy=2)(
        random_image(), torch.zeros(0, 4), degraded=random_image(1), seed=0
    )
    assert out.views.shape[0] == 4
    assert out.tags.kind.tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"boxes": [[1, 2, 3]]}, ValueError, "boxes"),
        ({"boxes": [[10, 10, 5, 20]]}, ValueError, "x2 >= x1"),
        ({"boxes": [[100, 100, 120, 120]]}, ValueError, "overlap"),
        ({"boxes": "box"}, TypeError, "boxes"),
        ({"degraded": None}, ValueError, "exactly one"),
        ({"degradation": FundusDegradation()}, ValueError, "exactly one"),
        ({"degraded": torch.rand(3, 32, 32)}, ValueError, "same shape"),
        ({"image": torch.rand(1, 3, 64, 64)}, ValueError, "image"),
        ({"label": -1}, ValueError, "label"),
    ],
    ids=["box-shape", "box-order", "box-outside", "box-type", "no-degraded", "both", "degraded-shape", "4d", "label"],
)
def test_sampler_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    image = random_image()
    args = {"image": image, "boxes": BOXES, "degraded": image, "seed": 0} | kwargs
    with pytest.raises(error, match=match):
        FourViewSampler(patch_size=P)(**args)


@pytest.mark.parametrize(
    "kwargs",
    [{"patch_size": 0}, {"n_healthy": -1}, {"jitter": 1.5}, {"min_content": -0.1}, {"augment": 3}],
    ids=["patch", "healthy", "jitter", "content", "augment"],
)
def test_sampler_argument_validation(kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        FourViewSampler(**kwargs)
