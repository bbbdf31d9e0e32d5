"""Argument checks of the degradations: ``image``, ``severity`` (a value, one per image, or a range), ``kinds``.

:func:`draw_severity` draws one severity from a ``(low, high)`` range, as the degradation classes do
per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mlcl_losses._image_checks import as_batch
from mlcl_losses._seeding import resolve_generator

__all__ = [
    "check_chosen_kinds",
    "check_degrade_call",
    "check_kinds",
    "check_severity",
    "check_severity_spec",
    "draw_severity",
]


def check_severity(severity: Any, batch: int) -> list[float]:
    """Validate ``severity`` (a number or one per image) and return one float per image."""
    if isinstance(severity, Tensor):
        values = severity.detach().flatten().tolist() if severity.dim() else [float(severity)]
    elif isinstance(severity, (int, float)) and not isinstance(severity, bool):
        values = [float(severity)]
    elif isinstance(severity, Sequence) and not isinstance(severity, str):
        values = list(severity)
    else:
        raise TypeError(f"Expected `severity` to be a float in [0, 1] or one per image, but got {severity!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected `severity` values to be floats in [0, 1], but got {value!r}")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"Expected `severity` in [0, 1], but got {value}")
    if len(values) == 1:
        return [float(values[0])] * batch
    if len(values) != batch:
        raise ValueError(f"Expected one `severity` or one per image ({batch}), but got {len(values)}")
    return [float(v) for v in values]


def check_kinds(kinds: Any, allowed: Sequence[str], name: str = "kinds") -> tuple[str, ...]:
    """Validate a collection of option strings against ``allowed``; keep ``allowed``'s order."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, Sequence) and not isinstance(kinds, (set, frozenset)):
        raise TypeError(f"Expected `{name}` to be a sequence of names from {tuple(allowed)}, but got {kinds!r}")
    chosen = set()
    for kind in kinds:
        if kind not in allowed:
            raise ValueError(f"Expected `{name}` entries in {tuple(allowed)}, but got {kind!r}")
        chosen.add(kind)
    return tuple(k for k in allowed if k in chosen)


def check_severity_spec(severity: Any) -> tuple[float, float]:
    """Validate a severity given as a float or a ``(low, high)`` range; return the range."""
    if isinstance(severity, tuple):
        if len(severity) != 2:
            raise ValueError(f"Expected `severity` to be a float or a (low, high) pair, but got {severity!r}")
        low, high = check_severity(list(severity), 2)
        if low > high:
            raise ValueError(f"Expected `severity` range with low <= high, but got {severity!r}")
        return low, high
    (value,) = check_severity(severity, 1)
    return value, value


def draw_severity(spec: float | tuple[float, float], g: torch.Generator) -> float:
    """Draw a severity uniformly from a float or ``(low, high)`` spec."""
    low, high = check_severity_spec(spec)
    u = float(torch.rand(1, generator=g, device=g.device))
    return low + (high - low) * u


def check_chosen_kinds(kinds: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    """:func:`check_kinds` that also refuses an empty choice."""
    chosen = check_kinds(kinds, allowed)
    if not chosen:
        raise ValueError(f"Expected `kinds` to name at least one of {tuple(allowed)}, but got {kinds!r}")
    return chosen


def check_degrade_call(
    image: Any,
    severity: Any,
    kinds: Any,
    allowed: Sequence[str],
    channels: Sequence[int],
    generator: torch.Generator | None,
    seed: int | None,
) -> tuple[Tensor, bool, tuple[str, ...], list[float], torch.Generator]:
    """The checks of a ``degrade_*`` call, in order: image, non-empty batch, kinds, severity, generator.

    Returns:
        ``(batch (B, C, H, W), was_batched, chosen kinds, one severity per image, generator)``.
    """
    batch, batched = as_batch(image, channels=channels)
    if batch.shape[0] == 0:
        raise ValueError(f"Expected `image` to hold at least one image, but got a batch of shape {tuple(batch.shape)}")
    chosen = check_chosen_kinds(kinds, allowed)
    severities = check_severity(severity, batch.shape[0])
    return batch, batched, chosen, severities, resolve_generator(generator, seed)
