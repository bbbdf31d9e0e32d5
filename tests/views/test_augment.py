"""Tests of the light patch augmentation (mlcl_losses.views.augment)."""

from __future__ import annotations

import pytest
import torch
from views_cases import P, random_image

from mlcl_losses.views import LightAugment

pytestmark = pytest.mark.usefixtures("one_thread")


def test_light_augment_is_seeded() -> None:
    patch = random_image()[:, :P, :P]
    aug = LightAugment()
    a = aug(patch, torch.Generator().manual_seed(5))
    b = aug(patch, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("brightness", float("nan"), ValueError, r"`brightness` in \[0, 1\).*got nan"),
        ("brightness", 5.0, ValueError, r"`brightness` in \[0, 1\).*got 5.0"),
        ("contrast", -0.1, ValueError, r"`contrast` in \[0, 1\).*got -0.1"),
        ("saturation", "0.1", TypeError, r"`saturation` to be a number.*got str"),
    ],
    ids=["nan-brightness", "brightness-5", "negative-contrast", "string-saturation"],
)
def test_light_augment_refuses_bad_strengths(field: str, value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LightAugment(**{field: value})  # type: ignore[arg-type]


def test_light_augment_refuses_bad_patches_and_generator() -> None:
    patch = random_image()[:, :P, :P]
    g = torch.Generator().manual_seed(0)
    aug = LightAugment()
    nan = patch.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`patch` to be finite.*NaN"):
        aug(nan, g)
    with pytest.raises(TypeError, match=r"`patch` to be a float tensor.*torch\.uint8"):
        aug((patch * 255).to(torch.uint8), g)
    with pytest.raises(ValueError, match=r"`patch` values in \[0, 1\], but got values in .*divided by 255"):
        aug(patch * 255, g)
    with pytest.raises(ValueError, match=r"`patch` of shape \(C, P, P\)"):
        aug(patch[None], g)
    with pytest.raises(TypeError, match="`generator` to be a torch.Generator, but got NoneType"):
        aug(patch, None)  # type: ignore[arg-type]
    rounded = patch.clone()
    rounded[0, 0, 0] = 1.0000001  # resampling rounds just past 1: accepted, and the output is clamped
    assert float(aug(rounded, g).max()) <= 1.0
