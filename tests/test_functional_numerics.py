"""Exact numerics of the dense (reference) path of ``multilevel_info_nce``.

Regression cases from the field's bug reports, each with its right value computed
independently (the float64 naive loop of ``test_functional`` or a closed form), and
hypothesis properties: float32 agrees with float64 within a tolerance that scales with
``1/temperature`` down to ``temperature = 0.005``, with zero weights, masked entries at the
extremes (cos = 1 and -1), ``tau_plus`` and ``beta``; the loss is finite and >= 0.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.levels import Level, Select, comcl_levels
from mlcl_losses.loss import MultiLevelContrastiveLoss
from mlcl_losses.pml import MultiLevelInfoNCELoss
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting
from mlcl_losses.tags import ViewTags
from test_functional import IMPLS, close, grad_of, naive_multilevel_info_nce, with_device
from test_levels import random_levels, random_tags


def _unit(cos: float, axis: int, sign: float = 1.0) -> list[float]:
    """A unit vector at cosine ``cos`` to ``e0``, its remainder on ``axis`` (4-d)."""
    v = [cos, 0.0, 0.0, 0.0]
    v[axis] = sign * math.sqrt(1.0 - cos * cos)
    return v


def zero_weighted_hard_negative(cos_pos: float, cos_hard: float, cos_neg: float) -> tuple[torch.Tensor, ViewTags]:
    """Anchor ``e0``; its positive; one hard negative (weighted 0 below); three negatives at ``cos_neg``."""
    z = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            _unit(cos_pos, 1),
            _unit(cos_hard, 2),
            _unit(cos_neg, 3),
            _unit(cos_neg, 1, -1.0),
            _unit(cos_neg, 2, -1.0),
        ],
        dtype=torch.float64,
    )
    tags = ViewTags(kind=[1] * 6, quality=[0, 1, 1, 1, 1, 1], source=[0, 0, 1, 2, 3, 4])
    return z, tags


ANCHOR_E0 = Level(name="e0", anchors=Select(quality=0))
FAULT_1_CASES = [  # (cos positive, cos zero-weighted negative, cos admitted negatives, temperature)
    pytest.param(-0.5, 0.9, -0.5, 0.01, id="dropped-anchor"),
    pytest.param(-0.9, 0.95, -0.9, 0.02, id="wrong-value"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("cos_pos", "cos_hard", "cos_neg", "temperature"), FAULT_1_CASES)
def test_zero_weighted_negative_is_outside_the_shift(
    cos_pos: float, cos_hard: float, cos_neg: float, temperature: float, impl: str, device: torch.device
) -> None:
    """A zero-weighted negative far above the others neither drops the anchor nor moves its loss."""
    z64, tags = zero_weighted_hard_negative(cos_pos, cos_hard, cos_neg)
    weights = torch.ones(6, 6, dtype=torch.float64)
    weights[0, 2] = 0.0  # what self-paced weighting gives the hardest negative
    expected, _, _ = naive_multilevel_info_nce(
        z64.clone().requires_grad_(True), tags, [ANCHOR_E0], temperature, negative_weights=weights
    )
    close(expected, math.log(4.0))  # the positive and the three admitted negatives are equally similar
    z = z64.float().to(device).requires_grad_(True)
    loss, stats = multilevel_info_nce(
        z, tags.to(device), ANCHOR_E0, temperature, negative_weights=weights.float().to(device), impl=impl
    )
    assert int(stats["e0"].anchors) == 1
    close(loss, math.log(4.0), torch.float32)
    (grad,) = grad_of(loss, z)
    assert bool(grad[0].abs().sum() > 0), "the anchor must receive a gradient"


@pytest.mark.parametrize(("cos_pos", "cos_hard", "cos_neg", "temperature"), FAULT_1_CASES)
def test_zero_weighted_negative_gradient_matches_naive(
    cos_pos: float, cos_hard: float, cos_neg: float, temperature: float, device: torch.device
) -> None:
    """Gradients of the float32 dense path equal the float64 naive loop's (the case perturbed off the tie)."""
    z64, tags = zero_weighted_hard_negative(cos_pos, cos_hard, cos_neg)
    z64 = z64 + 0.01 * torch.randn(z64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z64 = z64.float().double()  # both sides see the same input
    weights = torch.ones(6, 6, dtype=torch.float64)
    weights[0, 2] = 0.0
    zn = z64.clone().requires_grad_(True)
    expected, _, _ = naive_multilevel_info_nce(zn, tags, [ANCHOR_E0], temperature, negative_weights=weights)
    z = z64.float().to(device).requires_grad_(True)
    loss, _ = multilevel_info_nce(
        z, tags.to(device), ANCHOR_E0, temperature, negative_weights=weights.float().to(device), impl="reference"
    )
    close(loss, expected, torch.float32)
    close(*grad_of(loss, z), grad_of(expected, zn)[0].to(device), dtype=torch.float32, scale=1.0 / temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_quantile_pace_zero_weight_keeps_the_anchor(impl: str, device: torch.device) -> None:
    """The route users take: a hard regulariser on a quantile pace weights the hardest negative 0."""
    z64, tags = zero_weighted_hard_negative(-0.5, 0.9, -0.5)
    weighting = SelfPacedWeighting("hard", PaceSchedule.quantile(start=0.75, end=1.0, steps=10))
    criterion = MultiLevelContrastiveLoss([ANCHOR_E0], temperature=0.01, weighting=weighting, impl=impl)
    loss, stats = criterion(z64.float().to(device), tags.to(device))
    assert int(stats["e0"].anchors) == 1
    close(loss, math.log(4.0), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_anchor_weights_with_zero_weighted_negative(impl: str, device: torch.device) -> None:
    """Anchor weights send ``impl='auto'`` to the dense path; the zero-weighted negative must not matter."""
    z64, tags = zero_weighted_hard_negative(-0.5, 0.9, -0.5)
    weights = torch.ones(6, 6)
    weights[0, 2] = 0.0
    anchor_weights = torch.full((6,), 0.5)
    loss, _ = multilevel_info_nce(
        z64.float().to(device),
        tags.to(device),
        ANCHOR_E0,
        0.01,
        negative_weights=weights.to(device),
        anchor_weights=anchor_weights.to(device),
        impl=impl,
    )
    close(loss, 0.5 * math.log(4.0), torch.float32)


@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
def test_masked_same_source_views_at_cos_one(denominator: str, device: torch.device) -> None:
    """Same-source views that are neither positive nor negative sit at cos 1 (tau = 0.002)."""
    # lesion level: V1a anchor, V1b positive, V2 (same source, low quality) is excluded; the
    # healthy negatives sit near the positive, the excluded V2 on top of the anchor.
    d = [1.0, 0.0, 0.0]
    z64 = torch.tensor(
        [d, _unit(0.6, 1)[:3], d, _unit(0.59, 2)[:3], _unit(0.58, 1, -1.0)[:3]], dtype=torch.float64
    ).float()
    tags = ViewTags(kind=[1, 1, 1, 0, 0], quality=[0, 0, 1, 0, 1], source=[0, 0, 0, 1, 2])
    levels = comcl_levels()[:1]
    expected, _, _ = naive_multilevel_info_nce(z64.double(), tags, levels, 0.002, denominator=denominator)
    loss, _ = multilevel_info_nce(
        z64.to(device), tags.to(device), levels, 0.002, denominator=denominator, impl="reference"
    )
    close(loss, expected, torch.float32, scale=1.0 / 0.002)


# --------------------------------------------------------------------------- debiased / HCL

DEBIASED_Z = [[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.001]]
DEBIASED_TAGS = {"kind": [1] * 5, "quality": [0] * 5, "source": [0, 0, 0, 1, 1]}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"tau_plus": 0.1}, id="debiased"),
        pytest.param({"beta": 0.5}, id="hcl"),
        pytest.param({"tau_plus": 0.1, "beta": 0.5}, id="both"),
        pytest.param({"tau_plus": 0.9}, id="floor"),
    ],
)
def test_debiased_and_hcl_in_float32_at_small_temperature(options: dict[str, float], device: torch.device) -> None:
    """The positive term and the floor ``|N| e^{-1/tau}`` underflow in float32 unless kept in log space."""
    tags = ViewTags(**DEBIASED_TAGS)
    zn = torch.tensor(DEBIASED_Z, dtype=torch.float64, requires_grad=True)
    expected, _, _ = naive_multilevel_info_nce(zn, tags, [Level.instance()], 0.01, **options)
    assert 30.0 < float(expected.detach()) < 50.0
    z = torch.tensor(DEBIASED_Z, device=device, requires_grad=True)
    loss, _ = multilevel_info_nce(z, tags.to(device), Level.instance(), 0.01, **options)
    assert loss.dtype == torch.float32
    close(loss, expected, torch.float32)
    (grad,) = grad_of(loss, z)
    assert bool(torch.isfinite(grad).all())
    close(grad, grad_of(expected, zn)[0].to(device), dtype=torch.float32, scale=100.0)


# --------------------------------------------------------------------------- empty batch


def test_pml_adapter_empty_batch(device: torch.device) -> None:
    """PML losses return 0 for an empty batch; so does the adapter (through the dense path)."""
    z = torch.zeros(0, 4, device=device, requires_grad=True)
    loss = MultiLevelInfoNCELoss()(z, torch.zeros(0, dtype=torch.long, device=device))
    assert float(loss.detach()) == 0.0
    loss.backward()


# --------------------------------------------------------------------------- properties

TEMPERATURES = [0.005, 0.01, 0.02, 0.07, 0.5]


@st.composite
def extreme_problems(draw: st.DrawFn) -> dict[str, Any]:
    """Random tags and levels; embeddings with exact duplicates (cos 1) and antipodes (cos -1);
    zero weights; a temperature down to 0.005; ``tau_plus`` / ``beta`` or a denominator."""
    tags = draw(random_tags(min_size=3, max_size=8, label=True))
    levels = draw(random_levels())
    n, d = len(tags), draw(st.integers(2, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    for _ in range(draw(st.integers(0, 3))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        z[i] = z[j] * draw(st.sampled_from([1.0, -1.0, 3.0]))
    z = z.float().double()  # representable in float32: both dtypes see one input
    kwargs: dict[str, Any] = {"temperature": draw(st.sampled_from(TEMPERATURES))}
    if draw(st.booleans()):
        w = torch.rand(n, n, generator=gen, dtype=torch.float64) * 2
        w[torch.rand(w.shape, generator=gen) < draw(st.sampled_from([0.3, 0.9]))] = 0.0
        kwargs["negative_weights"] = w.float().double()
    if draw(st.booleans()):
        kwargs["anchor_weights"] = (torch.rand(n, generator=gen, dtype=torch.float64) < 0.7).double()
    if draw(st.booleans()):
        kwargs["tau_plus"] = draw(st.sampled_from([0.0, 0.05, 0.3, 0.9]))
        kwargs["beta"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
    else:
        kwargs["denominator"] = draw(st.sampled_from(["pos_neg", "all"]))
    return {"embeddings": z, "tags": tags, "levels": levels, **kwargs}


def _loss_and_grad(problem: dict[str, Any], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    kwargs = {k: v.to(dtype=dtype, device=device) if isinstance(v, torch.Tensor) else v for k, v in problem.items()}
    kwargs["tags"] = problem["tags"].to(device)
    z = kwargs.pop("embeddings").requires_grad_(True)
    loss, _ = multilevel_info_nce(z, **kwargs, impl="reference")
    return (loss, *grad_of(loss, z))


@with_device
@given(problem=extreme_problems())
def test_float64_matches_naive_loop_at_small_temperature(problem: dict[str, Any], device: torch.device) -> None:
    """float64 dense path == the float64 naive loop, values and gradients, down to tau = 0.005."""
    zn = problem["embeddings"].clone().requires_grad_(True)
    naive_kwargs = {k: v for k, v in problem.items() if k != "embeddings"}
    expected, _, _ = naive_multilevel_info_nce(zn, **naive_kwargs)
    loss, grad = _loss_and_grad(problem, torch.float64, device)
    scale = 1.0 / problem["temperature"]
    close(loss, expected, scale=scale)
    close(grad.cpu(), grad_of(expected, zn)[0], scale=scale)


@with_device
@given(problem=extreme_problems())
def test_float32_matches_float64_within_tolerance_scaled_by_temperature(
    problem: dict[str, Any], device: torch.device
) -> None:
    """float32 == float64 within ``O(eps / tau)``; the loss is finite and >= 0 (every form is log(1 + ...))."""
    loss32, grad32 = _loss_and_grad(problem, torch.float32, device)
    loss64, grad64 = _loss_and_grad(problem, torch.float64, device)
    assert bool(torch.isfinite(loss32))
    assert float(loss32) >= 0.0
    assert bool(torch.isfinite(grad32).all())
    assert float(loss64) >= 0.0
    # measured worst case over 600 draws: |error| <= 7e-8 (1 + |loss|) / tau, gradients 5e-7 / tau
    tol = 1e-6 / problem["temperature"]
    torch.testing.assert_close(loss32.double(), loss64, rtol=tol, atol=tol)
    torch.testing.assert_close(grad32.double(), grad64, rtol=5 * tol, atol=5 * tol)
