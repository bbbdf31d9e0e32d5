"""What the reference, fused and Triton paths of the loss share: options, statistics, pairs.

A leaf module: it imports only :mod:`mlcl_losses.levels` and :mod:`mlcl_losses.tags`, so
:mod:`mlcl_losses.functional`, the dispatcher (:mod:`mlcl_losses._dispatch`), the dense
reference (:mod:`mlcl_losses._reference`), :mod:`mlcl_losses._fused` and
:mod:`mlcl_losses._triton` all import it and none of them imports another's caller.

* The option types (``Denominator``, ``Reduction``, ``Impl``, ``FusedBackend``) and the
  weight callables (``NegativeWeightFn``, public as
  :data:`mlcl_losses.functional.NegativeWeightFn`; ``AnchorWeightFn``).

* :class:`LossOptions` and :func:`check_options`: the scalar options, validated once where
  they enter (:class:`~mlcl_losses.loss.MultiLevelContrastiveLoss` at construction, the
  PML adapter at construction, :func:`~mlcl_losses.functional.multilevel_info_nce` per call).
* :class:`LevelStats`: the per-level statistics every path returns.
* :class:`PathResult`: what each path computes, per level and anchor, before the reduction
  (anchor weights, level weights, ``reduction``), which :func:`reduce_levels` does the same
  way for every path.
* :func:`source_pairs` and :func:`forbid_mask`: the pair helpers of the tiled paths.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from mlcl_losses.levels import Level
from mlcl_losses.tags import ViewTags

__all__ = [
    "LevelStats",
    "LossOptions",
    "PathResult",
    "check_options",
    "forbid_mask",
    "reduce_levels",
    "source_pairs",
]

Denominator = Literal["pos_neg", "all"]
DENOMINATORS: tuple[str, ...] = ("pos_neg", "all")
Reduction = Literal["mean", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "none")
Impl = Literal["auto", "fused", "reference"]
IMPLS: tuple[str, ...] = ("auto", "fused", "reference")
FusedBackend = Literal["auto", "torch", "triton"]
FUSED_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

#: A negative weighting ``fn(hardness, mask) -> weights``, where ``hardness`` is the
#: ``(N, C)`` anchor–candidate cosine similarity (detached), ``mask`` the ``(N, C)``
#: bool negative mask of the level; the weights ``(N, C)`` multiply each negative's
#: exponential term. :class:`~mlcl_losses.self_paced.SelfPacedWeighting` is one.
NegativeWeightFn = Callable[[Tensor, Tensor], Tensor]
NegativeWeights = Tensor | NegativeWeightFn | None
AnchorWeightFn = Callable[[Tensor, Tensor], Tensor]

#: Anchors per row tile of the torch fused path (default of ``block_rows``).
DEFAULT_BLOCK_ROWS = 256
#: Candidates per column tile of the torch fused path (default of ``block_cols``).
DEFAULT_BLOCK_COLS = 4096


class LevelStats(NamedTuple):
    """Statistics of one level (all 0-dim tensors, detached, except ``path``).

    Attributes:
        loss: the level's mean anchor loss (before its weight; anchor weights applied).
        anchors: anchors that contributed.
        skipped: anchors of the level with no positive or no negative.
        pos_sim: mean cosine similarity over the contributing anchors' positive pairs.
        neg_sim: mean cosine similarity over their negative pairs (unweighted).
        valid: ``(N,)`` bool, which embeddings contributed as anchors.
        path: which implementation computed it: ``"reference"``, ``"fused-torch"`` or
            ``"fused-triton"``.
    """

    loss: Tensor
    anchors: Tensor
    skipped: Tensor
    pos_sim: Tensor
    neg_sim: Tensor
    valid: Tensor
    path: str = "reference"


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of the loss, validated (:func:`check_options`)."""

    temperature: float = 0.1
    denominator: Denominator = "pos_neg"
    tau_plus: float = 0.0
    beta: float = 0.0
    reduction: Reduction = "mean"
    impl: Impl = "auto"
    backend: FusedBackend = "auto"
    block_rows: int = DEFAULT_BLOCK_ROWS
    block_cols: int = DEFAULT_BLOCK_COLS


def _real(name: str, value: object) -> float:
    """``value`` as a float, refusing anything but a real Python/NumPy number (a tensor, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Expected `{name}` >= 1, but got {value}")
    return value


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Expected `{name}` in {allowed}, but got {value!r}")
    return value


def check_options(
    temperature: object = 0.1,
    denominator: object = "pos_neg",
    tau_plus: object = 0.0,
    beta: object = 0.0,
    reduction: object = "mean",
    impl: object = "auto",
    backend: object = "auto",
    block_rows: object = None,
    block_cols: object = None,
) -> LossOptions:
    """Validate the loss's scalar options once; the module, the function and the PML adapter call it.

    Raises:
        TypeError: an option of the wrong type (``temperature=tensor(0.1)``, ``True``, a string).
        ValueError: an option out of range, naming it and the value.
    """
    tau = _real("temperature", temperature)
    if not (tau > 0) or math.isinf(tau):
        raise ValueError(f"Expected `temperature` > 0 and finite, but got {tau}")
    tp = _real("tau_plus", tau_plus)
    if not (0.0 <= tp < 1.0):
        raise ValueError(f"Expected `tau_plus` in [0, 1), but got {tp}")
    b = _real("beta", beta)
    if not (b >= 0.0) or math.isinf(b):
        raise ValueError(f"Expected `beta` >= 0 and finite, but got {b}")
    den = _choice("denominator", denominator, DENOMINATORS)
    if (tp > 0 or b > 0) and den != "pos_neg":
        raise ValueError(f"`tau_plus` and `beta` need denominator='pos_neg', but got {den!r}")
    return LossOptions(
        temperature=tau,
        denominator=den,
        tau_plus=tp,
        beta=b,
        reduction=_choice("reduction", reduction, REDUCTIONS),
        impl=_choice("impl", impl, IMPLS),
        backend=_choice("backend", backend, FUSED_BACKENDS),
        block_rows=DEFAULT_BLOCK_ROWS if block_rows is None else _positive_int("block_rows", block_rows),
        block_cols=DEFAULT_BLOCK_COLS if block_cols is None else _positive_int("block_cols", block_cols),
    )


@dataclass
class PathResult:
    """What a path computes before the reduction, for ``L`` levels and ``N`` anchors.

    Attributes:
        per_anchor: ``(L, N)`` float, each anchor's loss :math:`l_i` (0 where not valid);
            differentiable in the embeddings (and the bank).
        valid: ``(L, N)`` bool, anchors with a positive and a negative.
        anchors: ``(L, N)`` bool, the levels' anchor selectors.
        pos_sim: ``(L,)`` mean positive cosine over the valid anchors (0 if none).
        neg_sim: ``(L,)`` mean negative cosine over the valid anchors (0 if none).
        path: ``"reference"``, ``"fused-torch"`` or ``"fused-triton"``.
    """

    per_anchor: Tensor
    valid: Tensor
    anchors: Tensor
    pos_sim: Tensor
    neg_sim: Tensor
    path: str


def reduce_levels(
    result: PathResult, levels: list[Level], anchor_weights: Any, reduction: str
) -> tuple[Tensor, dict[str, LevelStats]]:
    r"""Anchor weights, level weights and the reduction, the same for every path; builds the statistics once.

    ``anchor_weights`` (a ``(N,)`` tensor or ``fn(losses (N,), valid (N,)) -> (N,)`` called on each
    level's detached per-anchor losses) multiply the per-anchor losses; a level's loss is
    :math:`\\sum_i v_i l_i / |\\text{valid}|`.

    Returns:
        ``(loss, stats)``: a 0-dim loss (``reduction="mean"``) or ``(L, N)`` weighted per-anchor
        losses times the level weight (``"none"``), and the statistics per level name.
    """
    per_anchor, valid = result.per_anchor, result.valid
    dtype = per_anchor.dtype
    n_valid = valid.sum(dim=1)  # (L,)
    total = per_anchor.sum() * 0.0  # keeps the graph connected: zero loss, zero gradient
    rows: list[Tensor] = []
    stats: dict[str, LevelStats] = {}
    for li, level in enumerate(levels):
        weighted = _weight_anchors(per_anchor[li], valid[li], anchor_weights)
        level_loss = weighted.sum() / n_valid[li].clamp_min(1).to(dtype)
        total = total + level.weight * level_loss
        rows.append(level.weight * weighted)
        stats[level.name] = LevelStats(
            loss=level_loss.detach(),
            anchors=n_valid[li],
            skipped=(result.anchors[li] & ~valid[li]).sum(),
            pos_sim=result.pos_sim[li].detach(),
            neg_sim=result.neg_sim[li].detach(),
            valid=valid[li],
            path=result.path,
        )
    if reduction == "none":
        n = per_anchor.shape[1]
        return (torch.stack(rows) if rows else per_anchor.new_zeros(0, n)), stats
    return total, stats


def _weight_anchors(per_anchor: Tensor, valid: Tensor, anchor_weights: Any) -> Tensor:
    if anchor_weights is None:
        return per_anchor
    if isinstance(anchor_weights, Tensor):
        v = anchor_weights
    elif callable(anchor_weights):
        v = anchor_weights(per_anchor.detach(), valid)
    else:
        raise TypeError(
            f"Expected `anchor_weights` to be a tensor, a callable or None, but got {type(anchor_weights).__name__}"
        )
    if not isinstance(v, Tensor) or v.shape != per_anchor.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"Expected `anchor_weights` of shape {tuple(per_anchor.shape)}, but got {got}")
    v = v.detach().to(device=per_anchor.device, dtype=per_anchor.dtype)
    bad = valid & ~(torch.isfinite(v) & (v >= 0))
    if bool(bad.any()):
        raise ValueError(f"Expected finite `anchor_weights` >= 0, but got {float(v[bad][0])}")
    return per_anchor * torch.where(valid, v, torch.zeros_like(v))


def source_pairs(source: Tensor, anchors: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Same-source pairs ``(anchor (P,), positive (P,))``, sorted by anchor, never an embedding with itself.

    Args:
        source: ``(N,)`` source ids.
        anchors: ``(N,)`` bool, which embeddings are anchors.
        positives: ``(N,)`` bool, which embeddings may be positives.

    Candidates are sorted by source; each anchor's positives are the run of its source
    (``searchsorted``), minus the anchor itself: ``O(N log N + P)``, no ``N x N`` mask.
    """
    anchor_idx = anchors.nonzero()[:, 0]
    pos_idx = positives.nonzero()[:, 0]
    keys, order = torch.sort(source[pos_idx], stable=True)
    pos_sorted = pos_idx[order]
    anchor_keys = source[anchor_idx]
    lo = torch.searchsorted(keys, anchor_keys, side="left")
    count = torch.searchsorted(keys, anchor_keys, side="right") - lo
    a = anchor_idx.repeat_interleave(count)
    first = (torch.cumsum(count, 0) - count).repeat_interleave(count)
    offset = torch.arange(a.shape[0], device=a.device) - first + lo.repeat_interleave(count)
    p = pos_sorted[offset]
    keep = a != p  # never its own positive
    return a[keep], p[keep]


def forbid_mask(tr: ViewTags, tc: ViewTags, level: Level) -> Tensor:
    """``(R, C)`` pairs that may never be negatives (same source, image, or label where the level says so).

    ``tr`` are ``(R,)`` row tags; ``tc`` are ``(C,)`` or ``(R, C)`` column tags.
    """

    def pair(q: Tensor, k: Tensor) -> Tensor:
        return q[:, None] == (k[None, :] if k.dim() == 1 else k)

    forbid = pair(tr.source, tc.source)
    if tr.image is not None and tc.image is not None:
        forbid = forbid | pair(tr.image, tc.image)
    if level.needs_label and tr.label is not None and tc.label is not None:
        forbid = forbid | pair(tr.label, tc.label)
    return forbid
