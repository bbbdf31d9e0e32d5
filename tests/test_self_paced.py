"""Tests of self-paced weighting (issue 4): closed forms, schedules, state, the loss and PML hooks."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mlcl_losses import Level, MultiLevelContrastiveLoss, ViewTags, comcl_levels, level_masks, multilevel_info_nce
from mlcl_losses.functional import normalize_embeddings
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting, self_paced_weights

REGULARIZERS = ("hard", "linear", "log", "mixture")
INF = float("inf")

# hypothesis + the function-scoped `device` fixture (a constant): keep the profile's other suppressions.
fixture_ok = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.differing_executors]
)

hardness_lists = st.lists(st.floats(0.0, 2.0, allow_nan=False, width=32), min_size=1, max_size=64)
paces = st.floats(1e-3, 10.0, allow_nan=False, allow_infinity=False)
zetas = st.floats(0.01, 0.99)
mixture_cs = st.floats(0.1, 10.0)


def _weights(h: torch.Tensor, lam: float, reg: str, zeta: float = 0.1, c: float = 1.0) -> torch.Tensor:
    return self_paced_weights(h, lam, reg, zeta=zeta, mixture_c=c)


# --------------------------------------------------------------------------- closed-form properties
@fixture_ok
@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@given(values=hardness_lists, lam=paces, zeta=zetas, c=mixture_cs)
def test_weights_in_unit_interval_and_non_increasing_in_hardness(reg, dtype, values, lam, zeta, c, device):
    h = torch.tensor(sorted(values), dtype=dtype, device=device)
    w = _weights(h, lam, reg, zeta, c)
    assert w.shape == h.shape
    assert w.dtype == dtype
    assert w.device == h.device
    assert bool(((w >= 0) & (w <= 1)).all())
    assert bool((w[1:] <= w[:-1]).all()), (h, w)


@fixture_ok
@pytest.mark.parametrize("reg", REGULARIZERS)
@given(values=hardness_lists, lams=st.lists(paces, min_size=2, max_size=2), zeta=zetas, c=mixture_cs)
def test_weights_non_decreasing_in_pace(reg, values, lams, zeta, c, device):
    h = torch.tensor(values, device=device)
    small, large = sorted(lams)
    assert bool((_weights(h, small, reg, zeta, c) <= _weights(h, large, reg, zeta, c)).all())


@fixture_ok
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@given(values=st.lists(st.floats(-1.0, 3.0, allow_nan=False), min_size=1, max_size=64), lam=paces)
def test_hard_is_exactly_the_indicator(dtype, values, lam, device):
    h = torch.tensor(values, dtype=dtype, device=device)
    expected = (h.double() < lam).to(dtype)  # compared in float64: no rounding of lambda
    assert torch.equal(self_paced_weights(h, lam, "hard"), expected)


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_infinite_pace_gives_unit_weights(reg, device):
    h = torch.tensor([-INF, -1.0, 0.0, 0.5, 1.0, 7.0, 1e30, INF], device=device)
    assert torch.equal(self_paced_weights(h, INF, reg), torch.ones_like(h))
    finite = h[torch.isfinite(h) & (h.abs() < 100)]
    assert torch.equal(self_paced_weights(finite, 1e30, reg), torch.ones_like(finite))  # the limit lambda -> inf


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("hardness_kind", ["similarity", "loss"])
@pytest.mark.parametrize("lam", [1e-6, 0.3, 1.0, 1e6, INF])
def test_weights_never_nan_for_padded_entries(reg, hardness_kind, lam, device):
    h = torch.tensor([[-INF, -2.0, 0.0, 0.3, 1.0, 5.0, INF]], device=device)
    spl = SelfPacedWeighting(reg, PaceSchedule.constant(lam), hardness=hardness_kind)
    for w in (self_paced_weights(h, lam, reg), spl(h), spl(h, mask=torch.isfinite(h))):
        assert not bool(torch.isnan(w).any())
        assert bool(((w >= 0) & (w <= 1)).all())
    quantile = SelfPacedWeighting(reg, PaceSchedule.quantile(0.5, 0.5, 1), hardness=hardness_kind)
    assert not bool(torch.isnan(quantile(h)).any())


# --------------------------------------------------------------------------- brute force
GRID = torch.linspace(0.0, 1.0, 20_001, dtype=torch.float64)  # spacing 5e-5


def _objective(reg: str, h: torch.Tensor, v: torch.Tensor, lam: float, zeta: float, c: float) -> torch.Tensor:
    """``v h + f(v; lam)`` of the regularisers as the module documents them; ``h`` (H, 1), ``v`` (V,)."""
    if reg == "hard":
        f = -lam * v
    elif reg == "linear":
        f = lam * (v**2 / 2 - v)
    elif reg == "log":
        f = lam / (1 - zeta) * (zeta * v - zeta**v / math.log(zeta))
    else:
        gamma, lam_z = c * math.sqrt(lam), math.sqrt(lam)
        f = gamma**2 / (v + gamma / lam_z)
    return v * h + f


@pytest.mark.parametrize("reg", REGULARIZERS)
@given(
    values=st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=8),
    lam=st.floats(0.05, 5.0),
    zeta=zetas,
    c=mixture_cs,
)
def test_closed_form_minimises_the_regulariser_objective(reg, values, lam, zeta, c):
    if reg == "hard":
        values = [x for x in values if abs(x - lam) > 1e-9] or [lam / 2]  # the tie h == lambda has two minimisers
    h = torch.tensor(values, dtype=torch.float64)[:, None]  # (H, 1)
    grid_obj = _objective(reg, h, GRID, lam, zeta, c)  # (H, V)
    v_grid = GRID[grid_obj.argmin(dim=1)]
    v_star = _weights(h[:, 0], lam, reg, zeta, c)
    closed_obj = _objective(reg, h, v_star[:, None], lam, zeta, c)[:, 0]
    best = grid_obj.min(dim=1).values
    assert bool((closed_obj <= best + 1e-12 * (1 + best.abs())).all())  # no grid point does better
    assert_close(v_star, v_grid, rtol=0, atol=1e-4)


@given(values=st.lists(st.floats(0.0, 1.5, allow_nan=False), min_size=1, max_size=8), lam=st.floats(0.02, 0.98))
def test_log_matches_jiang_at_zeta_one_minus_lambda(values, lam):
    h = torch.tensor(values, dtype=torch.float64)
    zeta = 1.0 - lam
    jiang = torch.where(h < lam, torch.log(h + zeta) / math.log(zeta), torch.zeros_like(h))
    w = self_paced_weights(h, lam, "log", zeta=zeta)
    assert_close(w, jiang.clamp(0, 1), rtol=0, atol=1e-9)
    # and Jiang's own (unscaled) objective v h + zeta v - zeta^v / log zeta is minimised by it
    grid_obj = GRID * h[:, None] + zeta * GRID - zeta**GRID / math.log(zeta)
    assert_close(w, GRID[grid_obj.argmin(dim=1)], rtol=0, atol=1e-4)


def test_mixture_thresholds_scale_with_the_pace():
    lam, c = 0.64, 1.0
    low, high = c**2 * lam / (1 + c) ** 2, lam  # 1 below, 0 above
    h = torch.tensor([0.0, low * 0.999, low * 1.5, high * 0.999, high, high * 2], dtype=torch.float64)
    w = self_paced_weights(h, lam, "mixture", mixture_c=c)
    assert w[:2].tolist() == [1.0, 1.0]
    assert w[-2:].tolist() == [0.0, 0.0]
    assert 0 < float(w[2]) < 1
    assert 0 < float(w[3]) < 1


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["linear", "exponential"])
@given(start=st.floats(1e-3, 5.0), end=st.floats(1e-3, 5.0), steps=st.integers(1, 10_000))
def test_ramp_endpoints_exact(kind, start, end, steps):
    s = getattr(PaceSchedule, kind)(start=start, end=end, steps=steps)
    assert s.value(0) == start
    assert s.value(steps) == end
    assert s.value(steps + 7) == end
    with pytest.raises(ValueError, match="`t` to be an int >= 0"):  # no step before the first
        s.value(-3)
    lo, hi = min(start, end), max(start, end)
    assert lo * (1 - 1e-12) <= s.value(steps // 2) <= hi * (1 + 1e-12)


def test_exponential_is_geometric():
    s = PaceSchedule.exponential(start=0.1, end=1.0, steps=10)
    assert s.value(5) == pytest.approx(math.sqrt(0.1), rel=1e-12)


def test_step_and_constant_schedules():
    s = PaceSchedule.step(values=[0.2, 0.5, INF], milestones=[10, 20])
    assert [s.value(t) for t in (0, 9, 10, 19, 20, 10_000)] == [0.2, 0.2, 0.5, 0.5, INF, INF]
    c = PaceSchedule.constant(0.7)
    assert {c.value(t) for t in (0, 1, 10**6)} == {0.7}


def _admitted(spl: SelfPacedWeighting, h: torch.Tensor, step: int | None = None) -> int:
    return int(spl(h[None], step=step).sum())


@fixture_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@given(
    values=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=200, unique=True),
    start=st.floats(0.01, 1.0),
    end=st.floats(0.01, 1.0),
)
def test_quantile_admits_the_scheduled_fraction(dtype, values, start, end, device):
    h = torch.tensor(values, dtype=dtype, device=device)
    n = h.numel()
    spl = SelfPacedWeighting("hard", PaceSchedule.quantile(start=start, end=end, steps=10))
    for step, q in ((0, start), (10, end), (50, end)):
        assert _admitted(spl, h, step) == min(n, max(1, math.ceil(q * n - 1e-6))), (step, q)


@given(values=st.lists(st.integers(0, 4), min_size=1, max_size=100), q=st.floats(0.01, 1.0))
def test_quantile_with_ties_admits_the_whole_tie(values, q):
    h = torch.tensor(values, dtype=torch.float32) / 4
    n = h.numel()
    k = min(n, max(1, math.ceil(q * n - 1e-6)))
    kth = float(h.sort().values[k - 1])
    spl = SelfPacedWeighting("hard", PaceSchedule.quantile(start=q, end=q, steps=1))
    assert _admitted(spl, h) == int((h <= kth).sum())


def test_quantile_counts_only_masked_candidates():
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.9, 0.95]])
    mask = torch.tensor([[False, False, True, True, True, True]])
    spl = SelfPacedWeighting("hard", PaceSchedule.quantile(start=0.5, end=0.5, steps=1))
    w = spl(h, mask)
    assert w[mask].tolist() == [1.0, 1.0, 0.0, 0.0]  # half of the 4 candidates
    assert w[~mask].tolist() == [1.0, 1.0]  # weights outside the mask are still returned


def test_quantile_full_fraction_is_infinite_pace():
    spl = SelfPacedWeighting("linear", PaceSchedule.quantile(start=0.5, end=1.0, steps=4))
    h = torch.rand(3, 5)
    assert torch.equal(spl(h, step=4), torch.ones_like(h))
    assert spl.lam(4, h) == INF


# --------------------------------------------------------------------------- state
def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PaceSchedule.linear(start=0.1, end=1.0, steps=20),
        lambda: PaceSchedule.exponential(start=0.05, end=2.0, steps=20),
        lambda: PaceSchedule.step(values=[0.2, 0.6, 1.0], milestones=[4, 8]),
        lambda: PaceSchedule.quantile(start=0.2, end=0.9, steps=20),
    ],
    ids=["linear", "exponential", "step", "quantile"],
)
def test_schedule_state_dict_roundtrip_continues_the_pace(make):
    h = torch.rand(50, generator=torch.Generator().manual_seed(0))
    a = make()
    for _ in range(5):
        a.value(hardness=h)
        a.advance()
    b = make()
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert b.step_count == a.step_count == 5
    assert b.last_lam == a.last_lam
    for _ in range(10):
        assert a.value(hardness=h) == b.value(hardness=h)
        a.advance()
        b.advance()


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_module_state_dict_roundtrip_gives_identical_weights(reg, device):
    h = torch.rand(6, 9, generator=torch.Generator().manual_seed(1)).to(device)

    def make() -> SelfPacedWeighting:
        return SelfPacedWeighting(reg, PaceSchedule.linear(start=0.1, end=1.0, steps=10), zeta=0.3, mixture_c=2.0)

    a = make()
    a.step(4)
    b = make()
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert b.lam() == a.lam() == pytest.approx(0.46)
    for _ in range(8):
        assert torch.equal(a(h), b(h))
        a.step()
        b.step()


def test_loss_state_dict_carries_the_pace():
    spl = SelfPacedWeighting("linear", PaceSchedule.linear(start=0.1, end=1.0, steps=10))
    criterion = MultiLevelContrastiveLoss(weighting=spl)
    criterion.step(3)
    fresh = MultiLevelContrastiveLoss(
        weighting=SelfPacedWeighting("linear", PaceSchedule.linear(start=0.1, end=1.0, steps=10))
    )
    fresh.load_state_dict(_roundtrip(criterion.state_dict()))
    z, tags = _comcl_batch()
    assert_close(fresh(z, tags)[0], criterion(z, tags)[0], rtol=0, atol=0)


def test_loading_another_schedule_kind_raises():
    state = PaceSchedule.linear(start=0.1, end=1.0, steps=3).state_dict()
    with pytest.raises(ValueError, match="'linear' schedule into a 'step' schedule"):
        PaceSchedule.step(values=[0.5], milestones=[]).load_state_dict(state)


# --------------------------------------------------------------------------- the loss
def _comcl_batch(seed: int = 0, sources: int = 3) -> tuple[torch.Tensor, ViewTags]:
    """Per lesion source V1a, V1b, V2; per healthy source V3, V4."""
    kind, quality, source = [], [], []
    for s in range(sources):
        kind += [1, 1, 1]
        quality += [0, 0, 1]
        source += [s, s, s]
    for s in range(sources, 2 * sources):
        kind += [0, 0]
        quality += [0, 1]
        source += [s, s]
    z = torch.randn(len(kind), 16, generator=torch.Generator().manual_seed(seed))
    return z, ViewTags(kind=kind, quality=quality, source=source)


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_infinite_pace_loss_equals_unweighted(reg, impl, device):
    z, tags = _comcl_batch()
    z, tags = z.to(device), tags.to(device)
    levels = comcl_levels()
    plain, _ = multilevel_info_nce(z, tags, levels, impl=impl)
    spl = SelfPacedWeighting(reg, PaceSchedule.constant(INF))
    weighted, _ = multilevel_info_nce(z, tags, levels, negative_weights=spl, impl=impl)
    assert torch.equal(weighted, plain)
    anchors = SelfPacedWeighting(reg, PaceSchedule.constant(INF), target="anchors")
    plain_ref, _ = multilevel_info_nce(z, tags, levels, impl="reference")
    by_anchor, _ = multilevel_info_nce(z, tags, levels, anchor_weights=anchors, impl="reference")
    assert torch.equal(by_anchor, plain_ref)
    quantile = SelfPacedWeighting(reg, PaceSchedule.quantile(start=1.0, end=1.0, steps=1))
    assert torch.equal(multilevel_info_nce(z, tags, levels, negative_weights=quantile)[0], plain_ref)


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize(
    "schedule",
    [lambda: PaceSchedule.constant(0.3), lambda: PaceSchedule.quantile(start=0.5, end=0.5, steps=1)],
    ids=["constant", "quantile"],
)
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_loss_weighting_equals_weights_by_hand(reg, schedule, impl):
    z, tags = _comcl_batch(seed=2)
    levels = comcl_levels()
    spl = SelfPacedWeighting(reg, schedule(), zeta=0.2)
    loss, _ = MultiLevelContrastiveLoss(levels, temperature=0.2, weighting=spl, impl=impl)(z, tags)
    zn = normalize_embeddings(z)
    cos = zn @ zn.T  # (N, N): no bank
    by_hand = [spl(cos, masks.negatives) for masks in level_masks(tags, levels)]
    expected, _ = multilevel_info_nce(z, tags, levels, temperature=0.2, negative_weights=by_hand, impl="reference")
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected, multilevel_info_nce(z, tags, levels, temperature=0.2)[0])  # weights mattered


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_anchor_weighting_equals_weights_by_hand(reg):
    z, tags = _comcl_batch(seed=3)
    level = [Level.instance()]
    spl = SelfPacedWeighting(reg, PaceSchedule.constant(2.5), target="anchors")
    loss, _ = MultiLevelContrastiveLoss(level, temperature=0.5, weighting=spl)(z, tags)
    per_anchor, stats = multilevel_info_nce(z, tags, level, temperature=0.5, reduction="none", impl="reference")
    v = spl(per_anchor[0], stats["instance"].valid)  # (N,)
    expected, _ = multilevel_info_nce(z, tags, level, temperature=0.5, anchor_weights=v, impl="reference")
    assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_loss_step_advances_the_pace():
    spl = SelfPacedWeighting("hard", PaceSchedule.linear(start=0.1, end=1.0, steps=9))
    criterion = MultiLevelContrastiveLoss(weighting=spl)
    criterion.step()
    criterion.step(2)
    assert spl.schedule.step_count == 3  # shared by all levels, stepped once per call
    assert spl.lam() == pytest.approx(0.4)


# --------------------------------------------------------------------------- PML
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")


def _pml_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(12, 8, generator=g), torch.arange(6).repeat_interleave(2)


@pytest.mark.parametrize("name", ["NTXentLoss", "ContrastiveLoss"])
def test_self_paced_reducer_infinite_pace_is_the_mean(name):
    from mlcl_losses.pml import SelfPacedReducer

    emb, labels = _pml_batch()
    spl = SelfPacedWeighting("linear", PaceSchedule.constant(INF), target="anchors")
    ours = getattr(pml_losses, name)(reducer=SelfPacedReducer(spl))(emb, labels)
    mean = getattr(pml_losses, name)(reducer=pml_reducers.MeanReducer())(emb, labels)
    assert_close(ours, mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("name", ["NTXentLoss", "ContrastiveLoss"])
def test_self_paced_reducer_equals_weights_by_hand(reg, name):
    from mlcl_losses.pml import SelfPacedReducer

    emb, labels = _pml_batch()
    spl = SelfPacedWeighting(reg, PaceSchedule.constant(1.0), target="anchors")
    ours = getattr(pml_losses, name)(reducer=SelfPacedReducer(spl))(emb, labels)
    loss_dict = getattr(pml_losses, name)(reducer=pml_reducers.DoNothingReducer())(emb, labels)
    expected = sum((spl(info["losses"].detach()) * info["losses"]).mean() for info in loss_dict.values())
    assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_self_paced_reducer_pace_is_stepped_through_the_loss():
    from mlcl_losses.pml import SelfPacedReducer

    emb, labels = _pml_batch()
    loss_fn = pml_losses.NTXentLoss(
        reducer=SelfPacedReducer(SelfPacedWeighting("hard", PaceSchedule.step([1e-6, INF], [1]), target="anchors"))
    )
    assert float(loss_fn(emb, labels)) == 0.0  # nothing admitted yet
    loss_fn.reducer.weighting.step()  # PML deep-copies reducers: step the loss's own copy
    assert_close(loss_fn(emb, labels), pml_losses.NTXentLoss()(emb, labels), rtol=1e-6, atol=1e-7)


def test_self_paced_reducer_shares_the_callers_weighting():
    from mlcl_losses.pml import SelfPacedReducer

    spl = SelfPacedWeighting("hard", PaceSchedule.constant(1.0), target="anchors")
    loss_fn = pml_losses.NTXentLoss(reducer=SelfPacedReducer(spl))
    assert loss_fn.reducer.weighting is spl


def test_self_paced_reducer_needs_anchor_target():
    from mlcl_losses.pml import SelfPacedReducer

    with pytest.raises(ValueError, match="target='anchors'"):
        SelfPacedReducer(SelfPacedWeighting("hard"))


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("lam", [1e-300, 1e-46, 5e-324, 1e300], ids=["1e-300", "1e-46", "min-subnormal", "1e300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_pace_outside_the_dtype_range_is_exact(reg, lam, dtype):
    h = torch.tensor([0.0, 1e-30, 0.5, 1.0, INF]).to(dtype)
    w = self_paced_weights(h, lam, reg)
    expected = _weights(h.double(), lam, reg).to(dtype)  # float64 holds every pace here
    assert w.dtype == dtype
    assert not bool(torch.isnan(w).any())
    assert_close(w, expected, atol=0, rtol=0)
    assert w[0] == 1.0  # h = 0 is always admitted (the mixture regulariser too)
    assert w[-1] == 0.0
    assert bool((w[1:4] == 1.0).all()) if lam > 1 else bool((w[2:] == 0.0).all())


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_loss_with_a_pace_below_float32_is_finite(reg, impl):
    z, tags = _comcl_batch()
    z = z.clone().requires_grad_(True)
    loss = MultiLevelContrastiveLoss(weighting=SelfPacedWeighting(reg, PaceSchedule.constant(1e-46)), impl=impl)
    value, _ = loss(z, tags)
    value.backward()
    assert bool(torch.isfinite(value))
    assert bool(torch.isfinite(z.grad).all())
    h = (normalize_embeddings(z.detach()) @ normalize_embeddings(z.detach()).T).clamp(0, 1)
    assert bool((self_paced_weights(h, 1e-46, reg)[h > 0] == 0).all())  # only h = 0 would be admitted


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("lam", [0.0, -0.5, float("nan"), -INF])
def test_bad_pace_raises(lam):
    with pytest.raises(ValueError, match=r"Expected `lam` > 0"):
        self_paced_weights(torch.rand(3), lam)
    with pytest.raises(ValueError, match=r"Expected `lam` > 0"):
        PaceSchedule.constant(lam)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: self_paced_weights(torch.rand(3), 1.0, "soft"), r"Expected `regularizer` in .* got 'soft'"),
        (lambda: SelfPacedWeighting("soft"), r"Expected `regularizer` in .* got 'soft'"),
        (lambda: SelfPacedWeighting("hard", target="pairs"), r"Expected `target` in .* got 'pairs'"),
        (lambda: SelfPacedWeighting("hard", hardness="rank"), r"Expected `hardness` in .* got 'rank'"),
        (lambda: SelfPacedWeighting("log", zeta=1.0), r"Expected `zeta` in \(0, 1\)"),
        (lambda: self_paced_weights(torch.rand(3), 1.0, "log", zeta=0.0), r"Expected `zeta` in \(0, 1\)"),
        (lambda: SelfPacedWeighting("mixture", mixture_c=0.0), r"Expected `mixture_c` > 0"),
        (lambda: PaceSchedule("cosine"), r"Expected schedule `kind` in .* got 'cosine'"),
        (lambda: PaceSchedule("linear"), r"'linear' schedule needs params"),
        (lambda: PaceSchedule.linear(start=0.0, end=1.0, steps=5), r"Expected `start` > 0"),
        (lambda: PaceSchedule.exponential(start=0.1, end=INF, steps=5), r"Expected `end` > 0 and finite"),
        (lambda: PaceSchedule.linear(start=0.1, end=1.0, steps=0), r"Expected `steps` a positive integer"),
        (lambda: PaceSchedule.linear(start=0.1, end=1.0, steps=2.5), r"Expected `steps` a positive integer"),
        (lambda: PaceSchedule.quantile(start=0.1, end=1.5, steps=5), r"Expected `end` in \(0, 1\]"),
        (lambda: PaceSchedule.quantile(start=0.0, end=1.0, steps=5), r"Expected `start` in \(0, 1\]"),
    ],
    ids=[
        "fn-regularizer",
        "module-regularizer",
        "target",
        "hardness-kind",
        "zeta-module",
        "zeta-fn",
        "mixture-c",
        "schedule-kind",
        "schedule-params",
        "ramp-start",
        "ramp-end-inf",
        "steps-zero",
        "steps-fraction",
        "quantile-end",
        "quantile-start",
    ],
)
def test_bad_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("values", "milestones", "match"),
    [
        ([0.2, 0.5], [10, 20], r"len\(values\) == len\(milestones\) \+ 1"),
        ([0.2, 0.5, 1.0], [20, 10], r"strictly increasing `milestones` >= 0, but got \[20, 10\]"),
        ([0.2, 0.5, 1.0], [10, 10], r"strictly increasing `milestones`"),
        ([0.2, 0.5], [-1], r"strictly increasing `milestones` >= 0, but got \[-1\]"),
        ([0.2, 0.5], [1.5], r"Expected integer `milestones`, but got \[1.5\]"),
        ([0.2, 0.0], [3], r"Expected `values` > 0"),
    ],
    ids=["length", "decreasing", "repeated", "negative", "fraction", "zero-value"],
)
def test_bad_milestones_raise(values, milestones, match):
    with pytest.raises(ValueError, match=match):
        PaceSchedule.step(values=values, milestones=milestones)


def test_bad_hardness_raises():
    spl = SelfPacedWeighting("linear")
    nan = torch.tensor([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="Expected `hardness` without NaN"):
        spl(nan)
    with pytest.raises(ValueError, match="Expected `hardness` without NaN"):
        self_paced_weights(nan[0], 0.5)
    with pytest.raises(TypeError, match="Expected `hardness` to be a floating-point tensor, but got a torch.int64"):
        spl(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="Expected `hardness` to be a floating-point tensor, but got list"):
        self_paced_weights([0.1, 0.2], 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `hardness` with 2 dimension\(s\) for target='negatives'"):
        spl(torch.rand(5))
    with pytest.raises(ValueError, match=r"Expected `hardness` with 1 dimension\(s\) for target='anchors'"):
        SelfPacedWeighting("linear", target="anchors")(torch.rand(2, 5))


def test_bad_mask_raises():
    spl = SelfPacedWeighting("linear")
    h = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"Expected `mask` of shape \(3, 4\) \(as `hardness`\), but got \(3, 5\)"):
        spl(h, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="Expected `mask` to be a bool tensor, but got a torch.float32"):
        spl(h, torch.ones(3, 4))


def test_schedule_of_wrong_type_raises():
    with pytest.raises(TypeError, match="Expected `schedule` to be a PaceSchedule, but got str"):
        SelfPacedWeighting("hard", schedule="linear")  # type: ignore[arg-type]


def test_quantile_without_hardness_raises():
    with pytest.raises(ValueError, match="quantile schedule needs `hardness`"):
        PaceSchedule.quantile(start=0.2, end=0.8, steps=3).value(0)


def test_weights_shape_mismatch_in_the_loss_is_reported():
    z, tags = _comcl_batch()
    with pytest.raises(ValueError, match="Expected `negative_weights` of level 'lesion' to have shape"):
        multilevel_info_nce(z, tags, comcl_levels(), negative_weights=lambda h, m: h[:, :-1], impl="reference")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: self_paced_weights(torch.rand(3), 1.0, "log", zeta="x"),
            TypeError,
            r"`zeta` to be a real number.*'x'",
        ),
        (lambda: SelfPacedWeighting("log", zeta="x"), TypeError, r"`zeta` to be a real number.*str 'x'"),
        (lambda: self_paced_weights(torch.rand(3), "1"), TypeError, r"`lam` to be a real number.*str '1'"),
        (lambda: SelfPacedWeighting("mixture", mixture_c=None), TypeError, r"`mixture_c` to be a real number.*None"),
        (lambda: PaceSchedule.constant(1.0).load_state_dict({}), ValueError, r"'step_count', 'last_lam'.* missing"),
        (lambda: PaceSchedule.constant(1.0).load_state_dict([1]), TypeError, r"`state` to be .*state_dict.*list"),
        (
            lambda: PaceSchedule.constant(1.0).load_state_dict({"step_count": -2, "last_lam": 1.0}),
            ValueError,
            r"`state\['step_count'\]` to be an int >= 0, but got -2",
        ),
    ],
    ids=["zeta-fn", "zeta-module", "lam-str", "mixture-none", "state-empty", "state-list", "state-negative"],
)
def test_bad_types_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _paced_loss() -> MultiLevelContrastiveLoss:
    return MultiLevelContrastiveLoss(weighting=SelfPacedWeighting("linear", PaceSchedule.linear(0.2, 1.0, steps=10)))


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (-3, ValueError, r"`n` to be an int >= 0, but got -3"),
        (2.5, TypeError, r"`n` to be an int >= 0, but got float 2.5"),
        (True, TypeError, r"`n` to be an int >= 0, but got bool True"),
        ("1", TypeError, r"`n` to be an int >= 0, but got str"),
    ],
    ids=["negative", "fraction", "bool", "str"],
)
def test_step_counts_that_make_no_sense_are_refused(n, error, match):
    schedule = PaceSchedule.linear(0.2, 1.0, steps=10)
    weighting = SelfPacedWeighting("linear", schedule)
    criterion = MultiLevelContrastiveLoss(weighting=weighting)
    for call in (criterion.step, weighting.step, schedule.advance):
        with pytest.raises(error, match=match):
            call(n)
    with pytest.raises(error, match=match):
        MultiLevelContrastiveLoss().step(n)  # refused without a weighting too
    assert schedule.step_count == 0  # the pace did not move


def test_step_counts_accept_ints_zero_and_integer_tensors():
    schedule = PaceSchedule.linear(0.2, 1.0, steps=10)
    schedule.advance(0)
    schedule.advance(torch.tensor(2))
    schedule.advance(np.int64(1))
    assert schedule.step_count == 3
    assert schedule.value(0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"`t` to be an int >= 0, but got -1"):
        schedule.value(-1)
    with pytest.raises(TypeError, match=r"`t` to be an int >= 0, but got float 1.5"):
        schedule.value(1.5)
    with pytest.raises(ValueError, match=r"`step` to be an int >= 0, but got -1"):
        SelfPacedWeighting("linear", schedule)(torch.rand(2, 3), step=-1)
