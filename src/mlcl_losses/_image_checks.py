"""Validation of image arguments: ``(C, H, W)`` or ``(B, C, H, W)`` floating tensors in [0, 1].

Shared by the four-view sampler and the degradations, so that both refuse a bad image with the
same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["as_batch"]


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
