"""Argument checks shared by the regularisers, the schedules and the weighting module."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_hardness", "check_positive"]


def check_positive(name: str, value: float, allow_inf: bool = False) -> float:
    """Validate a number > 0 (finite unless ``allow_inf``); return it as a float."""
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"Expected `{name}` > 0{'' if allow_inf else ' and finite'}, but got {value}")
    return value


def check_hardness(hardness: object) -> Tensor:
    """Validate a floating-point hardness tensor without NaN; return it."""
    if not isinstance(hardness, Tensor) or not hardness.dtype.is_floating_point:
        got = f"a {hardness.dtype} tensor" if isinstance(hardness, Tensor) else type(hardness).__name__
        raise TypeError(f"Expected `hardness` to be a floating-point tensor, but got {got}")
    if bool(torch.isnan(hardness).any()):
        raise ValueError("Expected `hardness` without NaN, but it contains NaN")
    return hardness
