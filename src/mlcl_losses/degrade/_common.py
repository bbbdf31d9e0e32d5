"""Shared helpers of the degradation models: validation, seeding, blurring."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK64 = (1 << 64) - 1


@runtime_checkable
class Degradation(Protocol):
    """A degradation to apply: ``image (C, H, W) or (B, C, H, W) -> same shape``.

    :class:`~mlcl_losses.degrade.FundusDegradation` and
    :class:`~mlcl_losses.degrade.XrayDegradation` satisfy it; so does any callable
    with this signature (the ``generator`` keyword makes it reproducible).
    """

    def __call__(self, image: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Degrade ``image``, drawing randomness from ``generator``."""
        ...


def mix_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (SplitMix64 finaliser, stable across processes).

    Args:
        *values: integers (any sign); their order matters.

    Returns:
        A non-negative ``int`` below ``2**63``, usable with ``torch.Generator.manual_seed``.

    Examples:
        >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
        True
    """
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def resolve_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    """Return the generator to draw from: ``generator``, or a new one seeded with ``seed``.

    With neither, a fresh non-deterministically seeded CPU generator.
    """
    if generator is not None and seed is not None:
        raise ValueError("Pass either `generator` or `seed`, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}")
        return generator
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an int or None, but got {seed!r}")
        g.manual_seed(seed % (1 << 63))
    return g


def as_batch(image: Any, name: str = "image", channels: Sequence[int] | None = None) -> tuple[Tensor, bool]:
    """Validate an image tensor and view it as a batch.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` floating tensor with values in [0, 1].
        name: argument name for error messages.
        channels: allowed channel counts, or ``None`` for any.

    Returns:
        ``(batch, was_batched)``: ``batch`` is ``(B, C, H, W)`` (a view, not a copy).
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(image).__name__}")
    if not image.dtype.is_floating_point:
        raise TypeError(f"Expected `{name}` to have a floating dtype with values in [0, 1], but got {image.dtype}")
    if image.dim() not in (3, 4):
        raise ValueError(f"Expected `{name}` of shape (C, H, W) or (B, C, H, W), but got shape {tuple(image.shape)}")
    batched = image.dim() == 4
    batch = image if batched else image.unsqueeze(0)
    if channels is not None and batch.shape[1] not in channels:
        raise ValueError(
            f"Expected `{name}` to have {' or '.join(map(str, channels))} channel(s) (dimension -3), "
            f"but got shape {tuple(image.shape)}"
        )
    if batch.shape[-1] < 1 or batch.shape[-2] < 1:
        raise ValueError(f"Expected `{name}` to have non-empty height and width, but got shape {tuple(image.shape)}")
    if batch.numel():
        low, high = float(batch.min()), float(batch.max())
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(f"Expected `{name}` values in [0, 1], but got values in [{low:.4g}, {high:.4g}]")
    return batch, batched


def check_severity(severity: Any, batch: int) -> list[float]:
    """Validate ``severity`` (a number or one per image) and return one float per image."""
    if isinstance(severity, Tensor):
        values = severity.detach().flatten().tolist() if severity.dim() else [float(severity)]
    elif isinstance(severity, (int, float)) and not isinstance(severity, bool):
        values = [float(severity)]
    elif isinstance(severity, Sequence) and not isinstance(severity, str):
        values = list(severity)
    else:
        raise TypeError(f"Expected `severity` to be a float in [0, 1] or one per image, but got {severity!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected `severity` values to be floats in [0, 1], but got {value!r}")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"Expected `severity` in [0, 1], but got {value}")
    if len(values) == 1:
        return [float(values[0])] * batch
    if len(values) != batch:
        raise ValueError(f"Expected one `severity` or one per image ({batch}), but got {len(values)}")
    return [float(v) for v in values]


def check_kinds(kinds: Any, allowed: Sequence[str], name: str = "kinds") -> tuple[str, ...]:
    """Validate a collection of option strings against ``allowed``; keep ``allowed``'s order."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, Sequence) and not isinstance(kinds, (set, frozenset)):
        raise TypeError(f"Expected `{name}` to be a sequence of names from {tuple(allowed)}, but got {kinds!r}")
    chosen = set()
    for kind in kinds:
        if kind not in allowed:
            raise ValueError(f"Expected `{name}` entries in {tuple(allowed)}, but got {kind!r}")
        chosen.add(kind)
    return tuple(k for k in allowed if k in chosen)


def uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """``(n,)`` float32 uniform draws in ``[low, high)`` on the generator's device."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


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
    taps = _taps(float(sigma))
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
def _taps(sigma: float) -> tuple[float, ...]:
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


def smooth_noise(generator: torch.Generator, shape: tuple[int, int], grid: int, channels: int = 1) -> Tensor:
    """Smooth random field: ``(channels, H, W)`` float32, N(0, 1) per pixel, from a coarse grid.

    The coarse Gaussian grid is interpolated with Gaussian weights as two small matrix
    products (fast, smooth, no grid artefacts).

    Args:
        generator: source of randomness.
        shape: ``(H, W)`` of the output.
        grid: cells of the coarse grid along the longer side (larger = finer texture).
        channels: number of independent fields.
    """
    h, w = shape
    gh = max(2, round(grid * h / max(h, w)))
    gw = max(2, round(grid * w / max(h, w)))
    coarse = torch.randn(channels, gh + 2, gw + 2, generator=generator, device=generator.device)
    ay = _interp_weights(h, gh, coarse.device)  # (H, gh + 2)
    ax = _interp_weights(w, gw, coarse.device)  # (W, gw + 2)
    return ay @ coarse @ ax.T  # (channels, H, W)


@functools.lru_cache(maxsize=64)
def _interp_weights(n: int, cells: int, device: torch.device) -> Tensor:
    """``(n, cells + 2)`` Gaussian interpolation weights from a coarse grid (one cell of margin); cached."""
    pos = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * cells + 0.5  # in coarse units
    centres = torch.arange(cells + 2, device=device, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((pos[:, None] - centres[None, :]) / 0.6) ** 2)
    weights = weights / weights.sum(1, keepdim=True)
    return weights / torch.sqrt((weights**2).sum(1, keepdim=True))  # unit variance per pixel


def check_severity_spec(severity: Any) -> tuple[float, float]:
    """Validate a severity given as a float or a ``(low, high)`` range; return the range."""
    if isinstance(severity, tuple):
        if len(severity) != 2:
            raise ValueError(f"Expected `severity` to be a float or a (low, high) pair, but got {severity!r}")
        low, high = check_severity(list(severity), 2)
        if low > high:
            raise ValueError(f"Expected `severity` range with low <= high, but got {severity!r}")
        return low, high
    (value,) = check_severity(severity, 1)
    return value, value


def draw_severity(spec: float | tuple[float, float], g: torch.Generator) -> float:
    """Draw a severity uniformly from a float or ``(low, high)`` spec."""
    low, high = check_severity_spec(spec)
    u = float(torch.rand(1, generator=g, device=g.device))
    return low + (high - low) * u
