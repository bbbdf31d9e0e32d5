r"""Closed-form self-paced weights :math:`v^*(h, \lambda)` of the four regularisers (:mod:`mlcl_losses.self_paced`)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from mlcl_losses.self_paced._checks import check_hardness, check_positive, check_zeta
from mlcl_losses.self_paced._exact_pace import ceil_to_dtype

__all__ = ["REGULARIZERS", "Regularizer", "self_paced_weights"]

Regularizer = Literal["hard", "linear", "log", "mixture"]
REGULARIZERS: tuple[str, ...] = ("hard", "linear", "log", "mixture")


def self_paced_weights(
    hardness: Tensor,
    lam: float,
    regularizer: Regularizer = "linear",
    zeta: float = 0.1,
    mixture_c: float = 1.0,
) -> Tensor:
    r"""Closed-form self-paced weights :math:`v^*(h, \lambda)` (see :mod:`mlcl_losses.self_paced`).

    Args:
        hardness: any shape, float, already clamped to the hardness domain (``h >= 0``);
            ``±inf`` allowed, NaN is not.
        lam: the pace :math:`\lambda > 0` (``inf`` admits everything). Any positive float64
            pace is exact: one below (or above) the normal range of ``hardness``'s dtype, e.g.
            ``1e-300`` for float32, is applied in float64.
        regularizer: ``"hard" | "linear" | "log" | "mixture"``.
        zeta: shape of the ``log`` regulariser, in ``(0, 1)``.
        mixture_c: ratio :math:`c = \gamma / \lambda_Z > 0` of the ``mixture`` regulariser.

    Returns:
        Weights of ``hardness``'s shape and dtype, in ``[0, 1]``.

    Raises:
        TypeError: ``hardness`` is not a floating-point tensor, or ``lam``, ``zeta`` or
            ``mixture_c`` is not a real number (a string, a bool).
        ValueError: ``hardness`` contains NaN, or an option is out of range.

    Examples:
        >>> h = torch.tensor([0.0, 0.25, 0.5, 1.0])
        >>> self_paced_weights(h, 0.5, "hard").tolist()
        [1.0, 1.0, 0.0, 0.0]
        >>> self_paced_weights(h, 0.5, "linear").tolist()
        [1.0, 0.5, 0.0, 0.0]
        >>> self_paced_weights(h, float("inf"), "mixture").tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    hardness = check_hardness(hardness)
    if regularizer not in REGULARIZERS:
        raise ValueError(f"Expected `regularizer` in {REGULARIZERS}, but got {regularizer!r}")
    lam = check_positive("lam", lam, allow_inf=True)
    zeta = check_zeta(zeta)
    check_positive("mixture_c", mixture_c)
    one, zero = torch.ones_like(hardness), torch.zeros_like(hardness)
    if math.isinf(lam):
        return one
    if regularizer == "hard":
        return torch.where(hardness < ceil_to_dtype(lam, hardness.dtype), one, zero)
    # A pace outside the normal range of the hardness dtype (e.g. 1e-300 in float32) would round
    # to 0 or inf there (h / 0 = NaN): such a pace is applied in float64, where it is exact.
    info = torch.finfo(hardness.dtype)
    h = hardness if info.tiny <= lam <= info.max else hardness.double()
    if regularizer == "linear":
        return (1.0 - h / lam).clamp(0.0, 1.0).to(hardness.dtype)
    if regularizer == "log":
        rel = (h / lam).clamp(0.0, 1.0)
        return (torch.log(zeta + (1.0 - zeta) * rel) / math.log(zeta)).clamp(0.0, 1.0).to(hardness.dtype)
    # mixture: c * (sqrt(lam / h) - 1); h = 0 gives +inf -> 1, whatever the pace
    ratio = torch.sqrt(lam / h.clamp_min(torch.finfo(h.dtype).tiny))
    weights = (mixture_c * (ratio - 1.0)).clamp(0.0, 1.0).to(hardness.dtype)
    return torch.where(hardness == 0, one, weights)
