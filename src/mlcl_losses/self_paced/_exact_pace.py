"""The pace compared exactly in the hardness dtype, and the rank that sets a quantile pace.

``h < lambda`` is decided in the dtype of the hardness: :func:`ceil_to_dtype` rounds a pace up
to that dtype, :func:`pace_above` moves a hardness one step up in it, and :func:`quantile_pace`
(with :func:`quantile_rank`) finds the smallest pace that admits a given fraction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ceil_to_dtype", "pace_above", "quantile_pace", "quantile_rank"]


def ceil_to_dtype(value: float, dtype: torch.dtype) -> float:
    """Smallest number of ``dtype`` that is >= ``value``: ``h < value`` is then exact for ``h`` of ``dtype``."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(rounded) < value:
        rounded = torch.nextafter(rounded, torch.tensor(math.inf, dtype=dtype))
    return float(rounded)


def quantile_rank(n: int, fraction: float) -> int | None:
    """Rank ``k`` (1-based) of the candidate whose hardness sets a quantile pace; ``None``: the pace is ``inf``."""
    if n == 0 or fraction >= 1.0:
        return None
    # the relative slack keeps e.g. 0.3 * 10 = 3.0000000000000004 from admitting 4 of 10
    return min(n, max(1, math.ceil(fraction * n * (1.0 - 1e-12))))


def pace_above(kth: Tensor) -> float:
    """The smallest pace that admits the hardness ``kth`` (0-dim): one step up *in its dtype*.

    A float64 step would round back to ``kth`` in float32, so that ``h < lambda`` made in the
    hardness dtype would not admit it.
    """
    lam = float(torch.nextafter(kth, torch.tensor(math.inf, dtype=kth.dtype, device=kth.device)))
    return max(lam, math.ulp(0.0))


def quantile_pace(hardness: Tensor, fraction: float) -> float:
    """Smallest lambda such that ``ceil(fraction * n)`` candidates are strictly easier.

    The k-th smallest hardness is moved up one step in the hardness dtype (:func:`pace_above`).
    """
    flat = hardness.detach().reshape(-1)
    k = quantile_rank(flat.numel(), fraction)
    if k is None:
        return float("inf")
    kth = torch.kthvalue(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, k).values
    return pace_above(kth.to(flat.dtype))  # exact: the k-th value is one of the inputs
