"""``SelfPacedReducer``: self-paced weights for any PML loss's losses (public in :mod:`mlcl_losses.pml`)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.reducers import BaseReducer
from torch import Tensor

from mlcl_losses.self_paced import SelfPacedWeighting

__all__ = ["SelfPacedReducer"]

_REDUCTION_TYPES = ("element", "pos_pair", "neg_pair", "triplet")


class SelfPacedReducer(BaseReducer):
    """A PML reducer that weights per-element losses with self-paced weights, then averages.

    Gives PML users self-paced learning without this library's loss: the weights come
    from a :class:`~mlcl_losses.self_paced.SelfPacedWeighting` with ``target="anchors"``
    applied to the detached losses; the result is ``mean(v * loss)``, which is PML's
    ``MeanReducer`` when every weight is 1. Every shape PML's reducers take is handled:
    ``"element"``, ``"pos_pair"``, ``"neg_pair"`` and ``"triplet"`` losses of shape ``(P,)``
    or ``(P, 1)`` (e.g. ``MultiSimilarityLoss``, ``CircleLoss``, ``LiftedStructureLoss``) are
    weighted entry by entry; ``"already_reduced"`` losses pass through unweighted (there is
    nothing to weight).

    Args:
        weighting: the self-paced weighting (``target="anchors"``).

    Raises:
        ValueError: ``weighting`` of the wrong target; at call time, losses with NaN.
        TypeError: ``weighting`` not a ``SelfPacedWeighting``.

    Examples:
        >>> from mlcl_losses.self_paced import PaceSchedule
        >>> reducer = SelfPacedReducer(SelfPacedWeighting("hard", PaceSchedule.constant(1.0), target="anchors"))
        >>> reducer.element_reduction(torch.tensor([0.5, 2.0]), None, None, None)
        tensor(0.2500)
    """

    def __init__(self, weighting: SelfPacedWeighting, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(weighting, SelfPacedWeighting):
            raise TypeError(
                "Expected `weighting` to be a SelfPacedWeighting with target='anchors', "
                f"but got {type(weighting).__name__}"
            )
        if weighting.target != "anchors":
            raise ValueError(
                f"Expected `weighting` with target='anchors' (it weights losses), but got target={weighting.target!r}"
            )
        self.weighting = weighting

    def __deepcopy__(self, memo: dict[int, Any]) -> SelfPacedReducer:
        """PML deep-copies reducers; the copy shares the weighting, so ``weighting.step()`` reaches it."""
        return SelfPacedReducer(self.weighting)

    def _weighted_mean(self, losses: Tensor, reduction_type: str) -> Tensor:
        if not isinstance(losses, Tensor) or not losses.dtype.is_floating_point:
            got = f"a {losses.dtype} tensor" if isinstance(losses, Tensor) else type(losses).__name__
            raise TypeError(f"SelfPacedReducer expected {reduction_type!r} losses as a float tensor, but got {got}")
        detached = losses.detach()
        if bool(torch.isnan(detached).any()):
            raise ValueError(f"SelfPacedReducer got {reduction_type!r} losses containing NaN (from the loss function)")
        weights = self.weighting(detached.reshape(-1)).reshape(losses.shape)  # one weight per loss entry
        return (weights * losses).mean()

    def element_reduction(self, losses: Tensor, *_: Any) -> Tensor:
        """``mean(v * losses)`` with ``v = weighting(losses.detach())``, entry by entry."""
        return self._weighted_mean(losses, "element")

    def pos_pair_reduction(self, losses: Tensor, *_: Any) -> Tensor:
        """Same as :meth:`element_reduction`, over positive pairs."""
        return self._weighted_mean(losses, "pos_pair")

    def neg_pair_reduction(self, losses: Tensor, *_: Any) -> Tensor:
        """Same as :meth:`element_reduction`, over negative pairs."""
        return self._weighted_mean(losses, "neg_pair")

    def triplet_reduction(self, losses: Tensor, *_: Any) -> Tensor:
        """Same as :meth:`element_reduction`, over triplets."""
        return self._weighted_mean(losses, "triplet")
