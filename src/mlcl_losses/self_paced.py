r"""Self-paced weighting: admit hard samples gradually, as the pace :math:`\lambda` grows.

Self-paced learning (Kumar et al., NeurIPS 2010) weights each sample by the minimiser

.. math::

    v^*(h, \lambda) = \operatorname*{arg\,min}_{v \in [0, 1]} \; v h + f(v; \lambda)

of a self-paced regulariser :math:`f`, where :math:`h` is the sample's hardness. CoMCL
uses it for "dynamic hard sample mining": early in training the hardest negatives (often
unlabelled lesions or strong artefacts) are down-weighted; as :math:`\lambda` rises they
are admitted. Hardness is used as given (for negatives, the anchor–negative cosine
similarity; for anchors, the anchor's loss), clamped to ``[0, 1]`` for similarities and
to ``[0, inf)`` for losses. Higher is harder.

Regularisers and their closed-form weights, all in ``[0, 1]``, non-increasing in
:math:`h`, non-decreasing in :math:`\lambda`, and all 1 as :math:`\lambda \to \infty`:

=============  ================================================================================  ===============
regulariser    :math:`f(v; \lambda)`                                                             reference
=============  ================================================================================  ===============
``hard``       :math:`-\lambda v`                                                                Kumar 2010
``linear``     :math:`\lambda (v^2/2 - v)`                                                       Jiang 2014
``log``        :math:`\frac{\lambda}{1-\zeta}(\zeta v - \zeta^v / \log \zeta)`                   Jiang 2014
``mixture``    :math:`\gamma^2 / (v + \gamma/\sqrt\lambda)` with :math:`\gamma = c\sqrt\lambda`  Zhao 2015
=============  ================================================================================  ===============

=============  ===========================================================================================
regulariser    :math:`v^*(h, \lambda)`
=============  ===========================================================================================
``hard``       :math:`\mathbb{1}[h < \lambda]`
``linear``     :math:`\max(0, 1 - h / \lambda)`
``log``        :math:`\log(\zeta + (1-\zeta) h/\lambda) / \log \zeta` if :math:`h < \lambda`, else 0
``mixture``    :math:`\mathrm{clip}(c(\sqrt{\lambda / h} - 1), 0, 1)` (1 at :math:`h = 0`)
=============  ===========================================================================================

Reconstruction notes. Jiang et al.'s logarithmic regulariser is
:math:`f(v) = \zeta v - \zeta^v / \log \zeta` with :math:`\zeta = 1 - \lambda` (so
:math:`0 < \lambda < 1`) and minimiser :math:`v^* = \log(h + \zeta) / \log \zeta` for
:math:`h < \lambda`, else 0. With that tie the weights are not monotone in :math:`\lambda`
(at :math:`h = 0.1`: 0.74 at :math:`\lambda = 0.5`, 0.48 at :math:`\lambda = 0.99`), so here
:math:`\zeta \in (0, 1)` is a fixed shape parameter and the regulariser is scaled by
:math:`\lambda / (1 - \zeta)`; at :math:`\zeta = 1 - \lambda` the scale is 1 and both the
regulariser and the weights are theirs. Zhao et al.'s mixture regulariser
:math:`f(v) = \gamma^2 / (v + \gamma/\lambda_Z)` has the closed form
:math:`v^* = 1` below :math:`(\lambda_Z\gamma/(\lambda_Z+\gamma))^2`, 0 above
:math:`\lambda_Z^2`, :math:`\gamma(1/\sqrt{h} - 1/\lambda_Z)` between; with
:math:`\lambda_Z = \sqrt\lambda` and :math:`\gamma = c \lambda_Z` it is the formula above,
whose thresholds (:math:`c^2\lambda/(1+c)^2` and :math:`\lambda`) scale with the pace.
The ``hard`` comparison :math:`h < \lambda` is exact: :math:`\lambda` is rounded up to
the hardness dtype before comparing.

Links: Kumar et al. https://papers.nips.cc/paper/3923-self-paced-learning-for-latent-variable-models ;
Jiang et al. https://doi.org/10.1145/2647868.2654918 ;
Zhao et al. https://doi.org/10.1609/aaai.v29i1.9584 .

Type aliases of the signatures:

.. py:type:: Regularizer
   :canonical: typing.Literal['hard', 'linear', 'log', 'mixture']

   The self-paced regulariser.

.. py:type:: Target
   :canonical: typing.Literal['negatives', 'anchors']

   What is weighted: the negatives of each anchor or the anchors.

.. py:type:: Hardness
   :canonical: typing.Literal['similarity', 'loss']

   How hardness is measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FrozenWeighting",
    "PaceSchedule",
    "SelfPacedWeighting",
    "self_paced_weights",
]

Regularizer = Literal["hard", "linear", "log", "mixture"]
_REGULARIZERS: tuple[str, ...] = ("hard", "linear", "log", "mixture")
Target = Literal["negatives", "anchors"]
_TARGETS: tuple[str, ...] = ("negatives", "anchors")
Hardness = Literal["similarity", "loss"]
_HARDNESS: tuple[str, ...] = ("similarity", "loss")
ScheduleKind = Literal["constant", "linear", "exponential", "step", "quantile"]
_SCHEDULES: tuple[str, ...] = ("constant", "linear", "exponential", "step", "quantile")
_SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": ("lam",),
    "linear": ("start", "end", "steps"),
    "exponential": ("start", "end", "steps"),
    "step": ("values", "milestones"),
    "quantile": ("start", "end", "steps"),
}


def _check_positive(name: str, value: float, allow_inf: bool = False) -> float:
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"Expected `{name}` > 0{'' if allow_inf else ' and finite'}, but got {value}")
    return value


def _check_hardness(hardness: object) -> Tensor:
    if not isinstance(hardness, Tensor) or not hardness.dtype.is_floating_point:
        got = f"a {hardness.dtype} tensor" if isinstance(hardness, Tensor) else type(hardness).__name__
        raise TypeError(f"Expected `hardness` to be a floating-point tensor, but got {got}")
    if bool(torch.isnan(hardness).any()):
        raise ValueError("Expected `hardness` without NaN, but it contains NaN")
    return hardness


def _ceil_to_dtype(value: float, dtype: torch.dtype) -> float:
    """Smallest number of ``dtype`` that is >= ``value``: ``h < value`` is then exact for ``h`` of ``dtype``."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(rounded) < value:
        rounded = torch.nextafter(rounded, torch.tensor(math.inf, dtype=dtype))
    return float(rounded)


def self_paced_weights(
    hardness: Tensor,
    lam: float,
    regularizer: Regularizer = "linear",
    zeta: float = 0.1,
    mixture_c: float = 1.0,
) -> Tensor:
    r"""Closed-form self-paced weights :math:`v^*(h, \lambda)` (see the module docstring).

    Args:
        hardness: any shape, float, already clamped to the hardness domain (``h >= 0``);
            ``±inf`` allowed, NaN is not.
        lam: the pace :math:`\lambda > 0` (``inf`` admits everything).
        regularizer: ``"hard" | "linear" | "log" | "mixture"``.
        zeta: shape of the ``log`` regulariser, in ``(0, 1)``.
        mixture_c: ratio :math:`c = \gamma / \lambda_Z > 0` of the ``mixture`` regulariser.

    Returns:
        Weights of ``hardness``'s shape and dtype, in ``[0, 1]``.

    Raises:
        TypeError: ``hardness`` is not a floating-point tensor.
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
    hardness = _check_hardness(hardness)
    if regularizer not in _REGULARIZERS:
        raise ValueError(f"Expected `regularizer` in {_REGULARIZERS}, but got {regularizer!r}")
    lam = _check_positive("lam", lam, allow_inf=True)
    if not (0.0 < zeta < 1.0):
        raise ValueError(f"Expected `zeta` in (0, 1), but got {zeta}")
    _check_positive("mixture_c", mixture_c)
    one, zero = torch.ones_like(hardness), torch.zeros_like(hardness)
    if math.isinf(lam):
        return one
    if regularizer == "hard":
        return torch.where(hardness < _ceil_to_dtype(lam, hardness.dtype), one, zero)
    if regularizer == "linear":
        return (1.0 - hardness / lam).clamp(0.0, 1.0)
    if regularizer == "log":
        rel = (hardness / lam).clamp(0.0, 1.0)
        return (torch.log(zeta + (1.0 - zeta) * rel) / math.log(zeta)).clamp(0.0, 1.0)
    # mixture: c * (sqrt(lam / h) - 1); h = 0 gives +inf -> 1
    ratio = torch.sqrt(lam / hardness.clamp_min(torch.finfo(hardness.dtype).tiny))
    return (mixture_c * (ratio - 1.0)).clamp(0.0, 1.0)


@dataclass
class PaceSchedule:
    r"""How the pace :math:`\lambda_t` grows with the step :math:`t`.

    Build one with a constructor: :meth:`constant`, :meth:`linear`, :meth:`exponential`,
    :meth:`step`, :meth:`quantile`. The schedule keeps its state (``step_count`` and
    the current :math:`\lambda`) in :meth:`state_dict`, so a resumed run continues on
    the same pace.

    Examples:
        >>> s = PaceSchedule.linear(start=0.2, end=1.0, steps=4)
        >>> [round(s.value(t), 2) for t in range(6)]
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
        >>> PaceSchedule.step(values=[0.3, 0.6, 1.0], milestones=[10, 20]).value(15)
        0.6
    """

    kind: ScheduleKind
    params: dict[str, Any] = field(default_factory=dict)
    step_count: int = 0
    last_lam: float = float("nan")

    def __post_init__(self) -> None:
        if self.kind not in _SCHEDULES:
            raise ValueError(f"Expected schedule `kind` in {_SCHEDULES}, but got {self.kind!r}")
        required = _SCHEDULE_PARAMS[self.kind]
        missing = [key for key in required if key not in self.params]
        if missing:
            raise ValueError(
                f"A {self.kind!r} schedule needs params {list(required)}, but {missing} are missing; "
                f"build it with PaceSchedule.{self.kind}(...)"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def constant(cls, lam: float) -> PaceSchedule:
        r""":math:`\lambda_t = \lambda` (``inf`` allowed: every weight 1)."""
        return cls("constant", {"lam": _check_positive("lam", lam, allow_inf=True)})

    @classmethod
    def linear(cls, start: float, end: float, steps: int) -> PaceSchedule:
        r""":math:`\lambda_t` from ``start`` to ``end`` linearly over ``steps``, then ``end``."""
        return cls("linear", cls._ramp(start, end, steps))

    @classmethod
    def exponential(cls, start: float, end: float, steps: int) -> PaceSchedule:
        r""":math:`\lambda_t = \mathrm{start} \cdot (\mathrm{end}/\mathrm{start})^{t/\mathrm{steps}}`, then ``end``."""
        return cls("exponential", cls._ramp(start, end, steps))

    @classmethod
    def step(cls, values: Sequence[float], milestones: Sequence[int]) -> PaceSchedule:
        r""":math:`\lambda_t` = ``values[i]``, ``i`` = number of ``milestones`` <= t (like MultiStepLR)."""
        values = [_check_positive("values", v, allow_inf=True) for v in values]
        if any(isinstance(m, bool) or int(m) != m for m in milestones):
            raise ValueError(f"Expected integer `milestones`, but got {list(milestones)}")
        milestones = [int(m) for m in milestones]
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"Expected len(values) == len(milestones) + 1, but got {len(values)} values "
                f"and {len(milestones)} milestones"
            )
        if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)) or any(m < 0 for m in milestones):
            raise ValueError(f"Expected strictly increasing `milestones` >= 0, but got {milestones}")
        return cls("step", {"values": values, "milestones": milestones})

    @classmethod
    def quantile(cls, start: float, end: float, steps: int) -> PaceSchedule:
        r"""Admit a fraction :math:`q_t` of the current candidates, :math:`q_t` linear from ``start`` to ``end``.

        :math:`\lambda_t` is chosen from the hardness of the current candidates so that
        a fraction :math:`q_t` of them is strictly easier than :math:`\lambda_t`
        (the ``hard`` regulariser then admits exactly that fraction, up to ties).
        """
        for name, value in (("start", start), ("end", end)):
            if not (0.0 < float(value) <= 1.0):
                raise ValueError(f"Expected `{name}` in (0, 1] (a fraction), but got {value}")
        return cls("quantile", cls._ramp(start, end, steps))

    @staticmethod
    def _ramp(start: float, end: float, steps: int) -> dict[str, Any]:
        start = _check_positive("start", start)
        end = _check_positive("end", end)
        if int(steps) != steps or steps < 1:
            raise ValueError(f"Expected `steps` a positive integer, but got {steps}")
        return {"start": start, "end": end, "steps": int(steps)}

    # ------------------------------------------------------------------ evaluation
    @property
    def needs_hardness(self) -> bool:
        """Whether :meth:`value` needs the current candidates' hardness (quantile schedules)."""
        return self.kind == "quantile"

    def _fraction(self, t: int) -> float:
        p = self.params
        progress = min(max(t, 0), p["steps"]) / p["steps"]
        if self.kind == "exponential":
            return float(p["start"] * (p["end"] / p["start"]) ** progress) if progress < 1 else float(p["end"])
        return float(p["start"] + (p["end"] - p["start"]) * progress) if progress < 1 else float(p["end"])

    def value(self, t: int | None = None, hardness: Tensor | None = None) -> float:
        r""":math:`\lambda_t` at step ``t`` (default: the current ``step_count``).

        Args:
            t: the step.
            hardness: for quantile schedules, the current candidates' hardness (any shape,
                only the candidates: filter with a mask first).
        """
        t = self.step_count if t is None else int(t)
        if self.kind == "constant":
            lam = float(self.params["lam"])
        elif self.kind == "step":
            index = sum(1 for m in self.params["milestones"] if m <= t)
            lam = float(self.params["values"][index])
        elif self.kind in ("linear", "exponential"):
            lam = self._fraction(t)
        else:
            if hardness is None:
                raise ValueError("A quantile schedule needs `hardness` (the current candidates) to choose lambda")
            lam = _quantile_pace(hardness, self._fraction(t))
        self.last_lam = lam
        return lam

    def advance(self, n: int = 1) -> None:
        """Move the schedule ``n`` steps forward."""
        self.step_count += int(n)

    def state_dict(self) -> dict[str, Any]:
        """State to resume from: ``{"kind": str, "step_count": int, "last_lam": float}`` (``weights_only``-safe).

        The hyperparameters (``params``) are not saved: rebuild the schedule, then load.
        """
        return {"kind": self.kind, "step_count": int(self.step_count), "last_lam": float(self.last_lam)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the schedule ``kind`` must match)."""
        kind = state.get("kind", self.kind)
        if kind != self.kind:
            raise ValueError(f"Cannot load the state of a {kind!r} schedule into a {self.kind!r} schedule")
        self.step_count = int(state["step_count"])
        self.last_lam = float(state["last_lam"])


def _quantile_rank(n: int, fraction: float) -> int | None:
    """Rank ``k`` (1-based) of the candidate whose hardness sets a quantile pace; ``None``: the pace is ``inf``."""
    if n == 0 or fraction >= 1.0:
        return None
    # the relative slack keeps e.g. 0.3 * 10 = 3.0000000000000004 from admitting 4 of 10
    return min(n, max(1, math.ceil(fraction * n * (1.0 - 1e-12))))


def _pace_above(kth: Tensor) -> float:
    """The smallest pace that admits the hardness ``kth`` (0-dim): one step up *in its dtype*.

    A float64 step would round back to ``kth`` in float32, so that ``h < lambda`` made in the
    hardness dtype would not admit it.
    """
    lam = float(torch.nextafter(kth, torch.tensor(math.inf, dtype=kth.dtype, device=kth.device)))
    return max(lam, math.ulp(0.0))


def _quantile_pace(hardness: Tensor, fraction: float) -> float:
    """Smallest lambda such that ``ceil(fraction * n)`` candidates are strictly easier.

    The k-th smallest hardness is moved up one step in the hardness dtype (:func:`_pace_above`).
    """
    flat = hardness.detach().reshape(-1)
    k = _quantile_rank(flat.numel(), fraction)
    if k is None:
        return float("inf")
    kth = torch.kthvalue(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, k).values
    return _pace_above(kth.to(flat.dtype))  # exact: the k-th value is one of the inputs


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
            keep = h < _ceil_to_dtype(self.lam, h.dtype)
            return torch.zeros_like(h).masked_fill_(~keep, float("-inf"))
        return torch.log(self_paced_weights(h, self.lam, w.regularizer, w.zeta, w.mixture_c))


class SelfPacedWeighting(nn.Module):
    r"""Self-paced weights from hardness at the schedule's current pace.

    Args:
        regularizer: ``"hard" | "linear" | "log" | "mixture"`` (module docstring).
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
        if regularizer not in _REGULARIZERS:
            raise ValueError(f"Expected `regularizer` in {_REGULARIZERS}, but got {regularizer!r}")
        if target not in _TARGETS:
            raise ValueError(f"Expected `target` in {_TARGETS}, but got {target!r}")
        hardness = hardness or ("similarity" if target == "negatives" else "loss")
        if hardness not in _HARDNESS:
            raise ValueError(f"Expected `hardness` in {_HARDNESS}, but got {hardness!r}")
        if schedule is not None and not isinstance(schedule, PaceSchedule):
            raise TypeError(f"Expected `schedule` to be a PaceSchedule, but got {type(schedule).__name__}")
        if not (0.0 < zeta < 1.0):
            raise ValueError(f"Expected `zeta` in (0, 1), but got {zeta}")
        self.regularizer: Regularizer = regularizer
        self.schedule = schedule if schedule is not None else PaceSchedule.constant(1.0)
        self.target: Target = target
        self.hardness: Hardness = hardness
        self.zeta = float(zeta)
        self.mixture_c = _check_positive("mixture_c", mixture_c)
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
        t = self.schedule.step_count if step is None else int(step)
        return _quantile_rank(int(count), self.schedule._fraction(t))

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
            lam = float("inf") if kth is None else _pace_above(kth.detach().reshape(()))
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
        """
        hardness = _check_hardness(hardness)
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
        lam = self.schedule.value(step, candidates if self.schedule.needs_hardness else None)
        return self_paced_weights(h, lam, self.regularizer, self.zeta, self.mixture_c)

    def step(self, n: int = 1) -> None:
        """Advance the pace by ``n`` steps."""
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
