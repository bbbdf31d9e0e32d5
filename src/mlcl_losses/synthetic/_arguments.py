"""Argument checks of the synthetic datasets: size and seed, category weights, severity ranges per quality label."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_dataset_shape", "check_probs", "check_severity_ranges"]


def check_dataset_shape(n: int, size: int, seed: int) -> None:
    """Validate a dataset's sample count ``n >= 0``, image side ``size >= 32`` and base ``seed`` (ints)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"Expected `n` to be an int >= 0, but got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"Expected `size` to be an int >= 32, but got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected `seed` to be an int, but got {seed!r}")


def check_probs(name: str, probs: Sequence[float], n: int) -> Tensor:
    """Validate ``n`` non-negative weights with a positive sum; return them normalised, float32 ``(n,)``."""
    t = torch.as_tensor(probs, dtype=torch.float64)
    if t.shape != (n,) or bool((t < 0).any()) or float(t.sum()) <= 0:
        raise ValueError(f"Expected `{name}` to be {n} non-negative weights with a positive sum, but got {probs!r}")
    return (t / t.sum()).float()


def check_severity_ranges(ranges: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Validate three ``(low, high)`` severity ranges in [0, 1], rising with the quality label."""
    out = []
    if len(ranges) != 3:
        raise ValueError(f"Expected `severity_ranges` for 3 quality levels, but got {ranges!r}")
    for low, high in ranges:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"Expected `severity_ranges` entries (low, high) with 0 <= low <= high <= 1, got {ranges!r}"
            )
        out.append((float(low), float(high)))
    if not (out[0][1] <= out[1][0] and out[1][1] <= out[2][0]):
        raise ValueError(f"Expected `severity_ranges` to rise with the quality label, but got {ranges!r}")
    return tuple(out)
