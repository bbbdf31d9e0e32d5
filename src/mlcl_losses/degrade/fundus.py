"""Low-quality fundus photographs, after Shen et al. (IEEE TMI 2020).

Shen, Fu, Shen and Shao, "Modeling and Enhancing Low-quality Retinal Fundus Images",
IEEE Transactions on Medical Imaging 40(3), 2021 (online 2020),
`arXiv:2005.05594 <https://arxiv.org/abs/2005.05594>`_, model three families of
degradation, applied in this order:

* **illumination** (light-transmission disturbance): a global colour shift (brightness,
  contrast, saturation), a *halo* (a bright, tinted ring of leaked light towards the rim
  of the field of view) and a *dark hole* (a soft dark disc of under-exposure);
* **spot** (retinal artefacts): bright, blurred spots of dust or reflections;
* **blur** (defocus, media opacity): a Gaussian blur plus slight sensor noise.

Their subsets give the seven combinations of the paper (:data:`~mlcl_losses.degrade.FUNDUS_COMBINATIONS`).
Every random parameter is drawn whatever the severity and then scaled by it, so for a
fixed seed the degradation grows continuously with ``severity`` and is the identity at 0.
Pixels outside the circular field of view (FOV) are never changed.

The parameter ranges follow the published degradation code's examples at 512 px and are
scaled with the FOV radius; they are this library's choice, not the paper's tables.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl_losses._blur import masked_blur
from mlcl_losses._image_checks import as_batch
from mlcl_losses._seeding import resolve_generator, uniform
from mlcl_losses.degrade._arguments import check_chosen_kinds, check_degrade_call, check_severity_spec, draw_severity

__all__ = [
    "FUNDUS_COMBINATIONS",
    "FUNDUS_KINDS",
    "FundusDegradation",
    "FundusKind",
    "degrade_fundus",
    "estimate_fov",
]

logger = logging.getLogger(__name__)

FundusKind = Literal["illumination", "spot", "blur"]
#: Shen et al.'s three fundus degradation kinds, in the order they are applied.
FUNDUS_KINDS: tuple[FundusKind, ...] = ("illumination", "spot", "blur")
#: The seven non-empty subsets of :data:`~mlcl_losses.degrade.FUNDUS_KINDS` (Shen et al.'s degradation types).
FUNDUS_COMBINATIONS: tuple[tuple[FundusKind, ...], ...] = tuple(
    combo for r in (1, 2, 3) for combo in itertools.combinations(FUNDUS_KINDS, r)
)

# Tints of leaked light (halo), as RGB in [0, 1]: whitish, cyan, yellow-green (Shen et al.'s three styles).
_HALO_TINTS = torch.tensor([[251, 249, 246], [141, 238, 238], [177, 195, 147]], dtype=torch.float32) / 255.0
_MAX_SPOTS = 20
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 grey of RGB


def estimate_fov(image: Tensor, threshold: float = 0.04) -> Tensor:
    """Estimate the circular field of view of fundus photographs.

    A pixel is inside when its brightest channel exceeds ``threshold``; small holes (dark
    lesions, vessels) are closed with a max-pool closing.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float in [0, 1].
        threshold: brightness below which a pixel counts as background.

    Returns:
        Bool mask ``(1, H, W)`` or ``(B, 1, H, W)`` (matching ``image``).

    Raises:
        ValueError: ``threshold`` not a finite number in [0, 1); a bad ``image`` (see :func:`degrade_fundus`).
        TypeError: ``threshold`` not a number.

    Examples:
        >>> img = torch.zeros(3, 32, 32)
        >>> img[:, 8:24, 8:24] = 0.5
        >>> fov = estimate_fov(img)
        >>> fov.shape, bool(fov[0, 16, 16]), bool(fov[0, 0, 0])
        (torch.Size([1, 32, 32]), True, False)
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"Expected `threshold` to be a number in [0, 1), but got {type(threshold).__name__}")
    if not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise ValueError(f"Expected `threshold` to be a finite number in [0, 1), but got {threshold}")
    batch, batched = as_batch(image)
    mask = (batch.amax(dim=1, keepdim=True) > threshold).to(batch.dtype)
    k = 2 * max(1, min(batch.shape[-2:]) // 64) + 1
    closed = F.max_pool2d(mask, k, stride=1, padding=k // 2)
    closed = -F.max_pool2d(-closed, k, stride=1, padding=k // 2)
    fov = (closed > 0.5) | (mask > 0.5)
    return fov if batched else fov[0]


def _check_fov(fov: Any, batch: Tensor) -> Tensor:
    """Validate a given FOV mask and return it as ``(B, 1, H, W)`` bool."""
    b, _, h, w = batch.shape
    if not isinstance(fov, Tensor):
        raise TypeError(f"Expected `fov` to be a bool tensor or None, but got {type(fov).__name__}")
    if fov.dtype != torch.bool:
        raise TypeError(f"Expected `fov` to have dtype torch.bool, but got {fov.dtype}")
    if fov.shape[-2:] != (h, w) or fov.dim() not in (2, 3, 4):
        raise ValueError(
            f"Expected `fov` of shape (H, W), (1, H, W) or (B, 1, H, W) with H, W = {h}, {w}, "
            f"but got shape {tuple(fov.shape)}"
        )
    fov = fov.reshape(-1, 1, h, w)
    if fov.shape[0] not in (1, b):
        raise ValueError(f"Expected `fov` for 1 or {b} images, but got shape {tuple(fov.shape)}")
    return fov.expand(b, 1, h, w).to(batch.device)


def _fov_geometry(fov: Tensor) -> tuple[float, float, float]:
    """Centre ``(cx, cy)`` and radius of a ``(H, W)`` bool FOV mask (from its moments)."""
    h, w = fov.shape
    area = int(fov.sum())
    if area == 0:
        return (w - 1) / 2, (h - 1) / 2, min(h, w) / 2
    # index sums from the row and column counts (exact integers); while they are below 2**24
    # the float32 mean of the pixel indices is exactly this sum, divided in float32
    sums = [int(fov.sum(dim) @ torch.arange(n, device=fov.device)) for dim, n in ((0, w), (1, h))]
    if max(sums) < 1 << 24:
        cx, cy = torch.tensor(sums, dtype=torch.float32).div_(area).tolist()
        return cx, cy, math.sqrt(area / math.pi)
    ys, xs = torch.nonzero(fov, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean()), math.sqrt(area / math.pi)


def _grids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    ys = torch.arange(h, device=device, dtype=dtype).view(h, 1)
    xs = torch.arange(w, device=device, dtype=dtype).view(1, w)
    return xs, ys


def _illumination(img: Tensor, fov: Tensor, s: float, g: torch.Generator, geo: tuple[float, float, float]) -> Tensor:
    """Colour shift, halo and dark hole on one image ``(C, H, W)``."""
    c, h, w = img.shape
    cx, cy, radius = geo
    r = uniform(g, 16, 0.0, 1.0).tolist()
    tint = _HALO_TINTS[int(r[0] * 3) % 3].to(img)
    flat = img.reshape(c, h * w)
    luma = _LUMA.to(img) if c == 3 else torch.full((c,), 1.0 / c, dtype=img.dtype, device=img.device)
    # per-channel sums inside the FOV (one matrix-vector product) give both FOV means
    sums = flat @ fov.reshape(h * w).to(img.dtype)
    n_in = fov.sum().clamp_min(1)
    # colour: brightness (x b), contrast (towards the mean grey), saturation (towards the pixel's grey)
    brightness = 1.0 + s * (-0.45 + 0.75 * r[1])  # [0.55, 1.3] at s = 1
    contrast = 1.0 - s * (0.15 + 0.45 * r[2])  # [0.4, 0.85]
    saturation = 1.0 + s * (-0.5 + 0.9 * r[3])  # [0.5, 1.4]
    mean_grey = brightness * (luma @ sums) / n_in  # mean grey of the brightened image inside the FOV
    out = (img * (brightness * contrast)).add_(mean_grey * (1.0 - contrast)).clamp_(0, 1)
    if c == 3:
        grey = (luma @ out.reshape(3, h * w)).view(1, h, w)
        out = out.mul_(saturation).add_(grey, alpha=1.0 - saturation).clamp_(0, 1)
    xs, ys = _grids(h, w, img.device, img.dtype)
    # halo: light leaking in from the rim, a soft ring outside a circle off the FOV centre
    hx, hy = cx + radius * 0.3 * (2 * r[4] - 1), cy + radius * 0.3 * (2 * r[5] - 1)
    inner = radius * (0.5 + 0.35 * r[6])
    soft = radius * (0.12 + 0.18 * r[7])
    ring = torch.hypot(xs - hx, ys - hy).sub_(inner).div_(soft).sigmoid_()  # (H, W)
    mean_level = sums.sum() / (c * n_in)
    amp = s * (0.6 + 0.6 * r[8]) * mean_level
    halo = amp * (tint if c == 3 else tint.mean().view(1))
    out.addcmul_(halo.view(c, 1, 1), ring)
    # dark hole: a soft dark disc near the centre (under-exposed region)
    ox, oy = cx + radius * 0.35 * (2 * r[9] - 1), cy + radius * 0.35 * (2 * r[10] - 1)
    hole_r = radius * (0.3 + 0.25 * r[11])
    hole_soft = hole_r * (0.3 + 0.3 * r[12])
    disc = torch.hypot(xs - ox, ys - oy).sub_(hole_r).div_(-hole_soft).sigmoid_()
    depth = s * (0.12 + 0.2 * r[13])
    return out.sub_(disc, alpha=depth).clamp_(0, 1)


def _spots(img: Tensor, s: float, g: torch.Generator, geo: tuple[float, float, float]) -> Tensor:
    """Bright blurred spots (dust, reflections) inside the FOV of one image ``(C, H, W)``."""
    _, h, w = img.shape
    cx, cy, radius = geo
    count = uniform(g, 1, 0.0, 1.0)
    rad, ang, size, amp = (uniform(g, _MAX_SPOTS, 0.0, 1.0) for _ in range(4))
    n = round(s * (4 + (_MAX_SPOTS - 4) * float(count)))
    if n == 0:
        return img
    dist = radius * 0.9 * torch.sqrt(rad[:n])
    px = (cx + dist * torch.cos(2 * math.pi * ang[:n])).to(img)
    py = (cy + dist * torch.sin(2 * math.pi * ang[:n])).to(img)
    sigma = (radius * (0.012 + 0.04 * size[:n])).to(img)
    height = ((0.08 + 0.22 * amp[:n]) * (0.5 + 0.5 * s)).to(img)
    xs = torch.arange(w, device=img.device, dtype=img.dtype)
    ys = torch.arange(h, device=img.device, dtype=img.dtype)
    gx = torch.exp(-0.5 * ((xs[None, :] - px[:, None]) / sigma[:, None]) ** 2)  # (n, W)
    gy = torch.exp(-0.5 * ((ys[None, :] - py[:, None]) / sigma[:, None]) ** 2)  # (n, H)
    field = (gy * height[:, None]).T @ gx  # (H, W): sum of separable Gaussian spots
    return (img + field.unsqueeze(0)).clamp_(0, 1)


def _blur(img: Tensor, fov: Tensor, s: float, g: torch.Generator, geo: tuple[float, float, float]) -> Tensor:
    """Gaussian defocus blur inside the FOV plus slight sensor noise, one image ``(C, H, W)``."""
    r = uniform(g, 1, 0.0, 1.0)
    noise = torch.randn(img.shape, generator=g, device=g.device).to(img)
    sigma = s * (0.6 + 0.4 * float(r)) * 0.028 * geo[2]  # up to ~3.5 px for a 256 px image
    out = masked_blur(img.unsqueeze(0), fov.unsqueeze(0), sigma)[0]
    return torch.add(out, noise, alpha=s * 0.012).clamp_(0, 1)


def degrade_fundus_unchecked(
    img: Tensor,
    fov: Tensor,
    severity: float,
    kinds: Sequence[str],
    g: torch.Generator,
    geometry: tuple[float, float, float] | None = None,
) -> Tensor:
    """:func:`degrade_fundus` of one checked image ``(C, H, W)`` at ``severity > 0``, without the checks.

    For callers whose image and field of view need no checks (the synthetic fundus renderer);
    not exported (not in ``__all__``).

    Args:
        img: ``(C, H, W)`` float in [0, 1].
        fov: ``(1, H, W)`` bool field of view.
        severity: in (0, 1].
        kinds: the degradations, a subset of :data:`FUNDUS_KINDS`.
        g: source of randomness.
        geometry: ``(cx, cy, radius)`` of ``fov`` when known (else from its moments).
    """
    geo = _fov_geometry(fov[0]) if geometry is None else geometry
    work = img.float()
    if "illumination" in kinds:
        work = _illumination(work, fov, severity, g, geo)
    if "spot" in kinds:
        work = _spots(work, severity, g, geo)
    if "blur" in kinds:
        work = _blur(work, fov, severity, g, geo)
    return torch.where(fov, work.to(img.dtype), img)


def degrade_fundus(
    image: Tensor,
    severity: float | Sequence[float] | Tensor,
    kinds: Sequence[FundusKind] | FundusKind = FUNDUS_KINDS,
    *,
    fov: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """Simulate a low-quality fundus photograph (Shen et al. 2020).

    Images of a batch are degraded one after another with the same generator, so a batch
    gives the same result as its images degraded in order with one generator.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float in [0, 1], ``C`` 3 (RGB) or 1.
        severity: in [0, 1], one for all images or one per image (``(B,)``); 0 is the identity.
        kinds: a non-empty subset of ``("illumination", "spot", "blur")``, applied in that order.
        fov: ``(H, W)``, ``(1, H, W)`` or ``(B, 1, H, W)`` bool field of view; estimated with
            :func:`estimate_fov` when ``None``. Pixels outside it are returned unchanged.
        generator: source of randomness (CPU generator recommended).
        seed: alternative to ``generator``: seed of a fresh generator.

    Returns:
        Tensor of ``image``'s shape, dtype and device, values in [0, 1].

    Raises:
        ValueError: on a bad shape, an empty batch, values outside [0, 1], severity outside [0, 1],
            unknown kinds.
        TypeError: on a non-tensor or integer image.

    Examples:
        >>> img = torch.rand(3, 64, 64)
        >>> out = degrade_fundus(img, 0.5, kinds=("illumination", "blur"), seed=0)
        >>> out.shape, bool(out.min() >= 0), bool(out.max() <= 1)
        (torch.Size([3, 64, 64]), True, True)
        >>> torch.equal(degrade_fundus(img, 0.0, seed=0), img)
        True
    """
    batch, batched, chosen, severities, g = check_degrade_call(
        image, severity, kinds, FUNDUS_KINDS, (1, 3), generator, seed
    )
    masks = estimate_fov(batch) if fov is None else _check_fov(fov, batch)
    outputs = [
        degrade_fundus_unchecked(img, mask, s, chosen, g) if s > 0 else img.clone()
        for img, mask, s in zip(batch, masks, severities, strict=True)
    ]
    out = torch.stack(outputs)
    logger.debug("degraded %d fundus image(s) with %s at severity %s", out.shape[0], chosen, severities)
    return out if batched else out[0]


@dataclass(frozen=True)
class FundusDegradation:
    """A fundus degradation to apply, e.g. as the ``degradation`` of a four-view sampler.

    Args:
        severity: a float in [0, 1], or a range ``(low, high)`` drawn uniformly per image.
        kinds: subset of ``("illumination", "spot", "blur")``, or ``"random"`` to draw one of
            the seven combinations (:data:`~mlcl_losses.degrade.FUNDUS_COMBINATIONS`) per image.
        fov: optional ``(H, W)`` bool field of view shared by all images.

    Examples:
        >>> degrade = FundusDegradation(severity=(0.3, 0.8), kinds="random")
        >>> g = torch.Generator().manual_seed(0)
        >>> degrade(torch.rand(2, 3, 32, 32), generator=g).shape
        torch.Size([2, 3, 32, 32])
    """

    severity: float | tuple[float, float] = 0.5
    kinds: Sequence[FundusKind] | Literal["random"] = FUNDUS_KINDS
    fov: Tensor | None = None

    def __post_init__(self) -> None:
        check_severity_spec(self.severity)
        if self.kinds != "random":
            object.__setattr__(self, "kinds", check_chosen_kinds(self.kinds, FUNDUS_KINDS))

    def __call__(self, image: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Degrade ``image`` (``(C, H, W)`` or ``(B, C, H, W)`` in [0, 1]); same shape out."""
        batch, batched = as_batch(image, channels=(1, 3))
        g = resolve_generator(generator, None)
        outs = []
        for img in batch:
            s = draw_severity(self.severity, g)
            kinds = self.kinds
            if kinds == "random":
                pick = int(torch.randint(len(FUNDUS_COMBINATIONS), (1,), generator=g, device=g.device))
                kinds = FUNDUS_COMBINATIONS[pick]
            outs.append(degrade_fundus(img, s, kinds, fov=self.fov, generator=g))
        out = torch.stack(outs)
        return out if batched else out[0]
