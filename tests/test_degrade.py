"""Tests of the low-quality simulators (mlcl_losses.degrade)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlcl_losses.degrade import (
    FUNDUS_COMBINATIONS,
    FUNDUS_KINDS,
    XRAY_KINDS,
    FundusDegradation,
    XrayDegradation,
    degrade_fundus,
    degrade_xray,
    estimate_fov,
    jpeg_compress,
)
from mlcl_losses.degrade.fundus import _HALO_TINTS, _fov_geometry
from mlcl_losses.synthetic import render_chest_xray, render_fundus

pytestmark = pytest.mark.usefixtures("one_thread")


def _fundus(seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    image, fov, _, _ = render_fundus(size, 2, torch.Generator().manual_seed(seed))
    return image, fov


def _xray(seed: int = 0, size: int = 64) -> torch.Tensor:
    labels = torch.zeros(14)
    return render_chest_xray(size, labels, torch.Generator().manual_seed(seed))[0]


FUNDUS = _fundus()
XRAY = _xray()


# ---------------------------------------------------------------- determinism and identity
@pytest.mark.parametrize("kinds", FUNDUS_COMBINATIONS, ids=lambda k: "+".join(k))
def test_fundus_same_seed_same_output(kinds: tuple[str, ...]) -> None:
    image, _ = FUNDUS
    a = degrade_fundus(image, 0.7, kinds, seed=3)
    b = degrade_fundus(image, 0.7, kinds, generator=torch.Generator().manual_seed(3))
    c = degrade_fundus(image, 0.7, kinds, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", XRAY_KINDS)
def test_xray_same_seed_same_output(kind: str) -> None:
    a = degrade_xray(XRAY, 0.7, (kind,), seed=3)
    b = degrade_xray(XRAY, 0.7, (kind,), seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kinds", FUNDUS_COMBINATIONS, ids=lambda k: "+".join(k))
def test_fundus_severity_zero_is_identity(kinds: tuple[str, ...]) -> None:
    image, _ = FUNDUS
    assert torch.equal(degrade_fundus(image, 0.0, kinds, seed=0), image)


@pytest.mark.parametrize("kind", XRAY_KINDS)
def test_xray_severity_zero_is_identity(kind: str) -> None:
    assert torch.equal(degrade_xray(XRAY, 0.0, (kind,), seed=0), XRAY)


# ---------------------------------------------------------------- degradation grows with severity
SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _mean_mse(fn, clean: torch.Tensor, severity: float, seeds: int = 6) -> float:  # noqa: ANN001
    return sum(float(((fn(clean, severity, s) - clean) ** 2).mean()) for s in range(seeds)) / seeds


@pytest.mark.parametrize("kinds", FUNDUS_COMBINATIONS, ids=lambda k: "+".join(k))
def test_fundus_mse_rises_with_severity(kinds: tuple[str, ...]) -> None:
    image, fov = FUNDUS
    mse = [_mean_mse(lambda x, v, s: degrade_fundus(x, v, kinds, fov=fov, seed=s), image, v) for v in SEVERITIES]
    assert mse[0] == 0.0
    assert all(a < b for a, b in zip(mse, mse[1:], strict=False)), mse


@pytest.mark.parametrize("kind", XRAY_KINDS)
def test_xray_mse_rises_with_severity(kind: str) -> None:
    mse = [_mean_mse(lambda x, v, s: degrade_xray(x, v, (kind,), seed=s), XRAY, v) for v in SEVERITIES]
    assert mse[0] == 0.0
    assert all(a < b for a, b in zip(mse, mse[1:], strict=False)), mse


def _sharpness(x: torch.Tensor) -> float:
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean())


def test_blur_lowers_sharpness() -> None:
    xray = [_sharpness(degrade_xray(XRAY, v, ("blur",), seed=1)) for v in SEVERITIES]
    assert all(a > b for a, b in zip(xray, xray[1:], strict=False)), xray
    # fundus blur adds slight sensor noise: compare at half resolution, where the noise averages out
    image, fov = FUNDUS
    fundus = [
        _sharpness(torch.nn.functional.avg_pool2d(degrade_fundus(image, v, ("blur",), fov=fov, seed=1), 2))
        for v in (0.0, 0.5, 1.0)
    ]
    assert fundus[0] > fundus[1] > fundus[2], fundus


def test_contrast_compression_lowers_std() -> None:
    std = [float(degrade_xray(XRAY, v, ("contrast",), seed=0).std()) for v in SEVERITIES]
    assert all(a > b for a, b in zip(std, std[1:], strict=False)), std


def _naive_illumination(img: torch.Tensor, fov: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    """Shen et al.'s colour shift, halo and dark hole, step by step from the module's formulas (float64)."""
    c, h, w = img.shape
    cx, cy, radius = _fov_geometry(fov[0])
    r = torch.rand(16, generator=g).double().tolist()
    tint = _HALO_TINTS[int(r[0] * 3) % 3].double()
    x, inside = img.double(), fov[0]

    def grey_of(t: torch.Tensor) -> torch.Tensor:
        return 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2] if c == 3 else t.mean(0)

    out = x * (1.0 + s * (-0.45 + 0.75 * r[1]))
    mean_grey = grey_of(out)[inside].mean()
    out = (mean_grey + (1.0 - s * (0.15 + 0.45 * r[2])) * (out - mean_grey)).clamp(0, 1)
    if c == 3:
        grey = grey_of(out)
        out = (grey + (1.0 + s * (-0.5 + 0.9 * r[3])) * (out - grey)).clamp(0, 1)
    ys, xs = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    hx, hy = cx + radius * 0.3 * (2 * r[4] - 1), cy + radius * 0.3 * (2 * r[5] - 1)
    inner, soft = radius * (0.5 + 0.35 * r[6]), radius * (0.12 + 0.18 * r[7])
    ring = torch.sigmoid((((xs - hx) ** 2 + (ys - hy) ** 2).sqrt() - inner) / soft)
    amp = s * (0.6 + 0.6 * r[8]) * x.mean(0)[inside].mean()
    out = out + amp * (tint if c == 3 else tint.mean().view(1)).view(c, 1, 1) * ring
    ox, oy = cx + radius * 0.35 * (2 * r[9] - 1), cy + radius * 0.35 * (2 * r[10] - 1)
    hole_r = radius * (0.3 + 0.25 * r[11])
    disc = torch.sigmoid((hole_r - ((xs - ox) ** 2 + (ys - oy) ** 2).sqrt()) / (hole_r * (0.3 + 0.3 * r[12])))
    return (out - s * (0.12 + 0.2 * r[13]) * disc).clamp(0, 1)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("severity", [0.2, 1.0])
def test_fundus_illumination_equals_naive_formulas(channels: int, severity: float) -> None:
    image, fov = FUNDUS
    image = image[:channels]
    out = degrade_fundus(image, severity, ("illumination",), fov=fov, seed=3)
    expected = torch.where(fov, _naive_illumination(image, fov, severity, torch.Generator().manual_seed(3)), image)
    assert float((out.double() - expected).abs().max()) < 2e-6
    assert float((out - image).abs().max()) > 0.05  # it did degrade


# ---------------------------------------------------------------- field of view, range, shape, dtype
@pytest.mark.parametrize("given_fov", [True, False], ids=["given-fov", "estimated-fov"])
def test_fundus_outside_fov_unchanged(given_fov: bool) -> None:
    image, fov = FUNDUS
    out = degrade_fundus(image, 1.0, FUNDUS_KINDS, fov=fov if given_fov else None, seed=0)
    outside = ~fov.expand_as(image)
    assert torch.equal(out[outside], image[outside])
    assert bool((out[outside] == 0).all())


def test_estimate_fov_matches_rendered_circle() -> None:
    image, fov = FUNDUS
    est = estimate_fov(image)
    assert est.shape == fov.shape
    assert float((est != fov).float().mean()) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("domain", ["fundus", "xray"])
def test_output_shape_dtype_range(dtype: torch.dtype, domain: str, device: torch.device) -> None:
    if domain == "fundus":
        x = FUNDUS[0].to(device, dtype)
        out = degrade_fundus(x, 0.9, FUNDUS_KINDS, seed=0)
    else:
        x = XRAY.to(device, dtype)
        out = degrade_xray(x, 0.9, XRAY_KINDS, seed=0)
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_batched_equals_per_image_with_same_generator() -> None:
    images = torch.stack([_fundus(s)[0] for s in range(3)])
    severities = [0.2, 0.6, 1.0]
    batched = degrade_fundus(images, severities, seed=7)
    g = torch.Generator().manual_seed(7)
    single = torch.stack([degrade_fundus(img, sev, generator=g) for img, sev in zip(images, severities, strict=True)])
    torch.testing.assert_close(batched, single, rtol=0, atol=0)

    xrays = torch.stack([_xray(s) for s in range(3)])
    batched = degrade_xray(xrays, 0.8, XRAY_KINDS, seed=7)
    g = torch.Generator().manual_seed(7)
    single = torch.stack([degrade_xray(x, 0.8, XRAY_KINDS, generator=g) for x in xrays])
    torch.testing.assert_close(batched, single, rtol=0, atol=0)


@given(severity=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), combo=st.sampled_from(FUNDUS_COMBINATIONS))
def test_fundus_property_range_and_fov(severity: float, seed: int, combo: tuple[str, ...]) -> None:
    image, fov = FUNDUS
    out = degrade_fundus(image, severity, combo, fov=fov, seed=seed)
    assert out.shape == image.shape
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0
    assert torch.equal(out[~fov.expand_as(image)], image[~fov.expand_as(image)])


@given(
    severity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    kinds=st.sets(st.sampled_from(XRAY_KINDS), min_size=1),
)
def test_xray_property_range(severity: float, seed: int, kinds: set[str]) -> None:
    out = degrade_xray(XRAY, severity, tuple(kinds), seed=seed)
    assert out.shape == XRAY.shape
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


# ---------------------------------------------------------------- JPEG
def test_jpeg_quality_orders_error_and_blocks() -> None:
    x = XRAY
    errors = [float((jpeg_compress(x, q) - x).abs().mean()) for q in (95, 50, 10)]
    assert errors[0] < errors[1] < errors[2]
    y = jpeg_compress(x, 5)
    # block artefacts: jumps across 8x8 block borders exceed jumps inside blocks
    dx = (y[..., 1:] - y[..., :-1]).abs().mean(dim=(0, 1))
    border = dx[7::8].mean()
    inner = torch.cat([dx[i::8] for i in range(7)]).mean()
    assert border > 1.5 * inner


@pytest.mark.parametrize("quality", [0, 101, 2.5])
def test_jpeg_rejects_bad_quality(quality: float) -> None:
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(XRAY, quality)  # type: ignore[arg-type]


# ---------------------------------------------------------------- callable classes
def test_degradation_classes_are_reproducible() -> None:
    image, _ = FUNDUS
    fd = FundusDegradation(severity=(0.3, 0.9), kinds="random")
    a = fd(image, generator=torch.Generator().manual_seed(1))
    b = fd(image, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, image)
    xd = XrayDegradation(severity=0.5, kinds="random")
    a = xd(XRAY, generator=torch.Generator().manual_seed(1))
    b = xd(XRAY, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, XRAY)
    assert fd(torch.stack([image, image]), generator=torch.Generator().manual_seed(0)).shape == (2, *image.shape)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"severity": -0.1}, ValueError, "severity"),
        ({"severity": 1.5}, ValueError, "severity"),
        ({"severity": float("nan")}, ValueError, "severity"),
        ({"severity": "high"}, TypeError, "severity"),
        ({"severity": [0.1, 0.2, 0.3]}, ValueError, "severity"),
        ({"kinds": ("illumination", "fog")}, ValueError, "kinds"),
        ({"kinds": ()}, ValueError, "kinds"),
        ({"image": torch.rand(64, 64)}, ValueError, "image"),
        ({"image": torch.rand(2, 64, 64)}, ValueError, "channel"),
        ({"image": torch.rand(3, 8, 8) * 2}, ValueError, r"\[0, 1\]"),
        ({"image": torch.zeros(3, 8, 8, dtype=torch.uint8)}, TypeError, "floating"),
        ({"image": [[0.0]]}, TypeError, "image"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "either"),
        ({"fov": torch.ones(8, 8, dtype=torch.bool)}, ValueError, "fov"),
        ({"fov": torch.ones(64, 64)}, TypeError, "fov"),
    ],
    ids=[
        "neg-severity",
        "big-severity",
        "nan-severity",
        "str-severity",
        "severity-count",
        "unknown-kind",
        "no-kind",
        "2d-image",
        "2-channels",
        "out-of-range",
        "int-image",
        "list-image",
        "seed-and-generator",
        "fov-shape",
        "fov-dtype",
    ],
)
def test_fundus_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"image": FUNDUS[0], "severity": 0.5, "kinds": FUNDUS_KINDS} | kwargs
    with pytest.raises(error, match=match):
        degrade_fundus(**args)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"image": torch.rand(3, 16, 16)}, ValueError),
        ({"kinds": ("noise", "rain")}, ValueError),
        ({"severity": 2.0}, ValueError),
    ],
    ids=["3-channels", "unknown-kind", "big-severity"],
)
def test_xray_validation(kwargs: dict, error: type[Exception]) -> None:
    args = {"image": XRAY, "severity": 0.5} | kwargs
    with pytest.raises(error):
        degrade_xray(**args)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FundusDegradation(severity=(0.8, 0.2)),
        lambda: FundusDegradation(severity=(0.1, 0.2, 0.3)),  # type: ignore[arg-type]
        lambda: FundusDegradation(kinds=("spots",)),  # type: ignore[arg-type]
        lambda: XrayDegradation(severity=-1.0),
        lambda: XrayDegradation(kinds=()),
    ],
    ids=["reversed-range", "triple", "bad-kind", "neg-severity", "no-kind"],
)
def test_degradation_class_validation(make) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="Expected"):
        make()


@pytest.mark.parametrize(
    ("fn", "shape"),
    [(degrade_fundus, (0, 3, 32, 32)), (degrade_xray, (0, 1, 32, 32))],
    ids=["fundus", "xray"],
)
def test_empty_batch_is_refused_naming_image(fn, shape: tuple[int, ...]) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"`image` to hold at least one image.*\(0, "):
        fn(torch.zeros(shape), 0.5, seed=0)


@pytest.mark.parametrize(
    ("threshold", "error", "match"),
    [
        (float("nan"), ValueError, "`threshold` to be a finite number in \\[0, 1\\), but got nan"),
        (1.5, ValueError, "`threshold` to be a finite number in \\[0, 1\\), but got 1.5"),
        (None, TypeError, "`threshold` to be a number.*NoneType"),
    ],
    ids=["nan", "above-one", "none"],
)
def test_estimate_fov_refuses_bad_threshold(threshold: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        estimate_fov(torch.rand(3, 16, 16), threshold=threshold)  # type: ignore[arg-type]
