"""Every option on the fused path equals the dense reference; paces are selected exactly and frozen at forward."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcl_losses import Level, PaceSchedule, SelfPacedWeighting, ViewTags, comcl_levels
from mlcl_losses._select import GATHER, RadixSelect
from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.self_paced._exact_pace import quantile_pace


def random_tags(n: int, gen: torch.Generator) -> ViewTags:
    def ints(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=gen)

    return ViewTags(kind=ints(2), quality=ints(2), source=ints(max(1, n // 3)), label=ints(3))


def run(impl: str, z: torch.Tensor, bank: Any, make_kwargs: Any, **fixed: Any) -> tuple[torch.Tensor, dict, Any]:
    zz = z.detach().clone().requires_grad_()
    bk = None if bank is None else (bank[0].detach().clone().requires_grad_(), bank[1])
    out, stats = multilevel_info_nce(zz, bank=bk, impl=impl, **fixed, **make_kwargs())
    out.sum().backward()
    return out.detach(), stats, (zz.grad, None if bk is None else bk[0].grad)


@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([0, 1, 2, 5, 13, 27]),
    d=st.sampled_from([1, 3, 32, 256]),
    tau=st.sampled_from([0.05, 0.2, 1.0]),
    levels=st.sampled_from(["comcl", "instance", "supervised"]),
    denominator=st.sampled_from(["pos_neg", "all"]),
    debias=st.sampled_from([(0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.2, 1.0)]),
    anchor=st.sampled_from(["none", "tensor", "quantile"]),
    negative=st.sampled_from(["none", "tensor", "quantile-linear", "quantile-mixture", "linear"]),
    bank_kind=st.sampled_from(["none", "bank", "candidates"]),
    use_pair_mask=st.booleans(),
    reduction=st.sampled_from(["mean", "none"]),
    block=st.sampled_from([(2, 3), (5, 7), (256, 4096)]),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_reference_every_option(
    n: int,
    d: int,
    tau: float,
    levels: str,
    denominator: str,
    debias: tuple[float, float],
    anchor: str,
    negative: str,
    bank_kind: str,
    use_pair_mask: bool,
    reduction: str,
    block: tuple[int, int],
    seed: int,
) -> None:
    """Values and gradients (batch and bank), float64; continuous weightings, so paces need no freezing."""
    tau_plus, beta = debias if denominator == "pos_neg" else (0.0, 0.0)
    gen = torch.Generator().manual_seed(seed)
    tags = random_tags(n, gen)
    lv = {"comcl": comcl_levels(), "instance": [Level.instance()], "supervised": [Level.supervised()]}[levels]
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    bank, candidates, c_b, m = None, None, 0, 6
    if bank_kind != "none":
        bank = (torch.randn(m, d, generator=gen, dtype=torch.float64), random_tags(m, gen))
        c_b = m
        if bank_kind == "candidates":
            candidates = torch.randint(-1, m, (n, 3), generator=gen)
            c_b = 3
    pair_mask = None
    if use_pair_mask:
        pair_mask = (torch.rand(n, n, generator=gen) > 0.2, torch.rand(n, n + c_b, generator=gen) > 0.2)
    neg_tensor = torch.rand(n, n + c_b, generator=gen, dtype=torch.float64)
    anchor_tensor = torch.rand(n, generator=gen, dtype=torch.float64)

    def make_kwargs() -> dict[str, Any]:  # fresh weightings per call: a quantile pace's state is per call
        negative_weights: Any = {
            "none": None,
            "tensor": neg_tensor,
            "quantile-linear": SelfPacedWeighting("linear", PaceSchedule.quantile(0.5, 1.0, 4)),
            "quantile-mixture": SelfPacedWeighting("mixture", PaceSchedule.quantile(0.7, 1.0, 4)),
            "linear": SelfPacedWeighting("linear", PaceSchedule.linear(0.2, 1.0, 4)),
        }[negative]
        anchor_weights: Any = {
            "none": None,
            "tensor": anchor_tensor,
            "quantile": SelfPacedWeighting("hard", PaceSchedule.quantile(0.6, 1.0, 4), target="anchors"),
        }[anchor]
        return {"negative_weights": negative_weights, "anchor_weights": anchor_weights}

    fixed = {
        "tags": tags,
        "levels": lv,
        "temperature": tau,
        "denominator": denominator,
        "tau_plus": tau_plus,
        "beta": beta,
        "candidates": candidates,
        "pair_mask": pair_mask,
        "reduction": reduction,
        "block_rows": block[0],
        "block_cols": block[1],
    }
    ref, ref_stats, ref_grads = run("reference", z, bank, make_kwargs, **fixed)
    out, stats, grads = run("fused", z, bank, make_kwargs, **fixed)
    tol = {"rtol": 1e-7, "atol": 1e-9 / tau}  # logits are cos / tau: rounding grows as 1 / tau
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, **tol)
    for name, st_ref in ref_stats.items():
        assert stats[name].path == "fused-torch"
        assert torch.equal(stats[name].valid, st_ref.valid)
        torch.testing.assert_close(stats[name].loss, st_ref.loss, **tol)
        torch.testing.assert_close(stats[name].neg_sim, st_ref.neg_sim, **tol)


@pytest.mark.parametrize("tau", [0.05, 0.5], ids=["tau0.05", "tau0.5"])
@pytest.mark.parametrize("kwargs", [{}, {"tau_plus": 0.1, "beta": 0.5}, {"denominator": "all"}], ids=str)
def test_fused_equals_reference_float32(tau: float, kwargs: dict) -> None:
    """float32, CoMCL levels with a bank: tolerance scaled by 1 / tau."""
    gen = torch.Generator().manual_seed(3)
    tags = random_tags(90, gen)
    z = torch.randn(90, 64, generator=gen)
    bank = (torch.randn(40, 64, generator=gen), random_tags(40, gen))
    fixed = {"tags": tags, "levels": comcl_levels(), "temperature": tau, "block_rows": 16, "block_cols": 24, **kwargs}
    ref, _, (g_ref, b_ref) = run("reference", z, bank, dict, **fixed)
    out, _, (g, b) = run("fused", z, bank, dict, **fixed)
    tol = {"rtol": 1e-4, "atol": 2e-6 / tau}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)
    torch.testing.assert_close(b, b_ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("spread", [1.0, 1e-3], ids=["spread", "concentrated"])
def test_radix_select_is_kthvalue(dtype: torch.dtype, spread: float) -> None:
    """Exact k-th value of a tiled stream, with ties, zeros and a bin larger than a gather."""
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + spread * torch.rand(3 * GATHER, generator=gen, dtype=torch.float64)).to(dtype)
    x[::7] = 0.0
    x[1::11] = x[5]
    mask = torch.rand(x.shape, generator=gen) > 0.1
    for k in (1, 1000, int(mask.sum()) // 2, int(mask.sum())):
        sel = RadixSelect(k, dtype, x.device)
        while not sel.done:
            sel.begin()
            for part, keep in zip(x.split(4097), mask.split(4097), strict=True):
                sel.feed(part, keep)
            sel.end()
        assert sel.result is not None
        assert sel.result.dtype == dtype
        assert float(sel.result) == float(torch.kthvalue(x[mask], k).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_radix_select_hint_saves_a_pass_never_changes_the_result(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(50_000, generator=gen, dtype=torch.float64).to(dtype)
    want = torch.kthvalue(x, 20_000).values
    for hint, passes in ((float(want), 1), (float(want) * 1.0001, 1), (0.99, None), (None, None)):
        sel = RadixSelect(20_000, dtype, x.device, hint)
        while not sel.done:
            sel.begin()
            for part in x.split(999):
                sel.feed(part)
            sel.end()
        assert sel.result is not None
        assert float(sel.result) == float(want)
        assert passes is None or sel.passes == passes
        assert passes is not None or sel.passes >= 2


def test_radix_select_count_callback() -> None:
    """With a rank function, an empty stream gives no result (the pace is then inf)."""
    sel = RadixSelect(lambda count: None if count == 0 else count, torch.float32, torch.device("cpu"))
    sel.begin()
    sel.feed(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    sel.end()
    assert sel.done
    assert sel.result is None


def comcl_batch(sources: int, dim: int, seed: int) -> tuple[torch.Tensor, ViewTags]:
    kind, quality, source = [], [], []
    for s in range(sources):
        kind += [1, 1, 1, 0, 0]
        quality += [0, 0, 1, 0, 1]
        source += [2 * s, 2 * s, 2 * s, 2 * s + 1, 2 * s + 1]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(kind), dim, generator=gen), ViewTags(kind=kind, quality=quality, source=source)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_quantile_pace_is_the_dense_threshold(dtype: torch.dtype) -> None:
    """The fused pace is the reference's: k-th masked clamped hardness, nextafter-stepped in the dtype.

    The two paths round cosines differently (by an ulp or so), so the paces agree to a few ulps
    and the admitted negatives to the near-ties.
    """
    x, tags = comcl_batch(30, 16, 1)
    z = x.to(dtype)
    lams = {}
    for impl in ("reference", "fused"):
        spl = SelfPacedWeighting("hard", PaceSchedule.quantile(0.4, 1.0, 10))
        multilevel_info_nce(z, tags, comcl_levels()[:1], 0.1, negative_weights=spl, impl=impl, block_rows=7)
        lams[impl] = spl.schedule.last_lam
    eps = torch.finfo(dtype).eps
    assert 0 < lams["fused"] < 1
    assert abs(lams["fused"] - lams["reference"]) <= 4 * eps * lams["reference"], lams
    # the threshold of the definition, from the cosines the tiles compute
    zn = torch.nn.functional.normalize(z, dim=1)
    lesion, healthy = tags.kind == 1, tags.kind == 0
    cos = ((zn[lesion & (tags.quality == 0)] / 0.1) @ zn[healthy].T) * 0.1
    want = quantile_pace(cos.clamp(0, 1) + 0.0, 0.4)
    assert abs(lams["fused"] - want) <= 4 * eps * want


def test_stepping_the_pace_between_forward_and_backward_keeps_the_gradients() -> None:
    """The pace is frozen at forward: a step before backward does not change that forward's gradients."""
    x, tags = comcl_batch(12, 8, 2)
    grads = []
    for step_between in (False, True):
        spl = SelfPacedWeighting("hard", PaceSchedule.quantile(0.3, 1.0, 4))
        anchors = SelfPacedWeighting("linear", PaceSchedule.linear(0.5, 5.0, 4), target="anchors")
        z = x.clone().requires_grad_()
        loss, stats = multilevel_info_nce(
            z, tags, comcl_levels(), 0.2, negative_weights=spl, anchor_weights=anchors, impl="fused"
        )
        assert all(s.path == "fused-torch" for s in stats.values())
        if step_between:
            spl.step(3)
            anchors.step(3)
        loss.backward()
        grads.append(z.grad)
    assert not torch.equal(grads[0], torch.zeros_like(grads[0]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    # and the step does change the weights of the next forward (the check above could fail)
    z = x.clone().requires_grad_()
    loss, _ = multilevel_info_nce(z, tags, comcl_levels(), 0.2, negative_weights=spl, impl="fused")
    loss.backward()
    assert z.grad is not None
    assert not torch.allclose(z.grad, grads[0])


def test_empty_and_single_batches_run_fused() -> None:
    for n in (0, 1):
        z = torch.randn(n, 4, requires_grad=True)
        tags = ViewTags(kind=[1] * n, quality=[0] * n, source=list(range(n)))
        spl = SelfPacedWeighting("hard", PaceSchedule.quantile(0.5, 1.0, 4))
        loss, stats = multilevel_info_nce(z, tags, comcl_levels(), negative_weights=spl, impl="fused")
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert math.isfinite(float(loss.detach()))
        assert stats["lesion"].path == "fused-torch"
        assert spl.schedule.last_lam == float("inf")  # no candidate: everything admitted


def test_module_logs_its_path_once_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """The pipelines' configuration runs fused, and says so once (again only when the path changes)."""
    from mlcl_losses import MultiLevelContrastiveLoss

    x, tags = comcl_batch(6, 8, 4)
    spl = SelfPacedWeighting("hard", PaceSchedule.quantile(0.8, 1.0, 10))
    criterion = MultiLevelContrastiveLoss(comcl_levels(), temperature=0.1, weighting=spl)
    with caplog.at_level("INFO", logger="mlcl_losses.functional"):
        for _ in range(3):
            _, stats = criterion(x, tags)
    assert {s.path for s in stats.values()} == {"fused-torch"}
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert lines == ["MultiLevelContrastiveLoss runs the fused-torch path (impl='auto', backend='auto')"]
