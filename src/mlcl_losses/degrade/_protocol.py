"""The :class:`Degradation` protocol: what a four-view sampler accepts as "the degradation to apply"."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Degradation"]


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
