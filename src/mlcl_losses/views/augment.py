"""Light augmentation of one patch (V1a, V1b), in pure torch: flips, 90° rotations, colour jitter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LightAugment"]

_RANGE_SLACK = 1e-3  # resampling rounds a patch in [0, 1] to slightly outside it; the output is clamped


@dataclass(frozen=True)
class LightAugment:
    """Light augmentation of one patch, in pure torch: flips, 90° rotations, colour jitter.

    Args:
        flip: random horizontal and vertical flips (each with probability 0.5).
        rotate: random rotation by a multiple of 90°.
        brightness: maximum relative brightness change (factor in ``[1 - b, 1 + b]``).
        contrast: maximum relative contrast change around the patch mean.
        saturation: maximum relative saturation change (3-channel patches only).

    Raises:
        ValueError: ``brightness``, ``contrast`` or ``saturation`` not a finite number in ``[0, 1)``.
        TypeError: one of them not a number.

    Examples:
        >>> aug = LightAugment()
        >>> aug(torch.rand(3, 8, 8), torch.Generator().manual_seed(0)).shape
        torch.Size([3, 8, 8])
    """

    flip: bool = True
    rotate: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Expected `{name}` to be a number in [0, 1), but got {type(value).__name__}")
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"Expected `{name}` in [0, 1) (a relative change), but got {value}")

    def __call__(self, patch: Tensor, generator: torch.Generator) -> Tensor:
        """Augment ``patch`` ``(C, P, P)`` float in [0, 1]; returns the same shape, in [0, 1].

        Raises:
            TypeError: ``patch`` not a floating-point tensor (e.g. ``uint8``: scale it to [0, 1] first),
                or ``generator`` not a :class:`torch.Generator`.
            ValueError: ``patch`` not 3-D, with NaN or infinite values, or with values outside [0, 1]
                (beyond a rounding slack of 1e-3).
        """
        if not isinstance(patch, Tensor) or not patch.is_floating_point():
            kind = patch.dtype if isinstance(patch, Tensor) else type(patch).__name__
            raise TypeError(f"Expected `patch` to be a float tensor with values in [0, 1], but got {kind}")
        if patch.ndim != 3:
            raise ValueError(f"Expected `patch` of shape (C, P, P), but got {tuple(patch.shape)}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}")
        if patch.numel():
            low, high = (float(v) for v in torch.aminmax(patch))  # one pass; NaN propagates into both
            inside = low >= -_RANGE_SLACK and high <= 1 + _RANGE_SLACK
            if not inside and not bool(torch.isfinite(patch).all()):
                raise ValueError("Expected `patch` to be finite, but it contains NaN or infinite values")
            if not inside:
                raise ValueError(
                    f"Expected `patch` values in [0, 1], but got values in [{low:.6g}, {high:.6g}] "
                    "(an 8-bit image must be divided by 255 first)"
                )
        r = torch.rand(6, generator=generator, device=generator.device).tolist()
        out = patch
        if self.flip and r[0] < 0.5:
            out = out.flip(-1)
        if self.flip and r[1] < 0.5:
            out = out.flip(-2)
        if self.rotate:
            out = torch.rot90(out, int(r[2] * 4) % 4, dims=(-2, -1))
        out = out * (1.0 + self.brightness * (2 * r[3] - 1))
        mean = out.mean()
        out = mean + (1.0 + self.contrast * (2 * r[4] - 1)) * (out - mean)
        if out.shape[0] == 3 and self.saturation:
            grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]).unsqueeze(0)
            out = grey + (1.0 + self.saturation * (2 * r[5] - 1)) * (out - grey)
        return out.clamp(0, 1)
