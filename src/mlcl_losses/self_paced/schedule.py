r"""The pace schedule: how :math:`\lambda_t` grows with the step, and its state for resuming."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from mlcl_losses.self_paced._checks import check_positive, check_steps
from mlcl_losses.self_paced._exact_pace import quantile_pace

__all__ = ["PaceSchedule", "ScheduleKind"]

ScheduleKind = Literal["constant", "linear", "exponential", "step", "quantile"]
_SCHEDULES: tuple[str, ...] = ("constant", "linear", "exponential", "step", "quantile")
_SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": ("lam",),
    "linear": ("start", "end", "steps"),
    "exponential": ("start", "end", "steps"),
    "step": ("values", "milestones"),
    "quantile": ("start", "end", "steps"),
}


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
        return cls("constant", {"lam": check_positive("lam", lam, allow_inf=True)})

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
        values = [check_positive("values", v, allow_inf=True) for v in values]
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
        start = check_positive("start", start)
        end = check_positive("end", end)
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

        Raises:
            TypeError: ``t`` not an int (a bool or a float is refused).
            ValueError: ``t`` < 0, or a quantile schedule without ``hardness``.
        """
        t = self.step_count if t is None else check_steps("t", t)
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
            lam = quantile_pace(hardness, self._fraction(t))
        self.last_lam = lam
        return lam

    def advance(self, n: int = 1) -> None:
        """Move the schedule ``n`` steps forward.

        Raises:
            TypeError: ``n`` not an int (a bool or ``2.5`` is refused, not truncated).
            ValueError: ``n`` < 0 (the pace never moves backwards).
        """
        self.step_count += check_steps("n", n)

    def state_dict(self) -> dict[str, Any]:
        """State to resume from: ``{"kind": str, "step_count": int, "last_lam": float}`` (``weights_only``-safe).

        The hyperparameters (``params``) are not saved: rebuild the schedule, then load.
        """
        return {"kind": self.kind, "step_count": int(self.step_count), "last_lam": float(self.last_lam)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the schedule ``kind`` must match).

        Raises:
            TypeError: ``state`` not a mapping, or a value of the wrong type.
            ValueError: another schedule ``kind``, a missing ``step_count`` / ``last_lam``, or a
                negative ``step_count``.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"Expected `state` to be a dict from PaceSchedule.state_dict(), but got {type(state).__name__}"
            )
        missing = [key for key in ("step_count", "last_lam") if key not in state]
        if missing:
            raise ValueError(
                f"Expected `state` from PaceSchedule.state_dict() with keys 'kind', 'step_count' and 'last_lam', "
                f"but {missing} are missing (got keys {sorted(state)})"
            )
        kind = state.get("kind", self.kind)
        if kind != self.kind:
            raise ValueError(f"Cannot load the state of a {kind!r} schedule into a {self.kind!r} schedule")
        step_count = check_steps("state['step_count']", state["step_count"])
        try:
            last_lam = float(state["last_lam"])
        except (TypeError, ValueError) as err:
            raise TypeError(f"Expected `state['last_lam']` to be a float, but got {state['last_lam']!r}") from err
        self.step_count, self.last_lam = step_count, last_lam
