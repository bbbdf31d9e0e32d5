"""The fundus functions on real photographs shipped with scikit-image (no download).

``skimage.data.retina()`` is a real colour fundus photograph (1411 x 1411, uint8 RGB) and
``skimage.data.microaneurysms()`` a real grayscale retina detail (102 x 102, uint8). Grayscale input
becomes the pipelines' three channels by repeating the grey value in R, G and B (what
:func:`examples.common.images.load_image` with ``mode="RGB"`` does, through PIL's ``convert``);
:func:`mlcl_losses.degrade.degrade_fundus` also takes the single channel directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlcl_losses.degrade import FUNDUS_COMBINATIONS, FundusDegradation, degrade_fundus, estimate_fov
from mlcl_losses.views import FourViewSampler

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the real photographs")


def _as_tensor(array) -> torch.Tensor:  # noqa: ANN001 - numpy uint8, (H, W) or (H, W, 3)
    x = torch.from_numpy(array).float() / 255.0
    return x[None] if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def _resized(image: torch.Tensor, size: int) -> torch.Tensor:
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


@pytest.fixture(scope="module")
def retina() -> torch.Tensor:
    """The real photograph, ``(3, 1411, 1411)`` float in [0, 1]."""
    image = _as_tensor(skimage_data.retina())
    assert image.shape == (3, 1411, 1411)
    return image


@pytest.fixture(scope="module")
def retina_256(retina: torch.Tensor) -> torch.Tensor:
    return _resized(retina, 256)


@pytest.fixture(scope="module")
def microaneurysms() -> torch.Tensor:
    """The real grayscale detail, ``(1, 102, 102)`` float in [0, 1]."""
    image = _as_tensor(skimage_data.microaneurysms())
    assert image.shape == (1, 102, 102)
    return image


def _check_image(out: torch.Tensor, like: torch.Tensor) -> None:
    assert out.shape == like.shape
    assert out.dtype == like.dtype
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_fov_of_the_real_photograph_is_its_disc(retina: torch.Tensor) -> None:
    image = _resized(retina, 512)
    fov = estimate_fov(image)[0]
    assert fov.shape == (512, 512)
    assert not bool(fov[[0, 0, -1, -1], [0, -1, 0, -1]].any())  # the four corners are background
    assert bool(fov[256, 256])
    # the photograph's field of view is a disc: compare the mask with the disc of the same centre and area
    ys, xs = torch.nonzero(fov, as_tuple=True)
    cx, cy = xs.float().mean(), ys.float().mean()
    radius = math.sqrt(int(fov.sum()) / math.pi)
    grid_y, grid_x = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    disc = (grid_x - cx) ** 2 + (grid_y - cy) ** 2 <= radius**2
    iou = float((fov & disc).sum()) / float((fov | disc).sum())
    assert iou > 0.97, iou
    assert 0.4 * 512 < radius < 0.52 * 512  # the disc nearly fills the square photograph


def test_fov_at_full_resolution_matches_the_downsampled_one(retina: torch.Tensor) -> None:
    full = estimate_fov(retina)[0].float()
    down = F.interpolate(full[None, None], size=(256, 256), mode="area")[0, 0] > 0.5
    small = estimate_fov(_resized(retina, 256))[0]
    agree = float((down == small).float().mean())
    assert agree > 0.99, agree


@pytest.mark.parametrize("severity", [0.5, 1.0])
@pytest.mark.parametrize("kinds", FUNDUS_COMBINATIONS, ids=lambda k: "+".join(k))
def test_every_degradation_on_the_real_photograph(
    retina_256: torch.Tensor, kinds: tuple[str, ...], severity: float
) -> None:
    fov = estimate_fov(retina_256)
    out = degrade_fundus(retina_256, severity, kinds, fov=fov, seed=3)
    _check_image(out, retina_256)
    outside = ~fov.expand_as(retina_256)
    assert torch.equal(out[outside], retina_256[outside])  # the background is never touched
    assert float((out - retina_256).abs().max()) > 0.05  # visibly changed (spots touch few pixels)


@pytest.mark.parametrize("kinds", FUNDUS_COMBINATIONS, ids=lambda k: "+".join(k))
def test_degradation_of_the_real_photograph_grows_with_severity(
    retina_256: torch.Tensor, kinds: tuple[str, ...]
) -> None:
    change = [float((degrade_fundus(retina_256, s, kinds, seed=3) - retina_256).abs().mean()) for s in (0.5, 1.0)]
    assert change[1] > change[0] > 0.0


def test_random_degradation_of_the_real_photograph_batch(retina_256: torch.Tensor) -> None:
    batch = torch.stack([retina_256, retina_256.flip(-1)])
    out = FundusDegradation(severity=(0.3, 1.0), kinds="random")(batch, generator=torch.Generator().manual_seed(0))
    _check_image(out, batch)


def test_grayscale_detail_degrades_as_one_channel_and_as_three(microaneurysms: torch.Tensor) -> None:
    fov = estimate_fov(microaneurysms)
    assert bool(fov.all())  # a crop inside the field of view: no dark background
    gray = degrade_fundus(microaneurysms, 0.8, ("illumination", "spot", "blur"), seed=1)
    _check_image(gray, microaneurysms)
    rgb = microaneurysms.expand(3, -1, -1).contiguous()  # grey repeated in R, G and B
    out = degrade_fundus(rgb, 0.8, ("illumination", "spot", "blur"), seed=1)
    _check_image(out, rgb)
    assert not torch.equal(out, rgb)


def test_grayscale_file_is_read_as_three_equal_channels(microaneurysms: torch.Tensor, tmp_path: Path) -> None:
    from examples.common.images import load_image
    from PIL import Image

    path = tmp_path / "microaneurysms.png"
    Image.fromarray(skimage_data.microaneurysms()).save(path)
    rgb = load_image(path, "RGB")
    assert rgb.shape == (3, 102, 102)
    assert torch.equal(rgb[0], rgb[1])
    assert torch.equal(rgb[1], rgb[2])
    torch.testing.assert_close(rgb[:1], microaneurysms, rtol=0, atol=0)


def test_four_views_of_the_real_photograph(retina_256: torch.Tensor) -> None:
    boxes = torch.tensor([[120.0, 100.0, 136.0, 118.0], [60.0, 150.0, 90.0, 170.0]])
    sampler = FourViewSampler(patch_size=32, n_healthy=2)
    out = sampler(retina_256, boxes, degradation=FundusDegradation(severity=0.8), label=1, seed=0)
    assert out.views.shape == (3 * 2 + 2 * 2, 3, 32, 32)
    assert bool(torch.isfinite(out.views).all())
    assert float(out.views.min()) >= 0.0
    assert float(out.views.max()) <= 1.0
    assert out.tags.kind.tolist() == [1] * 6 + [0] * 4
