r"""Self-paced weights of a batch at the schedule's pace: :class:`SelfPacedWeighting` and its frozen form."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mlcl_losses.self_paced._checks import check_hardness, check_positive, check_steps, check_zeta
from mlcl_losses.self_paced._exact_pace import ceil_to_dtype, pace_above, quantile_rank
from mlcl_losses.self_paced.regularizers import REGULARIZERS, Regularizer, self_paced_weights
from mlcl_losses.self_paced.schedule import PaceSchedule

__all__ = ["FrozenWeighting", "Hardness", "SelfPacedWeighting", "Target"]

Target = Literal["negatives", "anchors"]
_TARGETS: tuple[str, ...] = ("negatives", "anchors")
Hardness = Literal["similarity", "loss"]
_HARDNESS: tuple[str, ...] = ("similarity", "loss")


class FrozenWeighting:
    r"""A :class:`SelfPacedWeighting` with its pace :math:`\lambda` fixed: an elementwise function.

    ``fn(hardness, mask=None) -> weights`` clamps ``hardness`` to the weighting's domain and returns
    :func:`self_paced_weights` at :math:`\lambda` (``mask`` is ignored: the pace is fixed).
    What the fused loss calls on tiles, in forward and backward, so that a pace stepped in
    between leaves the gradients of that forward unchanged.

    Attributes:
        lam: the frozen pace.
        is_elementwise: ``True`` (each weight depends on its own hardness only).
    """

    is_elementwise = True

    def __init__(self, weighting: SelfPacedWeighting, lam: float) -> None:
        self.weighting = weighting
        self.lam = float(lam)

    def __call__(self, hardness: Tensor, mask: Tensor | None = None) -> Tensor:
        """Weights of ``hardness``'s shape and dtype, in ``[0, 1]``."""
        w = self.weighting
        return self_paced_weights(w.clamp(hardness.detach()), self.lam, w.regularizer, w.zeta, w.mixture_c)

    def log_weights(self, hardness: Tensor) -> Tensor:
        """``log`` of the weights (``-inf`` where a weight is 0), without the input checks.

        For the ``hard`` regulariser one comparison: ``0`` where ``h < lambda``, else ``-inf``.
        """
        w = self.weighting
        h = w.clamp(hardness.detach())
        if math.isinf(self.lam):
            return torch.zeros_like(h)
        if w.regularizer == "hard":
            keep = h < ceil_to_dtype(self.lam, h.dtype)
            return torch.zeros_like(h).masked_fill_(~keep, float("-inf"))
        return torch.log(self_paced_weights(h, self.lam, w.regularizer, w.zeta, w.mixture_c))


class SelfPacedWeighting(nn.Module):
    r"""Self-paced weights from hardness at the schedule's current pace.

    Args:
        regularizer: ``"hard" | "linear" | "log" | "mixture"`` (:mod:`mlcl_losses.self_paced`).
        schedule: the pace :math:`\lambda_t` (default: constant 1.0).
        target: ``"negatives"`` (hardness ``(N, M)`` anchor–negative similarity, weights
            plug into the loss's ``negative_weights``) or ``"anchors"`` (per-anchor losses
            ``(N,)``, weights plug into ``anchor_weights``).
        hardness: ``"similarity"`` (clamped to ``[0, 1]``) or ``"loss"`` (clamped to
            ``[0, inf)``); default ``"similarity"`` for negatives, ``"loss"`` for anchors.
            Higher is harder in both.
        zeta: shape of the ``log`` regulariser, in ``(0, 1)``.
        mixture_c: ratio :math:`c` of the ``mixture`` regulariser, > 0.

    Call it as ``spl(hardness, mask=None, step=None)``: ``mask`` (bool, same shape) marks the
    candidates (a quantile schedule picks :math:`\lambda` among them; weights outside the
    mask are still returned). ``step()`` advances the pace. The schedule state is part of
    :meth:`~torch.nn.Module.state_dict` (loadable with ``torch.load(..., weights_only=True)``).

    Examples:
        >>> spl = SelfPacedWeighting("linear", PaceSchedule.linear(start=0.2, end=1.0, steps=10))
        >>> spl(torch.tensor([[0.1, 0.5]])).tolist()
        [[0.5, 0.0]]
        >>> spl.step(); round(spl.lam(), 2)
        0.28
    """

    def __init__(
        self,
        regularizer: Regularizer = "linear",
        schedule: PaceSchedule | None = None,
        target: Target = "negatives",
        hardness: Hardness | None = None,
        zeta: float = 0.1,
        mixture_c: float = 1.0,
    ) -> None:
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(f"Expected `regularizer` in {REGULARIZERS}, but got {regularizer!r}")
        if target not in _TARGETS:
            raise ValueError(f"Expected `target` in {_TARGETS}, but got {target!r}")
        hardness = hardness or ("similarity" if target == "negatives" else "loss")
        if hardness not in _HARDNESS:
            raise ValueError(f"Expected `hardness` in {_HARDNESS}, but got {hardness!r}")
        if schedule is not None and not isinstance(schedule, PaceSchedule):
            raise TypeError(f"Expected `schedule` to be a PaceSchedule, but got {type(schedule).__name__}")
        zeta = check_zeta(zeta)
        self.regularizer: Regularizer = regularizer
        self.schedule = schedule if schedule is not None else PaceSchedule.constant(1.0)
        self.target: Target = target
        self.hardness: Hardness = hardness
        self.zeta = float(zeta)
        self.mixture_c = check_positive("mixture_c", mixture_c)
        #: Last k-th hardness per level name, kept by the fused loss as a hint that saves it a pass
        #: over the tiles when the next pace is close (it never changes the pace; not saved).
        self.pace_hints: dict[str, float] = {}

    @property
    def is_elementwise(self) -> bool:
        """True when each weight depends on its own hardness only (not for quantile schedules)."""
        return not self.schedule.needs_hardness

    @property
    def bounds(self) -> tuple[float, float]:
        """Clamp range of the hardness, ``(0, 1)`` for similarities and ``(0, inf)`` for losses."""
        return (0.0, 1.0 if self.hardness == "similarity" else float("inf"))

    def pace_rank(self, count: int, step: int | None = None) -> int | None:
        r"""Streaming protocol of a quantile pace: which candidate's hardness sets :math:`\lambda`.

        Args:
            count: the number of candidates (e.g. a level's negative pairs).
            step: the step (default: the current one).

        Returns:
            The rank ``k`` (1-based, ascending) of the clamped hardness whose next representable
            value is :math:`\lambda`; ``None`` when no selection is needed (not a quantile pace,
            no candidate, or a fraction of 1: :math:`\lambda` is then :meth:`lam` or ``inf``).
        """
        if not self.schedule.needs_hardness:
            return None
        t = self.schedule.step_count if step is None else check_steps("step", step)
        return quantile_rank(int(count), self.schedule._fraction(t))

    def frozen(self, kth: Tensor | None = None, step: int | None = None) -> FrozenWeighting:
        """This weighting with its pace fixed now (records it as the schedule's ``last_lam``).

        Args:
            kth: for a quantile pace, the ``k``-th smallest clamped hardness (0-dim, in the
                hardness dtype) of :meth:`pace_rank`, or ``None`` when it returned ``None``.
            step: the step (default: the current one).

        Returns:
            An elementwise :class:`FrozenWeighting`.
        """
        if self.schedule.needs_hardness:
            lam = float("inf") if kth is None else pace_above(kth.detach().reshape(()))
            self.schedule.last_lam = lam
        else:
            lam = self.schedule.value(step)
        return FrozenWeighting(self, lam)

    def lam(self, step: int | None = None, hardness: Tensor | None = None) -> float:
        r"""The pace :math:`\lambda` at ``step`` (default: the current step)."""
        return self.schedule.value(step, hardness)

    def clamp(self, hardness: Tensor) -> Tensor:
        """``hardness`` clamped to :attr:`bounds` (``-0.0`` becomes ``+0.0``)."""
        lo, hi = self.bounds
        return hardness.clamp(lo, hi) + 0.0

    def forward(self, hardness: Tensor, mask: Tensor | None = None, step: int | None = None) -> Tensor:
        """Weights in ``[0, 1]``.

        Args:
            hardness: float tensor, ``(N, M)`` for negatives or ``(N,)`` for anchors;
                ``±inf`` (padded bank entries) allowed, NaN is not.
            mask: optional bool of the same shape: the candidates.
            step: evaluate the pace at this step instead of the current one.

        Returns:
            Weights of ``hardness``'s shape and dtype (detached).

        Raises:
            TypeError: ``hardness`` not a float tensor, ``mask`` not a bool tensor, ``step`` not an int.
            ValueError: NaN in ``hardness``, a shape other than the target's, ``mask`` of another
                shape, or ``step`` < 0.
        """
        hardness = check_hardness(hardness)
        expected_dim = 1 if self.target == "anchors" else 2
        if hardness.dim() != expected_dim:
            raise ValueError(
                f"Expected `hardness` with {expected_dim} dimension(s) for target={self.target!r}, "
                f"but got shape {tuple(hardness.shape)}"
            )
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"Expected `mask` to be a bool tensor, but got {got}")
            if mask.shape != hardness.shape:
                raise ValueError(
                    f"Expected `mask` of shape {tuple(hardness.shape)} (as `hardness`), but got {tuple(mask.shape)}"
                )
        h = self.clamp(hardness.detach())
        candidates = h if mask is None else h[mask]
        step = None if step is None else check_steps("step", step)
        lam = self.schedule.value(step, candidates if self.schedule.needs_hardness else None)
        return self_paced_weights(h, lam, self.regularizer, self.zeta, self.mixture_c)

    def step(self, n: int = 1) -> None:
        """Advance the pace by ``n`` steps.

        Raises:
            TypeError: ``n`` not an int (a bool or ``2.5`` is refused, not truncated).
            ValueError: ``n`` < 0 (the pace never moves backwards).
        """
        self.schedule.advance(n)

    def get_extra_state(self) -> dict[str, Any]:
        """Schedule state, saved inside :meth:`~torch.nn.Module.state_dict`."""
        return self.schedule.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the schedule state from :meth:`~torch.nn.Module.state_dict`."""
        self.schedule.load_state_dict(state)

    def extra_repr(self) -> str:
        """Regulariser, target and schedule."""
        return f"regularizer={self.regularizer!r}, target={self.target!r}, schedule={self.schedule.kind!r}"
