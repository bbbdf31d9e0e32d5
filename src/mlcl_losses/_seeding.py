"""Seeded random generators, shared by the views, the degradations and the synthetic datasets.

:func:`mix_seed` turns several integers (a base seed, an epoch, an index) into one seed that is
the same in every process; :func:`resolve_generator` picks the generator a function draws from
(its ``generator`` or ``seed`` argument); :func:`uniform` draws on that generator's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mix_seed", "resolve_generator", "uniform"]

_MASK64 = (1 << 64) - 1


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


def uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """``(n,)`` float32 uniform draws in ``[low, high)`` on the generator's device."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)
