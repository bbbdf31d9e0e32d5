"""Argument checks shared by the regularisers, the schedules and the weighting module."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlcl_losses._steps import check_steps

__all__ = ["check_hardness", "check_positive", "check_steps", "check_zeta"]


def _real(name: str, value: object) -> float:
    """``value`` as a float; a bool, a string or anything else that is not a real number is a TypeError."""
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, Tensor) and value.numel() != 1):
        raise TypeError(f"Expected `{name}` to be a real number, but got {type(value).__name__} {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise TypeError(f"Expected `{name}` to be a real number, but got {type(value).__name__} {value!r}") from err


def check_positive(name: str, value: float, allow_inf: bool = False) -> float:
    """Validate a number > 0 (finite unless ``allow_inf``); return it as a float."""
    value = _real(name, value)
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


def check_zeta(zeta: object) -> float:
    """Validate the ``log`` regulariser's ``zeta`` in ``(0, 1)``; return it as a float."""
    value = _real("zeta", zeta)
    if not (0.0 < value < 1.0):
        raise ValueError(f"Expected `zeta` in (0, 1), but got {zeta}")
    return value
