"""Separable Gaussian blur and its taps, shared by the degradations and the synthetic renderers.

:func:`blur_taps` caches the taps of a ``sigma`` as Python floats; :func:`gaussian_blur` applies
them as shifted copies; :func:`masked_blur` blurs inside a mask only (normalised convolution).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["blur_taps", "gaussian_blur", "gaussian_kernel1d", "masked_blur"]


def gaussian_kernel1d(sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(2r + 1,)`` normalised Gaussian taps, ``r = ceil(3 sigma)``."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (replicate where the image is too small).

    Computed as a sum of shifted copies (one fused multiply-add per tap), which on CPU is
    several times faster than ``conv2d`` for single-channel images.

    Args:
        x: ``(B, C, H, W)`` float.
        sigma: standard deviation in pixels; ``<= 0`` returns ``x`` unchanged.

    Returns:
        ``(B, C, H, W)`` float, blurred.
    """
    if sigma <= 0:
        return x
    taps = blur_taps(float(sigma))
    radius = len(taps) // 2
    h, w = x.shape[-2:]
    mode = "reflect" if radius < min(h, w) else "replicate"
    # one padding for both passes: the rows padded before the horizontal pass are, after it, the
    # padded rows of its output (padding rows commutes with a row-wise filter), bit for bit
    padded = F.pad(x, (radius, radius, radius, radius), mode=mode)
    y = padded[..., radius : radius + w] * taps[radius]
    for i, tap in enumerate(taps):
        if i != radius:
            y = y.add_(padded[..., i : i + w], alpha=tap)
    out = y[..., radius : radius + h, :] * taps[radius]
    for i, tap in enumerate(taps):
        if i != radius:
            out = out.add_(y[..., i : i + h, :], alpha=tap)
    return out


@functools.lru_cache(maxsize=256)
def blur_taps(sigma: float) -> tuple[float, ...]:
    """:func:`gaussian_kernel1d` taps as Python floats (float64), cached per ``sigma``."""
    return tuple(gaussian_kernel1d(sigma, torch.device("cpu"), torch.float64).tolist())


def masked_blur(x: Tensor, mask: Tensor, sigma: float) -> Tensor:
    """Gaussian blur that only mixes pixels inside ``mask`` (normalised convolution).

    Args:
        x: ``(B, C, H, W)`` float.
        mask: ``(B, 1, H, W)`` bool or float in [0, 1].
        sigma: standard deviation in pixels.

    Returns:
        ``(B, C, H, W)`` float; values outside the mask are those of ``x``.
    """
    if sigma <= 0:
        return x
    m = mask.to(x.dtype)
    num = gaussian_blur(x * m, sigma)
    den = gaussian_blur(m, sigma)
    return torch.where(mask > 0, num.div_(den.clamp_min_(1e-6)), x)
