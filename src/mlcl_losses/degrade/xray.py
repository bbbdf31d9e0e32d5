"""Low-quality radiographs: noise, blur, exposure, contrast, grid lines, stripes, compression.

Single-channel images ``(1, H, W)`` or ``(B, 1, H, W)`` with values in [0, 1] (bright =
dense, as displayed). Kinds, applied in this order when several are chosen:

=================  ==========================================================================
kind               model
=================  ==========================================================================
``underexposure``  too few photons: a darkening gamma curve and gain, ``y = g x^γ``, γ > 1
``overexposure``   burn-out: ``y = clip(k (1 - (1 - x)^γ))``, bright regions saturate
``contrast``       compressed dynamic range: ``y = m + c (x - m)``, c < 1, ``m`` the mean
``grid``           anti-scatter grid lines: a fine periodic multiplicative pattern
``blur``           detector / motion unsharpness: Gaussian blur
``stripes``        detector read-out artefacts: bright or dark rows/columns and banding
``noise``          quantum noise, Poisson–Gaussian: ``y = x + sqrt(a x + b) z``, z ~ N(0, 1)
                   (the heteroscedastic Gaussian approximation of Foi et al., IEEE TIP 2008)
``jpeg``           block compression: 8×8 DCT, quantisation by the JPEG luminance table
                   at a quality falling with severity (IJG scaling), inverse DCT
=================  ==========================================================================

As for fundus images, every random parameter is drawn whatever the severity and scaled
by it, so a fixed seed gives a degradation that grows with ``severity``; 0 is the identity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl_losses._blur import gaussian_blur
from mlcl_losses._image_checks import as_batch
from mlcl_losses._seeding import resolve_generator, uniform
from mlcl_losses.degrade._arguments import check_chosen_kinds, check_degrade_call, check_severity_spec, draw_severity

__all__ = ["XRAY_KINDS", "XrayDegradation", "XrayKind", "degrade_xray", "jpeg_compress"]

logger = logging.getLogger(__name__)

XrayKind = Literal["underexposure", "overexposure", "contrast", "grid", "blur", "stripes", "noise", "jpeg"]
#: Every X-ray degradation kind, in the order they are applied.
XRAY_KINDS: tuple[XrayKind, ...] = (
    "underexposure",
    "overexposure",
    "contrast",
    "grid",
    "blur",
    "stripes",
    "noise",
    "jpeg",
)

# JPEG standard luminance quantisation table (ITU-T T.81, Annex K, Table K.1).
_JPEG_LUMA = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)


def _dct_matrix(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``: ``coeffs = D @ block @ D.T``."""
    k = torch.arange(n, device=device, dtype=dtype).view(n, 1)
    i = torch.arange(n, device=device, dtype=dtype).view(1, n)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def jpeg_compress(image: Tensor, quality: int) -> Tensor:
    """JPEG-like block compression of grey images in torch (no entropy coding, no chroma).

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float in [0, 1]; every channel is coded as luminance.
        quality: JPEG quality in [1, 100]; the quantisation table is the standard luminance
            table scaled as in the IJG library.

    Returns:
        Tensor of ``image``'s shape and dtype, values in [0, 1], with 8×8 block artefacts.

    Examples:
        >>> x = torch.rand(1, 20, 20)
        >>> y = jpeg_compress(x, 10)
        >>> y.shape, bool(((y - x).abs().mean() > 0.01))
        (torch.Size([1, 20, 20]), True)
    """
    batch, batched = as_batch(image)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"Expected `quality` to be an int in [1, 100], but got {quality!r}")
    b, c, h, w = batch.shape
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    table = ((_JPEG_LUMA * scale + 50.0) / 100.0).floor().clamp(1.0, 255.0).to(batch.device)
    ph, pw = (-h) % 8, (-w) % 8
    x = batch.float().reshape(b * c, 1, h, w) * 255.0 - 128.0
    x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hh, ww = x.shape[-2:]
    blocks = x.reshape(b * c, hh // 8, 8, ww // 8, 8).permute(0, 1, 3, 2, 4)  # (N, by, bx, 8, 8)
    d = _dct_matrix(8, x.device, x.dtype)
    coeffs = d @ blocks @ d.T
    coeffs = torch.round(coeffs / table) * table
    blocks = d.T @ coeffs @ d
    x = blocks.permute(0, 1, 3, 2, 4).reshape(b * c, 1, hh, ww)[..., :h, :w]
    out = ((x + 128.0) / 255.0).clamp(0, 1).reshape(b, c, h, w).to(batch.dtype)
    return out if batched else out[0]


def _one(img: Tensor, s: float, kinds: tuple[str, ...], g: torch.Generator) -> Tensor:
    """Degrade one image ``(1, H, W)``; draws the same amount of randomness for every severity."""
    _, h, w = img.shape
    r = uniform(g, 16, 0.0, 1.0).tolist()
    noise = torch.randn(img.shape, generator=g, device=g.device).to(img)
    stripe_pos = uniform(g, 12, 0.0, 1.0)
    stripe_amp = uniform(g, 12, -1.0, 1.0)
    band = torch.randn(max(h, w), generator=g, device=g.device)
    x = img
    size = min(h, w)
    if "underexposure" in kinds:
        gamma = 1.0 + s * (0.6 + 0.9 * r[0])
        x = (1.0 - s * (0.15 + 0.25 * r[1])) * x.clamp_min(0) ** gamma
    if "overexposure" in kinds:
        gamma = 1.0 + s * (0.6 + 0.9 * r[0])
        x = ((1.0 + s * (0.1 + 0.3 * r[1])) * (1.0 - (1.0 - x).clamp_min(0) ** gamma)).clamp(0, 1)
    if "contrast" in kinds:
        mean = x.mean()
        x = mean + (1.0 - s * (0.35 + 0.35 * r[2])) * (x - mean)
    if "grid" in kinds:
        period = 2.5 + 3.5 * r[3]
        amp = s * (0.05 + 0.1 * r[4])
        vertical = r[5] < 0.5
        coord = torch.arange(w if vertical else h, device=img.device, dtype=img.dtype)
        pattern = 0.5 + 0.5 * torch.cos(2 * math.pi * coord / period + 2 * math.pi * r[6])
        pattern = pattern.view(1, 1, w) if vertical else pattern.view(1, h, 1)
        x = x * (1.0 - amp * pattern)
    if "blur" in kinds:
        sigma = s * (0.6 + 0.4 * r[7]) * 0.014 * size  # up to ~3.6 px for 256 px
        x = gaussian_blur(x.unsqueeze(0), sigma)[0]
    if "stripes" in kinds:
        vertical = r[8] < 0.5
        length = w if vertical else h
        n = round(s * (3 + 9 * r[9]))
        offsets = torch.zeros(length, device=img.device, dtype=img.dtype)
        pos = (stripe_pos[:n] * length).long().clamp(0, length - 1).to(img.device)
        width = 1 + int(2 * r[10])
        for shift in range(width):
            offsets.index_add_(0, (pos + shift).clamp(max=length - 1), stripe_amp[:n].to(offsets) * s * 0.15)
        offsets = offsets + s * 0.02 * band[:length].to(offsets)  # faint banding
        x = x + (offsets.view(1, 1, length) if vertical else offsets.view(1, length, 1))
    if "noise" in kinds:
        a = s * (0.5 + 0.5 * r[11]) * 0.02  # Poisson part: variance a * x
        b = (s * (0.5 + 0.5 * r[12]) * 0.03) ** 2  # Gaussian read noise
        x = x + torch.sqrt(a * x.clamp_min(0) + b) * noise
    x = x.clamp(0, 1)
    if "jpeg" in kinds and s > 0:
        quality = max(1, min(100, round(100 - 95 * s * (0.8 + 0.2 * r[13]))))
        x = jpeg_compress(x, quality)
    return x


def degrade_xray(
    image: Tensor,
    severity: float | Sequence[float] | Tensor,
    kinds: Sequence[XrayKind] | XrayKind = ("noise", "blur", "contrast"),
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """Simulate a low-quality radiograph.

    Images of a batch are degraded one after another with the same generator, so a batch
    gives the same result as its images degraded in order with one generator.

    Args:
        image: ``(1, H, W)`` or ``(B, 1, H, W)`` float in [0, 1].
        severity: in [0, 1], one for all images or one per image; 0 is the identity.
        kinds: non-empty subset of :data:`~mlcl_losses.degrade.XRAY_KINDS` (see the module docstring),
            applied in that order.
        generator: source of randomness (CPU generator recommended).
        seed: alternative to ``generator``: seed of a fresh generator.

    Returns:
        Tensor of ``image``'s shape, dtype and device, values in [0, 1].

    Raises:
        ValueError: on a bad shape, an empty batch, values outside [0, 1], severity outside [0, 1],
            unknown kinds.
        TypeError: on a non-tensor or integer image.

    Examples:
        >>> x = torch.rand(1, 64, 64)
        >>> y = degrade_xray(x, 0.7, kinds=("noise", "jpeg"), seed=0)
        >>> y.shape, bool(y.min() >= 0), bool(y.max() <= 1)
        (torch.Size([1, 64, 64]), True, True)
    """
    batch, batched, chosen, severities, g = check_degrade_call(
        image, severity, kinds, XRAY_KINDS, (1,), generator, seed
    )
    outs = []
    for img, s in zip(batch, severities, strict=True):
        out = _one(img.float(), s, chosen, g).to(img.dtype)
        outs.append(out if s > 0 else img.clone())
    result = torch.stack(outs)
    logger.debug("degraded %d radiograph(s) with %s at severity %s", result.shape[0], chosen, severities)
    return result if batched else result[0]


def random_xray_kinds(g: torch.Generator) -> tuple[XrayKind, ...]:
    """Draw a non-empty random subset of the X-ray kinds (never both exposure errors).

    The draw of :class:`XrayDegradation` with ``kinds="random"`` and of the synthetic chest
    X-rays; not exported (not in ``__all__``).
    """
    pick = torch.rand(len(XRAY_KINDS), generator=g, device=g.device) < 0.35
    if not bool(pick.any()):
        pick[int(torch.randint(len(XRAY_KINDS), (1,), generator=g, device=g.device))] = True
    if bool(pick[0]) and bool(pick[1]):
        pick[int(torch.randint(2, (1,), generator=g, device=g.device))] = False
    return tuple(k for k, p in zip(XRAY_KINDS, pick.tolist(), strict=True) if p)


@dataclass(frozen=True)
class XrayDegradation:
    """An X-ray degradation to apply, e.g. as the ``degradation`` of a four-view sampler.

    Args:
        severity: a float in [0, 1], or a range ``(low, high)`` drawn uniformly per image.
        kinds: subset of :data:`~mlcl_losses.degrade.XRAY_KINDS`, or ``"random"`` to draw a non-empty subset per
            image (each kind with probability 0.35, never under- and over-exposure together).

    Examples:
        >>> degrade = XrayDegradation(severity=0.6, kinds=("noise", "grid"))
        >>> degrade(torch.rand(1, 32, 32), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([1, 32, 32])
    """

    severity: float | tuple[float, float] = 0.5
    kinds: Sequence[XrayKind] | Literal["random"] = ("noise", "blur", "contrast")

    def __post_init__(self) -> None:
        check_severity_spec(self.severity)
        if self.kinds != "random":
            object.__setattr__(self, "kinds", check_chosen_kinds(self.kinds, XRAY_KINDS))

    def __call__(self, image: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Degrade ``image`` (``(1, H, W)`` or ``(B, 1, H, W)`` in [0, 1]); same shape out."""
        batch, batched = as_batch(image, channels=(1,))
        g = resolve_generator(generator, None)
        outs = []
        for img in batch:
            s = draw_severity(self.severity, g)
            kinds = random_xray_kinds(g) if self.kinds == "random" else self.kinds
            outs.append(degrade_xray(img, s, kinds, generator=g))
        out = torch.stack(outs)
        return out if batched else out[0]
