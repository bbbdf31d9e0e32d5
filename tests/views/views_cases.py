"""Helpers of the four-view tests: the patch size, a random image and two lesion boxes."""

from __future__ import annotations

import torch

P = 16
BOXES = torch.tensor([[4.0, 6.0, 12.0, 15.0], [30.0, 30.0, 40.0, 38.5]])


def random_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """``(3, size, size)`` float in [0.05, 0.95], seeded."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05
