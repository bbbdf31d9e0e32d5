"""The check of a step count or step index (the pace's ``step(n)``, ``advance(n)``, ``value(t)``)."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_steps"]


def check_steps(name: str, n: object) -> int:
    """Validate a step count or step index: an int >= 0 (a bool is not one; 2.5 is not truncated); return it."""
    try:
        if isinstance(n, (bool, np.bool_)) or (isinstance(n, Tensor) and n.dtype == torch.bool):
            raise TypeError
        value = operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"Expected `{name}` to be an int >= 0, but got {type(n).__name__} {n!r}") from None
    if value < 0:
        raise ValueError(f"Expected `{name}` to be an int >= 0, but got {value}")
    return value
