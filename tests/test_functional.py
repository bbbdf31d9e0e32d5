"""Tests of mlcl_losses.functional.multilevel_info_nce.

Checked three ways (STYLE.md item 8): against a naive per-anchor loop written from the
equation of the module docstring, against the peer implementations it reduces to
(PML NTXentLoss and SupConLoss, MoCo's InfoNCE logits, the debiased / HCL reference code),
and against closed forms; plus hypothesis properties and validators.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.losses import NTXentLoss, SupConLoss

from mlcl_losses.functional import LevelStats, multilevel_info_nce, normalize_embeddings
from mlcl_losses.levels import Level, Select, comcl_levels
from mlcl_losses.tags import Kind, Quality, ViewTags
from test_levels import naive_is_negative, random_levels, random_tags, select_ok

LESION, HEALTHY = int(Kind.LESION), int(Kind.HEALTHY)
HIGH, LOW = int(Quality.HIGH), int(Quality.LOW)

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
# The `device` fixture is stateless, so sharing it between generated inputs is fine.
with_device = settings(
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)
IMPLS = [pytest.param("reference", id="reference"), pytest.param("auto", id="auto")]


def close(
    actual: torch.Tensor, expected: torch.Tensor | float, dtype: torch.dtype = torch.float64, scale: float = 1.0
) -> None:
    """assert_close with the tolerance of ``dtype``; a float ``expected`` is exact (float64)."""
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64, device=actual.device)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def grad_of(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True))


# --------------------------------------------------------------------------- naive loop


def naive_multilevel_info_nce(
    embeddings: torch.Tensor,
    tags: ViewTags,
    levels: list[Level],
    temperature: float,
    denominator: str = "pos_neg",
    bank: tuple[torch.Tensor, ViewTags] | None = None,
    candidates: Any = None,
    negative_weights: Any = None,
    anchor_weights: torch.Tensor | None = None,
    tau_plus: float = 0.0,
    beta: float = 0.0,
    pair_mask: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, dict[str, dict[str, Any]], torch.Tensor]:
    """The module docstring's equation, one anchor at a time, in float64.

    Returns the total loss, per-level statistics and the ``(L, N)`` weighted per-anchor losses.
    """
    z = embeddings.to(torch.float64)
    u = [row / row.norm() for row in z]  # unit rows
    bank_u: list[torch.Tensor] = []
    bank_tags = None
    if bank is not None:
        bank_u = [row / row.norm() for row in bank[0].to(torch.float64)]
        bank_tags = bank[1]
    n = len(tags)
    total = z.sum() * 0.0
    stats: dict[str, dict[str, Any]] = {}
    unreduced = []
    for li, level in enumerate(levels):
        cand = candidates[li] if isinstance(candidates, list) else candidates
        w = negative_weights[li] if isinstance(negative_weights, list) else negative_weights
        key = tags.source if level.relation == "source" else tags.label
        assert key is not None
        losses: dict[int, torch.Tensor] = {}
        pos_cos: list[torch.Tensor] = []
        neg_cos: list[torch.Tensor] = []
        n_anchors = 0
        for i in range(n):
            if not select_ok(level.anchors, tags, i):
                continue
            n_anchors += 1
            positives = [
                j
                for j in range(n)
                if j != i
                and int(key[j]) == int(key[i])
                and select_ok(level.positives, tags, j)
                and (pair_mask is None or pair_mask[0] is None or bool(pair_mask[0][i, j]))
            ]
            negatives: list[tuple[int, torch.Tensor]] = []  # (column, unit vector)
            if level.in_batch_negatives:
                negatives += [(j, u[j]) for j in range(n) if j != i and naive_is_negative(tags, i, tags, j, level)]
            if bank_tags is not None and level.bank_negatives:
                for c in range(len(bank_u) if cand is None else cand.shape[1]):
                    entry = c if cand is None else int(cand[i, c])
                    if entry >= 0 and naive_is_negative(tags, i, bank_tags, entry, level):
                        negatives.append((n + c, bank_u[entry]))
            if pair_mask is not None and pair_mask[1] is not None:
                negatives = [(c, v) for c, v in negatives if bool(pair_mask[1][i, c])]
            if not positives or not negatives:
                continue
            s_pos = [torch.dot(u[i], u[p]) / temperature for p in positives]
            s_neg = [torch.dot(u[i], v) / temperature for _, v in negatives]
            w_neg = [1.0 if w is None else float(w[i, c]) for c, _ in negatives]
            neg_sum = sum(wn * torch.exp(s) for wn, s in zip(w_neg, s_neg, strict=True))
            terms = []
            for sp in s_pos:
                if denominator == "all":
                    denom = sum(torch.exp(s) for s in s_pos) + neg_sum
                elif tau_plus > 0 or beta > 0:
                    count = len(negatives)
                    imp = [torch.exp(beta * s) for s in s_neg]
                    reweighted = count * sum(m * wn * torch.exp(s) for m, wn, s in zip(imp, w_neg, s_neg, strict=True))
                    reweighted = reweighted / sum(imp)
                    ng = (-tau_plus * count * torch.exp(sp) + reweighted) / (1.0 - tau_plus)
                    ng = torch.clamp(ng, min=count * math.exp(-1.0 / temperature))
                    denom = torch.exp(sp) + ng
                else:
                    denom = torch.exp(sp) + neg_sum
                terms.append(-torch.log(torch.exp(sp) / denom))
            losses[i] = sum(terms) / len(terms)
            pos_cos += [torch.dot(u[i], u[p]).detach() for p in positives]
            neg_cos += [torch.dot(u[i], v).detach() for _, v in negatives]
        v = {i: 1.0 if anchor_weights is None else float(anchor_weights[i]) for i in losses}
        level_loss = sum(v[i] * li_loss for i, li_loss in losses.items()) / max(len(losses), 1)
        row = [level.weight * v[i] * losses[i] if i in losses else z.sum() * 0.0 for i in range(n)]
        total = total + level.weight * level_loss
        unreduced.append(torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in row]))
        zero = torch.zeros((), dtype=torch.float64)
        stats[level.name] = {
            "loss": torch.as_tensor(level_loss, dtype=torch.float64).detach(),
            "anchors": len(losses),
            "skipped": n_anchors - len(losses),
            "pos_sim": torch.stack(pos_cos).mean() if pos_cos else zero,
            "neg_sim": torch.stack(neg_cos).mean() if neg_cos else zero,
            "valid": sorted(losses),
        }
    return total, stats, torch.stack(unreduced)


def assert_stats(actual: dict[str, LevelStats], expected: dict[str, dict[str, Any]], dtype: torch.dtype) -> None:
    assert list(actual) == list(expected)
    for name, exp in expected.items():
        got = actual[name]
        assert int(got.anchors) == exp["anchors"], name
        assert int(got.skipped) == exp["skipped"], name
        assert got.valid.nonzero()[:, 0].tolist() == exp["valid"], name
        close(got.loss, exp["loss"], dtype)
        close(got.pos_sim, exp["pos_sim"], dtype)
        close(got.neg_sim, exp["neg_sim"], dtype)


# --------------------------------------------------------------------------- random problems


@st.composite
def problems(draw: st.DrawFn, bank_mode: str = "none", weights: bool = True) -> dict[str, Any]:
    """Random tags, levels, embeddings, bank/candidates, weights and pair masks (float64, CPU)."""
    tags = draw(random_tags(min_size=4, max_size=9, label=True))
    levels = draw(random_levels())
    n, d = len(tags), draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    z = randn((n, d), seed, torch.float64, torch.device("cpu"))
    dup = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2))
    if draw(st.booleans()):  # ties: one embedding repeated
        z[dup[0]] = z[dup[1]]
    kwargs: dict[str, Any] = {"temperature": draw(st.sampled_from([0.07, 0.1, 0.5, 1.0]))}
    c_b = [0] * len(levels)
    if bank_mode != "none":
        bank_tags = draw(random_tags(min_size=1, max_size=6, label=True, image=tags.image is not None, source_offset=3))
        m = len(bank_tags)
        bank_z = randn((m, d), seed + 1, torch.float64, torch.device("cpu"))
        kwargs["bank"] = (bank_z, bank_tags)
        c_b = [m] * len(levels)
        if bank_mode == "candidates":
            k = draw(st.integers(1, 4))
            gen = torch.Generator().manual_seed(seed + 2)
            cands: list[torch.Tensor | None] = []
            for li in range(len(levels)):
                if li > 0 and draw(st.booleans()):
                    cands.append(None)  # whole bank for this level
                    continue
                cands.append(torch.randint(-1, m, (n, k), generator=gen))
                c_b[li] = k
            kwargs["candidates"] = cands
    if weights and draw(st.booleans()):
        gen = torch.Generator().manual_seed(seed + 3)
        per_level = []
        for li in range(len(levels)):
            w = torch.rand(n, n + c_b[li], generator=gen, dtype=torch.float64) * 2
            w[torch.rand(w.shape, generator=gen) < 0.2] = 0.0
            per_level.append(w)
        kwargs["negative_weights"] = per_level
    if weights and draw(st.booleans()):
        gen = torch.Generator().manual_seed(seed + 4)
        kwargs["anchor_weights"] = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    if draw(st.booleans()) and len(set(c_b)) == 1:
        gen = torch.Generator().manual_seed(seed + 5)
        pos = torch.rand(n, n, generator=gen) < 0.8 if draw(st.booleans()) else None
        neg = torch.rand(n, n + c_b[0], generator=gen) < 0.8 if draw(st.booleans()) else None
        kwargs["pair_mask"] = (pos, neg)
    return {"embeddings": z, "tags": tags, "levels": levels, **kwargs}


def to_device(problem: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(problem)
    out["tags"] = problem["tags"].to(device)
    out["embeddings"] = problem["embeddings"].to(device)
    if "bank" in problem:
        out["bank"] = (problem["bank"][0].to(device), problem["bank"][1].to(device))
    for key in ("candidates", "negative_weights"):
        if key in problem:
            out[key] = [None if t is None else t.to(device) for t in problem[key]]
    if "anchor_weights" in problem:
        out["anchor_weights"] = problem["anchor_weights"].to(device)
    if "pair_mask" in problem:
        out["pair_mask"] = tuple(None if t is None else t.to(device) for t in problem["pair_mask"])
    return out


def check_against_naive(problem: dict[str, Any], device: torch.device, **options: Any) -> None:
    z = problem["embeddings"].clone().requires_grad_(True)
    bank_z = problem["bank"][0].clone().requires_grad_(True) if "bank" in problem else None
    naive_kwargs = {k: v for k, v in problem.items() if k not in ("embeddings", "bank")}
    if bank_z is not None:
        naive_kwargs["bank"] = (bank_z, problem["bank"][1])
    impl = options.pop("impl", "reference")
    expected, expected_stats, expected_none = naive_multilevel_info_nce(z, **naive_kwargs, **options)

    dev = to_device(problem, device)
    zd = dev["embeddings"].clone().requires_grad_(True)
    dev["embeddings"] = zd
    if bank_z is not None:
        bank_zd = dev["bank"][0].clone().requires_grad_(True)
        dev["bank"] = (bank_zd, dev["bank"][1])
    loss, stats = multilevel_info_nce(**dev, **options, impl=impl)
    assert loss.dtype == torch.float64
    assert loss.shape == ()
    close(loss, expected)
    assert_stats(stats, expected_stats, torch.float64)

    inputs = (z,) if bank_z is None else (z, bank_z)
    inputs_d = (zd,) if bank_z is None else (zd, dev["bank"][0])
    for got, exp in zip(grad_of(loss, *inputs_d), grad_of(expected, *inputs), strict=True):
        close(got.cpu(), exp)

    unreduced, _ = multilevel_info_nce(**dev, **options, reduction="none", impl="reference")
    assert unreduced.shape == (len(problem["levels"]), len(problem["tags"]))
    close(unreduced.detach().cpu(), expected_none.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bank_mode", ["none", "bank", "candidates"])
@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
@with_device
@given(data=st.data())
def test_matches_naive_loop(
    data: st.DataObject, denominator: str, bank_mode: str, impl: str, device: torch.device
) -> None:
    problem = data.draw(problems(bank_mode=bank_mode))
    check_against_naive(problem, device, denominator=denominator, impl=impl)


@pytest.mark.parametrize("bank_mode", ["none", "bank", "candidates"])
@with_device
@given(data=st.data())
def test_debiased_and_hcl_match_naive_loop(data: st.DataObject, bank_mode: str, device: torch.device) -> None:
    problem = data.draw(problems(bank_mode=bank_mode))
    tau_plus = data.draw(st.sampled_from([0.0, 0.05, 0.3]))
    beta = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
    check_against_naive(problem, device, tau_plus=tau_plus, beta=beta)


def test_callable_weights_equal_tensor_weights(device: torch.device) -> None:
    tags = ViewTags(
        kind=[1, 1, 1, 0, 0, 1, 1, 1, 0, 0], quality=[0, 0, 1, 0, 1] * 2, source=[0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    )
    tags = tags.to(device)
    z = randn((10, 6), 0, torch.float64, device).requires_grad_(True)
    bank = (randn((4, 6), 1, torch.float64, device), ViewTags([0, 0, 1, 1], [0, 1, 0, 1], [7, 8, 9, 10]).to(device))
    levels = comcl_levels()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def weight_fn(hardness: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert not hardness.requires_grad
        seen.append((hardness, mask))
        return (1.0 - hardness).clamp(0.0, 1.0)

    loss_fn, stats_fn = multilevel_info_nce(z, tags, levels, bank=bank, negative_weights=weight_fn, impl="reference")
    assert len(seen) == len(levels)
    zn = F.normalize(z.detach(), dim=1)
    cos = torch.cat([zn @ zn.T, zn @ F.normalize(bank[0], dim=1).T], dim=1)
    for hardness, _ in seen:
        close(hardness, cos)
    by_hand = [(1.0 - cos).clamp(0.0, 1.0)] * len(levels)
    loss_t, _ = multilevel_info_nce(z, tags, levels, bank=bank, negative_weights=by_hand, impl="reference")
    close(loss_fn, loss_t)
    close(*(g for g in (grad_of(loss_fn, z)[0], grad_of(loss_t, z)[0])))
    naive, _, _ = naive_multilevel_info_nce(z, tags.to("cpu"), levels, 0.1, bank=bank, negative_weights=by_hand)
    close(loss_t, naive)


def test_callable_anchor_weights_equal_tensor(device: torch.device) -> None:
    tags = ViewTags(kind=[1, 1, 1, 1, 1, 1], quality=[0] * 6, source=[0, 0, 1, 1, 2, 2]).to(device)
    z = randn((6, 4), 3, torch.float64, device).requires_grad_(True)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def anchor_fn(losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        assert not losses.requires_grad
        calls.append((losses, valid))
        return (losses < losses[valid].median()).to(losses.dtype)

    loss, stats = multilevel_info_nce(z, tags, Level.instance(), anchor_weights=anchor_fn)
    per_anchor, _ = multilevel_info_nce(z, tags, Level.instance(), reduction="none")
    ((losses, valid),) = calls
    close(losses, per_anchor[0].detach())
    assert valid.tolist() == [True] * 6
    v = (losses < losses.median()).double()
    close(loss, (v * per_anchor[0]).sum() / 6)
    close(stats["instance"].loss, loss.detach())


def test_weights_get_no_gradient(device: torch.device) -> None:
    tags = ViewTags(kind=[1] * 6, quality=[0] * 6, source=[0, 0, 1, 1, 2, 2]).to(device)
    z = randn((6, 4), 5, torch.float64, device).requires_grad_(True)
    w = torch.rand(6, 6, dtype=torch.float64, device=device).requires_grad_(True)
    v = torch.rand(6, dtype=torch.float64, device=device).requires_grad_(True)
    loss, _ = multilevel_info_nce(z, tags, Level.instance(), negative_weights=w, anchor_weights=v, impl="reference")
    loss.backward()
    assert z.grad is not None
    assert w.grad is None
    assert v.grad is None


# --------------------------------------------------------------------------- exact reductions: PML, MoCo


def two_views(
    batch: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ViewTags]:
    z = randn((2 * batch, dim), seed, dtype, device).requires_grad_(True)
    source = torch.arange(batch, device=device).repeat(2)
    tags = ViewTags(kind=torch.ones_like(source), quality=torch.zeros_like(source), source=source)
    return z, tags


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.07, 0.5], ids=["t0.07", "t0.5"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_level_is_pml_ntxent(dtype: torch.dtype, temperature: float, impl: str, device: torch.device) -> None:
    z, tags = two_views(8, 16, 11, dtype, device)
    loss, stats = multilevel_info_nce(z, tags, [Level.instance()], temperature=temperature, impl=impl)
    expected = NTXentLoss(temperature=temperature)(z, tags.source)
    close(loss, expected, dtype)
    close(*grad_of(loss, z), *grad_of(expected, z), dtype=dtype)
    assert int(stats["instance"].anchors) == 16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.1, 0.5], ids=["t0.1", "t0.5"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_supervised_level_is_pml_supcon(
    dtype: torch.dtype, temperature: float, impl: str, device: torch.device
) -> None:
    z, tags = two_views(10, 16, 12, dtype, device)
    label = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 3], device=device).repeat(2)
    tags = ViewTags(kind=tags.kind, quality=tags.quality, source=tags.source, label=label)
    loss, _ = multilevel_info_nce(z, tags, [Level.supervised()], temperature, denominator="all", impl=impl)
    expected = SupConLoss(temperature=temperature)(z, label)
    close(loss, expected, dtype)
    close(*grad_of(loss, z), *grad_of(expected, z), dtype=dtype)


def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v1/v2 (He et al. 2020, facebookresearch/moco builder.py): logits [q.k+, q.queue] / T, CE target 0."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, F.normalize(queue, dim=1).T.detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


MOCO_LEVELS = [
    pytest.param(
        Level("moco", anchors=Select(quality=HIGH), positives=Select(quality=LOW), negatives=Select(kind=HEALTHY)),
        id="negatives-by-kind",
    ),
    pytest.param(
        Level("moco", anchors=Select(quality=HIGH), positives=Select(quality=LOW), in_batch_negatives=False),
        id="in-batch-off",
    ),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", MOCO_LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bank_negatives_are_moco_info_nce(dtype: torch.dtype, level: Level, impl: str, device: torch.device) -> None:
    batch, dim, queue_size, temperature = 6, 8, 20, 0.2
    q = randn((batch, dim), 21, dtype, device).requires_grad_(True)
    k = randn((batch, dim), 22, dtype, device)
    queue = randn((queue_size, dim), 23, dtype, device)
    source = torch.arange(batch, device=device)
    tags = ViewTags(
        kind=torch.ones(2 * batch, dtype=torch.long, device=device),
        quality=torch.cat([torch.zeros_like(source), torch.ones_like(source)]),
        source=source.repeat(2),
    )
    queue_kind = torch.zeros(queue_size, dtype=torch.long, device=device)
    if level.in_batch_negatives is False:
        queue_kind[::2] = 1  # any kind: only the bank supplies negatives
    queue_tags = ViewTags(
        kind=queue_kind,
        quality=torch.arange(queue_size, device=device) % 2,
        source=batch + torch.arange(queue_size, device=device),
    )
    z = torch.cat([q, k.detach()])
    loss, stats = multilevel_info_nce(z, tags, [level], temperature, bank=(queue, queue_tags), impl=impl)
    expected = moco_info_nce(q, k, queue, temperature)
    close(loss, expected, dtype)
    close(*grad_of(loss, q), *grad_of(expected, q), dtype=dtype)
    assert int(stats["moco"].anchors) == batch


# --------------------------------------------------------------------------- debiased / HCL reference code


def debiased_hcl_reference(
    out_1: torch.Tensor, out_2: torch.Tensor, temperature: float, tau_plus: float, beta: float
) -> torch.Tensor:
    """Chuang et al. 2020 / Robinson et al. 2021 reference code for NT-Xent (two views per image)."""
    batch = out_1.shape[0]
    out_1, out_2 = F.normalize(out_1, dim=1), F.normalize(out_2, dim=1)
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(out @ out.T / temperature)
    mask = torch.ones(2 * batch, 2 * batch, dtype=torch.bool, device=out.device)
    for i in range(batch):
        mask[i, i] = mask[i, i + batch] = mask[i + batch, i] = mask[i + batch, i + batch] = False
    neg = neg.masked_select(mask).view(2 * batch, -1)  # (2B, 2B - 2)
    pos = torch.exp((out_1 * out_2).sum(dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    n_neg = batch * 2 - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng = (-tau_plus * n_neg * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize(
    ("tau_plus", "beta"),
    [
        pytest.param(0.0, 0.0, id="plain"),
        pytest.param(0.1, 0.0, id="debiased"),
        pytest.param(0.0, 1.0, id="hcl-no-debias"),
        pytest.param(0.1, 1.0, id="hcl"),
        pytest.param(0.5, 0.5, id="strong"),
    ],
)
@pytest.mark.parametrize("temperature", [0.5, 1.0], ids=["t0.5", "t1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_debiased_hcl_match_reference_code(
    dtype: torch.dtype, temperature: float, tau_plus: float, beta: float, device: torch.device
) -> None:
    z, tags = two_views(8, 6, 31, dtype, device)
    loss, _ = multilevel_info_nce(z, tags, Level.instance(), temperature, tau_plus=tau_plus, beta=beta)
    expected = debiased_hcl_reference(z[:8], z[8:], temperature, tau_plus, beta)
    close(loss, expected, dtype)
    close(*grad_of(loss, z), *grad_of(expected, z), dtype=dtype)


def test_debiased_clamp_is_active(device: torch.device) -> None:
    """With aligned positives and tau_plus near 1 the estimator hits its floor |N| e^{-1/tau}."""
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    tags = ViewTags(kind=[1] * 4, quality=[0] * 4, source=[0, 0, 1, 1]).to(device)
    t = 0.5
    loss, _ = multilevel_info_nce(z, tags, Level.instance(), t, tau_plus=0.9)
    close(loss, math.log(1 + 2 * math.exp(-1 / t) / math.exp(1 / t)))


# --------------------------------------------------------------------------- closed forms


def orthogonal(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n`` mutually orthogonal rows of random norm, in a rotated basis."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n + 2, n + 2, generator=gen, dtype=torch.float64))
    scale = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 10 + 0.1
    return (basis[:n] * scale).to(dtype=dtype, device=device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_ntxent_closed_form(dtype: torch.dtype, denominator: str, impl: str, device: torch.device) -> None:
    n = 5  # 2n embeddings, all mutually orthogonal: every similarity 0 -> log(2n - 1)
    z = orthogonal(2 * n, dtype, device)
    tags = ViewTags(kind=[1] * (2 * n), quality=[0] * (2 * n), source=list(range(n)) * 2).to(device)
    loss, stats = multilevel_info_nce(z, tags, Level.instance(), 0.3, denominator, impl=impl)
    close(loss, math.log(2 * n - 1), dtype)
    close(stats["instance"].pos_sim, 0.0, dtype)
    close(stats["instance"].neg_sim, 0.0, dtype)


COMCL_TAGS = {
    "kind": [1, 1, 1, 0, 0, 1, 1, 1, 0, 0],
    "quality": [0, 0, 1, 0, 1, 0, 0, 1, 0, 1],
    "source": [0, 0, 0, 1, 1, 2, 2, 2, 3, 3],
    "image": [0, 0, 0, 0, 0, 1, 1, 1, 2, 2],
}
# |N(i)| per level of the anchors of COMCL_TAGS (negatives share neither source nor image)
COMCL_NEG_COUNTS = {"lesion": [2, 2, 4, 4], "quality": [2, 4], "healthy": [3, 6]}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_comcl_closed_form(dtype: torch.dtype, impl: str, device: torch.device) -> None:
    """All embeddings orthogonal: l_i = -log(1 / (1 + |N(i)|)) (the quality anchors have 2 positives)."""
    tags = ViewTags(**COMCL_TAGS).to(device)
    z = orthogonal(10, dtype, device, seed=1)
    loss, stats = multilevel_info_nce(z, tags, comcl_levels(2.0, 1.0, 0.5), temperature=0.1, impl=impl)
    expected = {name: sum(math.log(1 + c) for c in counts) / len(counts) for name, counts in COMCL_NEG_COUNTS.items()}
    for name, value in expected.items():
        close(stats[name].loss, value, dtype)
        assert int(stats[name].anchors) == len(COMCL_NEG_COUNTS[name])
        assert int(stats[name].skipped) == 0
    total = 2.0 * expected["lesion"] + 1.0 * expected["quality"] + 0.5 * expected["healthy"]
    close(loss, total, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.1, 0.5], ids=["t0.1", "t0.5"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_positives_closed_form(
    dtype: torch.dtype, temperature: float, impl: str, device: torch.device
) -> None:
    """Views of one source identical (cos 1), sources orthogonal: l_i = log(1 + |N(i)| e^{-1/tau})."""
    tags = ViewTags(**COMCL_TAGS).to(device)
    per_source = orthogonal(4, torch.float64, device, seed=2)
    z = (per_source[tags.source] * torch.linspace(0.5, 3.0, 10, dtype=torch.float64, device=device)[:, None]).to(dtype)
    loss, stats = multilevel_info_nce(z, tags, comcl_levels(), temperature=temperature, impl=impl)
    total = 0.0
    for name, counts in COMCL_NEG_COUNTS.items():
        value = sum(math.log(1 + c * math.exp(-1 / temperature)) for c in counts) / len(counts)
        close(stats[name].loss, value, dtype)
        close(stats[name].pos_sim, 1.0, dtype)
        total += value
    close(loss, total, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_candidates_read_only_the_bank_rows_they_name(impl: str, device: torch.device) -> None:
    """With candidates for every level, unnamed rows (unfilled zero slots, even NaN) are never read."""
    z, tags = two_views(3, 4, 5, torch.float64, device)
    bank = randn((8, 4), 6, torch.float64, device)
    bank[6] = 0.0  # an unfilled ring-buffer slot
    bank[7] = float("nan")
    bank_tags = ViewTags(kind=[1] * 8, quality=[0] * 8, source=list(range(10, 18))).to(device)
    cand = torch.tensor([[0, 3, -1], [5, 5, 1], [-1, -1, -1], [2, 0, 4], [1, -1, 3], [4, 2, 0]], device=device)
    loss, _ = multilevel_info_nce(z, tags, Level.instance(), 0.2, bank=(bank, bank_tags), candidates=cand, impl=impl)
    compact, _ = multilevel_info_nce(
        z, tags, Level.instance(), 0.2, bank=(bank[:6], bank_tags[:6]), candidates=cand, impl="reference"
    )
    close(loss, compact)
    padding = torch.full_like(cand, -1)
    loss, _ = multilevel_info_nce(z, tags, Level.instance(), 0.2, bank=(bank, bank_tags), candidates=padding, impl=impl)
    no_bank, _ = multilevel_info_nce(z, tags, Level.instance(), 0.2, impl="reference")
    close(loss, no_bank)
    with pytest.raises(ValueError, match="finite `bank embeddings`"):
        multilevel_info_nce(
            z, tags, Level.instance(), 0.2, bank=(bank, bank_tags), candidates=cand.clamp_max(7) * 0 + 7
        )


def test_orthogonal_bank_counts_as_negatives(device: torch.device) -> None:
    z = orthogonal(9, torch.float64, device, seed=3)
    tags = ViewTags(kind=[1] * 4, quality=[0] * 4, source=[0, 0, 1, 1]).to(device)
    bank_tags = ViewTags(kind=[0, 1, 0, 1, 0], quality=[0] * 5, source=[0, 5, 6, 7, 8]).to(device)
    level = Level("x", negatives=Select(kind=HEALTHY))
    loss, _ = multilevel_info_nce(z[:4], tags, level, 0.2, bank=(z[4:], bank_tags))
    # in batch: no healthy negatives; bank: entries 2 and 4 (entry 0 shares source 0 with anchors 0, 1)
    close(loss, (2 * math.log(1 + 2) + 2 * math.log(1 + 3)) / 4)


# --------------------------------------------------------------------------- hypothesis properties


@st.composite
def permuted(draw: st.DrawFn, bank_mode: str) -> tuple[dict[str, Any], torch.Tensor]:
    problem = draw(problems(bank_mode=bank_mode, weights=False))
    problem.pop("pair_mask", None)
    perm = torch.tensor(draw(st.permutations(range(len(problem["tags"])))))
    return problem, perm


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bank_mode", ["none", "bank", "candidates"])
@with_device
@given(data=st.data())
def test_batch_permutation_invariance(data: st.DataObject, bank_mode: str, impl: str, device: torch.device) -> None:
    problem, perm = data.draw(permuted(bank_mode))
    problem = to_device(problem, device)
    perm = perm.to(device)
    loss, stats = multilevel_info_nce(**problem, impl=impl)
    moved = dict(problem)
    moved["embeddings"] = problem["embeddings"][perm]
    moved["tags"] = problem["tags"][perm]
    if "candidates" in problem:
        moved["candidates"] = [None if c is None else c[perm] for c in problem["candidates"]]
    loss_p, stats_p = multilevel_info_nce(**moved, impl=impl)
    close(loss_p, loss)
    for name, s in stats.items():
        sp = stats_p[name]
        assert torch.equal(s.valid[perm], sp.valid)
        assert int(s.anchors) == int(sp.anchors)
        assert int(s.skipped) == int(sp.skipped)
        for field in ("loss", "pos_sim", "neg_sim"):
            close(getattr(sp, field), getattr(s, field))
    none, _ = multilevel_info_nce(**problem, reduction="none")
    none_p, _ = multilevel_info_nce(**moved, reduction="none")
    close(none_p, none[:, perm])


@pytest.mark.parametrize("dtype", DTYPES)
@with_device
@given(problem=problems(bank_mode="bank", weights=False), data=st.data())
def test_scale_invariance(
    problem: dict[str, Any], data: st.DataObject, dtype: torch.dtype, device: torch.device
) -> None:
    problem.pop("pair_mask", None)
    problem = to_device(problem, device)
    problem["embeddings"] = problem["embeddings"].to(dtype)
    problem["bank"] = (problem["bank"][0].to(dtype), problem["bank"][1])
    n = len(problem["tags"])
    max_exp = 30 if dtype == torch.float32 else 200
    exps = data.draw(st.lists(st.integers(-max_exp, max_exp), min_size=n + 1, max_size=n + 1))
    factor = torch.tensor([10.0**e for e in exps[:n]], dtype=torch.float64, device=device)[:, None]
    options = {"tau_plus": data.draw(st.sampled_from([0.0, 0.1])), "beta": data.draw(st.sampled_from([0.0, 1.0]))}
    loss, stats = multilevel_info_nce(**problem, **options)
    for scaled in (problem["embeddings"] * 10.0 ** exps[n], (problem["embeddings"].double() * factor).to(dtype)):
        moved = dict(problem, embeddings=scaled)
        loss_s, stats_s = multilevel_info_nce(**moved, **options)
        close(loss_s, loss, dtype, scale=10)
        for name, s in stats.items():
            close(stats_s[name].pos_sim, s.pos_sim, dtype, scale=10)
            assert torch.equal(stats_s[name].valid, s.valid)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"denominator": "all"}, id="all"),
        pytest.param({"tau_plus": 0.1, "beta": 1.0}, id="hcl"),
        pytest.param({"temperature": 0.01}, id="t0.01"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@with_device
@given(problem=problems(bank_mode="bank", weights=False), data=st.data())
def test_finite_for_any_finite_nonzero_input(
    problem: dict[str, Any], data: st.DataObject, dtype: torch.dtype, options: dict[str, Any], device: torch.device
) -> None:
    problem.pop("pair_mask", None)
    problem = to_device(problem, device)
    n, m = len(problem["tags"]), len(problem["bank"][1])
    max_exp = 30 if dtype == torch.float32 else 250
    exps = data.draw(st.lists(st.integers(-max_exp, max_exp), min_size=n + m, max_size=n + m))
    factor = torch.tensor([10.0**e for e in exps], dtype=torch.float64, device=device)[:, None]
    z = (problem["embeddings"] * factor[:n]).to(dtype).requires_grad_(True)
    bank_z = (problem["bank"][0] * factor[n:]).to(dtype).requires_grad_(True)
    assume(bool((z != 0).any(dim=1).all()) and bool((bank_z != 0).any(dim=1).all()))
    kwargs = {**problem, **options, "embeddings": z, "bank": (bank_z, problem["bank"][1])}
    loss, stats = multilevel_info_nce(**kwargs)
    assert torch.isfinite(loss)
    gz, gb = grad_of(loss, z, bank_z)
    assert torch.isfinite(gz).all()
    assert torch.isfinite(gb).all()
    for s in stats.values():
        assert torch.isfinite(s.loss)
        assert torch.isfinite(s.pos_sim)
        assert torch.isfinite(s.neg_sim)


NO_VALID_CASES = [
    pytest.param(ViewTags(kind=[1, 1, 1], quality=[0, 0, 1], source=[0, 0, 0]), [Level.instance()], "all-one-source"),
    pytest.param(ViewTags(kind=[1, 1, 1], quality=[0, 0, 1], source=[0, 1, 2]), [Level.instance()], "no-positives"),
    pytest.param(
        ViewTags(kind=[1, 1, 0, 0], quality=[0, 0, 0, 0], source=[0, 0, 1, 1]),
        [Level("none", anchors=Select(quality=LOW))],
        "no-anchors",
    ),
    pytest.param(
        ViewTags(kind=[1, 1, 0, 0], quality=[0, 0, 0, 0], source=[0, 0, 1, 1], image=[0, 0, 0, 0]),
        comcl_levels(),
        "same-image",
    ),
    pytest.param(
        ViewTags(kind=[1, 1, 0, 0], quality=[0, 0, 0, 0], source=[0, 0, 1, 1], label=[2, 2, 2, 2]),
        [Level.supervised(), Level("excl", exclude_same_label=True)],
        "one-label",
    ),
]
NO_VALID_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"denominator": "all"}, id="all"),
    pytest.param({"beta": 1.0}, id="hcl"),
    pytest.param({"tau_plus": 0.2}, id="debiased"),
    pytest.param({"anchor_weights": torch.ones(8)}, id="anchor-weights"),
]


@pytest.mark.parametrize("options", NO_VALID_OPTIONS)
@pytest.mark.parametrize(("tags", "levels", "case"), NO_VALID_CASES, ids=[p.values[2] for p in NO_VALID_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_valid_anchor_gives_zero_loss_and_gradient(
    dtype: torch.dtype, tags: ViewTags, levels: list[Level], case: str, options: dict[str, Any], device: torch.device
) -> None:
    tags = tags.to(device)
    n = len(tags)
    options = dict(options)
    if "anchor_weights" in options:
        options["anchor_weights"] = options["anchor_weights"][:n].to(device)
    z = randn((n, 4), 41, dtype, device).requires_grad_(True)
    # a bank whose entries are all excluded (same source as every anchor, or no bank at all)
    bank = (randn((2, 4), 42, dtype, device).requires_grad_(True), tags[:2])
    for kwargs in ({}, {"bank": bank}):
        loss, stats = multilevel_info_nce(z, tags, levels, **kwargs, **options)
        assert loss.dtype == dtype
        assert loss.item() == 0.0
        assert loss.requires_grad
        (gz,) = grad_of(loss, z)
        assert torch.equal(gz, torch.zeros_like(z))
        for s in stats.values():
            assert int(s.anchors) == 0
            assert s.loss.item() == 0.0
            assert not s.valid.any()
        none, _ = multilevel_info_nce(z, tags, levels, **kwargs, **options, reduction="none")
        assert torch.equal(none, torch.zeros_like(none))


@with_device
@given(problem=problems(), data=st.data())
def test_skipped_levels_are_zero_never_nan(problem: dict[str, Any], data: st.DataObject, device: torch.device) -> None:
    problem = to_device(problem, device)
    options = {"tau_plus": data.draw(st.sampled_from([0.0, 0.2])), "beta": data.draw(st.sampled_from([0.0, 1.0]))}
    loss, stats = multilevel_info_nce(**problem, **options)
    assert torch.isfinite(loss)
    for level in problem["levels"]:
        s = stats[level.name]
        anchors = int(level.anchors(problem["tags"]).sum())
        assert int(s.anchors) + int(s.skipped) == anchors
        if int(s.anchors) == 0:
            assert s.loss.item() == 0.0


@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
@with_device
@given(problem=problems(bank_mode="bank", weights=False), data=st.data())
def test_adding_a_negative_never_lowers_a_loss(
    problem: dict[str, Any], data: st.DataObject, denominator: str, device: torch.device
) -> None:
    problem.pop("pair_mask", None)
    problem = to_device(problem, device)
    bank_z, bank_tags = problem["bank"]
    extra = randn((1, bank_z.shape[1]), data.draw(st.integers(0, 2**31 - 1)), torch.float64, device)
    extra_tags = ViewTags(
        kind=[data.draw(st.integers(0, 1))],
        quality=[data.draw(st.integers(0, 1))],
        source=[1000],
        label=[data.draw(st.integers(0, 3))],
        image=None if bank_tags.image is None else [1000],
    ).to(device)
    before, stats = multilevel_info_nce(**problem, denominator=denominator, reduction="none")
    grown = dict(problem, bank=(torch.cat([bank_z, extra]), ViewTags.cat([bank_tags, extra_tags])))
    after, stats_after = multilevel_info_nce(**grown, denominator=denominator, reduction="none")
    for li, level in enumerate(problem["levels"]):
        both = stats[level.name].valid & stats_after[level.name].valid
        assert bool((stats[level.name].valid <= stats_after[level.name].valid).all())
        assert bool((after[li][both] >= before[li][both] - 1e-12).all())


# --------------------------------------------------------------------------- gradcheck


GRADCHECK_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"denominator": "all"}, id="all"),
    pytest.param({"bank": True}, id="bank"),
    pytest.param({"bank": True, "candidates": True}, id="candidates"),
    pytest.param({"bank": True, "negative_weights": True, "anchor_weights": True}, id="weights"),
    pytest.param({"tau_plus": 0.1, "beta": 0.5}, id="hcl"),
    pytest.param({"bank": True, "denominator": "all", "negative_weights": True}, id="bank-all-weights"),
]


@pytest.mark.parametrize("impl", ["reference", pytest.param("auto", marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck(case: dict[str, Any], impl: str, device: torch.device) -> None:
    tags = ViewTags(**COMCL_TAGS).to(device)
    levels = [*comcl_levels(), Level.instance(weight=0.5)]
    n, d, m = 10, 3, 5
    z = randn((n, d), 51, torch.float64, device).requires_grad_(True)
    bank_z = randn((m, d), 52, torch.float64, device).requires_grad_(True)
    bank_tags = ViewTags(kind=[0, 1, 0, 1, 0], quality=[1, 0, 0, 1, 1], source=[4, 5, 6, 7, 0], image=[3, 3, 4, 4, 0])
    bank_tags = bank_tags.to(device)
    options = {k: v for k, v in case.items() if k not in ("bank", "candidates", "negative_weights", "anchor_weights")}
    c_b = m
    if case.get("candidates"):
        gen = torch.Generator().manual_seed(53)
        options["candidates"] = torch.randint(-1, m, (n, 3), generator=gen).to(device)
        c_b = 3
    if case.get("negative_weights"):
        gen = torch.Generator().manual_seed(54)
        options["negative_weights"] = (torch.rand(n, n + c_b, generator=gen, dtype=torch.float64) * 2).to(device)
    if case.get("anchor_weights"):
        options["anchor_weights"] = torch.linspace(0.1, 2.0, n, dtype=torch.float64, device=device)

    if case.get("bank"):

        def fn(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return multilevel_info_nce(x, tags, levels, 0.5, bank=(b, bank_tags), impl=impl, **options)[0]

        assert torch.autograd.gradcheck(fn, (z, bank_z))
    else:

        def fn1(x: torch.Tensor) -> torch.Tensor:
            return multilevel_info_nce(x, tags, levels, 0.5, impl=impl, **options)[0]

        assert torch.autograd.gradcheck(fn1, (z,))


# --------------------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        pytest.param(torch.float64, torch.float64, id="float64"),
        pytest.param(torch.float32, torch.float32, id="float32"),
        pytest.param(torch.float16, torch.float32, id="float16"),
        pytest.param(torch.bfloat16, torch.float32, id="bfloat16"),
    ],
)
def test_output_dtype(dtype: torch.dtype, expected: torch.dtype, device: torch.device) -> None:
    z, tags = two_views(4, 8, 61, dtype, device)
    loss, stats = multilevel_info_nce(z, tags, Level.instance())
    assert loss.dtype == expected
    assert loss.device.type == device.type
    reference, _ = multilevel_info_nce(z.detach().double(), tags, Level.instance())
    close(loss, reference, torch.float32, scale=500 if dtype in (torch.float16, torch.bfloat16) else 1)
    (g,) = grad_of(loss, z)
    assert g.dtype == dtype
    assert torch.isfinite(g).all()


def test_normalize_embeddings_extremes() -> None:
    x = torch.tensor([[1e-40, -2e-40], [3e38, 3e38]], dtype=torch.float32)
    out = normalize_embeddings(x)
    x64 = x.double()
    close(out, (x64 / x64.norm(dim=1, keepdim=True)).float(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_subnormal_row_with_gradient_is_an_error(impl: str, dtype: torch.dtype) -> None:
    """A row below the dtype's smallest normal number would get an inf gradient (size 1/norm): refused,
    naming the row; the smallest normal row still trains with a finite gradient; no gradient, no error."""
    tags = ViewTags(kind=[1, 1, 1, 0, 0, 0], quality=[0, 1, 0, 0, 1, 0], source=[0, 0, 1, 2, 2, 3])
    tiny = torch.finfo(dtype).tiny
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)).double()
    base = base / base.abs().amax(dim=1, keepdim=True)  # largest |entry| 1 in every row

    ok = (base * torch.tensor([1.0, tiny, 1, 1, 1, 1], dtype=torch.float64)[:, None]).to(dtype).requires_grad_()
    loss, _ = multilevel_info_nce(ok, tags, Level.instance(), impl=impl)
    (g,) = grad_of(loss, ok)
    assert torch.isfinite(g).all()

    below = (base * torch.tensor([1.0, 1, 1, tiny / 4, 1, 1], dtype=torch.float64)[:, None]).to(dtype)
    assert below[3].abs().amax() > 0  # subnormal, not flushed to zero
    with pytest.raises(ValueError, match=r"smallest normal.*row 3 has .*overflow to inf"):
        multilevel_info_nce(below.clone().requires_grad_(), tags, Level.instance(), impl=impl)
    with torch.no_grad():
        loss, _ = multilevel_info_nce(below.clone().requires_grad_(), tags, Level.instance(), impl=impl)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"denominator": "all"}, id="all"),
        pytest.param({"tau_plus": 0.1, "beta": 0.5}, id="debiased"),
        pytest.param({"negative_weights": torch.zeros(0, 0)}, id="weights"),
        pytest.param({"reduction": "none"}, id="unreduced"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl: str, options: dict[str, Any], device: torch.device) -> None:
    """N = 0 is a zero loss with a (zero) gradient on every path, as PML's losses give."""
    z = torch.zeros(0, 4, device=device, requires_grad=True)
    tags = ViewTags(kind=[], quality=[], source=[]).to(device)
    options = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    loss, stats = multilevel_info_nce(z, tags, Level.instance(), impl=impl, **options)
    assert loss.shape == ((1, 0) if options.get("reduction") == "none" else ())
    assert float(loss.sum()) == 0.0
    assert int(stats["instance"].anchors) == 0
    (grad,) = torch.autograd.grad(loss.sum(), z, allow_unused=True)
    assert grad is None or grad.shape == (0, 4)


# --------------------------------------------------------------------------- validation


def _base(device: torch.device) -> dict[str, Any]:
    z, tags = two_views(3, 4, 71, torch.float32, device)
    return {"embeddings": z.detach(), "tags": tags, "levels": [Level.instance()]}


def _bank(device: torch.device, m: int = 3, d: int = 4) -> tuple[torch.Tensor, ViewTags]:
    return torch.randn(m, d, device=device), ViewTags(kind=[0] * m, quality=[0] * m, source=list(range(10, 10 + m)))


BAD_INPUTS = [
    (
        "nan-embeddings",
        lambda b, dev: {"embeddings": b["embeddings"].index_fill(0, torch.tensor([1], device=dev), float("nan"))},
        ValueError,
        "finite `embeddings`.*row 1",
    ),
    (
        "inf-embeddings",
        lambda b, dev: {"embeddings": b["embeddings"].index_fill(0, torch.tensor([2], device=dev), float("inf"))},
        ValueError,
        "finite `embeddings`.*row 2",
    ),
    (
        "zero-row",
        lambda b, dev: {"embeddings": b["embeddings"].index_fill(0, torch.tensor([0], device=dev), 0.0)},
        ValueError,
        "non-zero rows in `embeddings`.*row 0",
    ),
    (
        "int-embeddings",
        lambda b, dev: {"embeddings": torch.ones(6, 4, dtype=torch.long, device=dev)},
        TypeError,
        "`embeddings`.*floating",
    ),
    (
        "1d-embeddings",
        lambda b, dev: {"embeddings": torch.ones(6, device=dev)},
        ValueError,
        r"`embeddings` of shape \(N, D\)",
    ),
    ("length-mismatch", lambda b, dev: {"embeddings": b["embeddings"][:5]}, ValueError, "`embeddings` and `tags`.*5"),
    ("tags-not-viewtags", lambda b, dev: {"tags": b["tags"].pack()}, TypeError, "`tags`.*ViewTags"),
    ("temperature-0", lambda b, dev: {"temperature": 0.0}, ValueError, "`temperature`.*0.0"),
    ("temperature-neg", lambda b, dev: {"temperature": -0.1}, ValueError, "`temperature`.*-0.1"),
    ("temperature-nan", lambda b, dev: {"temperature": float("nan")}, ValueError, "`temperature`"),
    ("temperature-inf", lambda b, dev: {"temperature": float("inf")}, ValueError, "`temperature`"),
    (
        "temperature-tensor",
        lambda b, dev: {"temperature": torch.tensor(0.1)},
        TypeError,
        "`temperature` to be a float, but got Tensor",
    ),
    ("temperature-str", lambda b, dev: {"temperature": "0.1"}, TypeError, "`temperature` to be a float, but got str"),
    ("temperature-bool", lambda b, dev: {"temperature": True}, TypeError, "`temperature` to be a float, but got bool"),
    ("tau-plus-tensor", lambda b, dev: {"tau_plus": torch.tensor(0.1)}, TypeError, "`tau_plus`.*Tensor"),
    ("beta-bool", lambda b, dev: {"beta": True}, TypeError, "`beta`.*bool"),
    (
        "zero-dim-embeddings",
        lambda b, dev: {"embeddings": torch.ones(6, 0, device=dev)},
        ValueError,
        "`embeddings`.*D >= 1",
    ),
    ("no-levels", lambda b, dev: {"levels": []}, ValueError, "`levels`"),
    ("not-a-level", lambda b, dev: {"levels": ["instance"]}, TypeError, "`levels`"),
    (
        "duplicate-names",
        lambda b, dev: {"levels": [Level.instance(), Level.instance(weight=2.0)]},
        ValueError,
        "unique level names.*instance",
    ),
    ("label-level-no-labels", lambda b, dev: {"levels": [Level.supervised()]}, ValueError, "supervised.*tags.label"),
    ("exclude-label-no-labels", lambda b, dev: {"levels": [Level(exclude_same_label=True)]}, ValueError, "tags.label"),
    ("denominator", lambda b, dev: {"denominator": "both"}, ValueError, "`denominator`.*'both'"),
    ("reduction", lambda b, dev: {"reduction": "sum"}, ValueError, "`reduction`.*'sum'"),
    ("impl", lambda b, dev: {"impl": "triton"}, ValueError, "`impl`.*'triton'"),
    ("tau-plus-1", lambda b, dev: {"tau_plus": 1.0}, ValueError, "`tau_plus`.*1.0"),
    ("tau-plus-neg", lambda b, dev: {"tau_plus": -0.1}, ValueError, "`tau_plus`"),
    ("beta-neg", lambda b, dev: {"beta": -1.0}, ValueError, "`beta`.*-1.0"),
    ("beta-inf", lambda b, dev: {"beta": float("inf")}, ValueError, "`beta`"),
    ("debias-with-all", lambda b, dev: {"tau_plus": 0.1, "denominator": "all"}, ValueError, "`tau_plus`.*pos_neg"),
    ("bank-not-tuple", lambda b, dev: {"bank": torch.randn(3, 4, device=dev)}, TypeError, "`bank`"),
    ("bank-wrong-dim", lambda b, dev: {"bank": _bank(dev, d=5)}, ValueError, "bank embeddings of dimension 4.*5"),
    (
        "bank-nan",
        lambda b, dev: {"bank": (torch.full((3, 4), float("nan"), device=dev), _bank(dev)[1])},
        ValueError,
        "finite `bank embeddings`",
    ),
    (
        "bank-zero-row",
        lambda b, dev: {"bank": (torch.zeros(3, 4, device=dev), _bank(dev)[1])},
        ValueError,
        "non-zero rows in `bank embeddings`",
    ),
    (
        "bank-tags-length",
        lambda b, dev: {"bank": (torch.randn(2, 4, device=dev), _bank(dev)[1])},
        ValueError,
        "`bank tags`",
    ),
    (
        "candidates-no-bank",
        lambda b, dev: {"candidates": torch.zeros(6, 2, dtype=torch.long, device=dev)},
        ValueError,
        "`candidates`.*`bank` is None",
    ),
    (
        "candidates-too-large",
        lambda b, dev: {"bank": _bank(dev), "candidates": torch.full((6, 2), 3, device=dev)},
        ValueError,
        r"`candidates` in \[-1, 2\]",
    ),
    (
        "candidates-below-minus-one",
        lambda b, dev: {"bank": _bank(dev), "candidates": torch.full((6, 2), -2, device=dev)},
        ValueError,
        "`candidates`",
    ),
    (
        "candidates-float",
        lambda b, dev: {"bank": _bank(dev), "candidates": torch.zeros(6, 2, device=dev)},
        TypeError,
        "`candidates`",
    ),
    (
        "candidates-rows",
        lambda b, dev: {"bank": _bank(dev), "candidates": torch.zeros(5, 2, dtype=torch.long, device=dev)},
        ValueError,
        "`candidates` with 6 rows",
    ),
    (
        "candidates-per-level-length",
        lambda b, dev: {"bank": _bank(dev), "candidates": [None, None]},
        ValueError,
        "`candidates`.*one entry per level",
    ),
    (
        "weights-shape",
        lambda b, dev: {"negative_weights": torch.ones(6, 5, device=dev)},
        ValueError,
        r"`negative_weights`.*\(6, 6\)",
    ),
    (
        "weights-shape-bank",
        lambda b, dev: {"bank": _bank(dev), "negative_weights": torch.ones(6, 6, device=dev)},
        ValueError,
        r"`negative_weights`.*\(6, 9\)",
    ),
    (
        "weights-negative",
        lambda b, dev: {"negative_weights": -torch.ones(6, 6, device=dev)},
        ValueError,
        "`negative_weights` >= 0.*-1",
    ),
    (
        "weights-nan",
        lambda b, dev: {"negative_weights": torch.full((6, 6), float("nan"), device=dev)},
        ValueError,
        "`negative_weights`",
    ),
    ("weights-type", lambda b, dev: {"negative_weights": 1.0}, TypeError, "`negative_weights`"),
    (
        "weights-per-level-length",
        lambda b, dev: {"negative_weights": [None, None]},
        ValueError,
        "`negative_weights`.*one entry per level",
    ),
    (
        "weights-callable-shape",
        lambda b, dev: {"negative_weights": lambda h, m: h[:, :2]},
        ValueError,
        "`negative_weights`",
    ),
    (
        "anchor-weights-shape",
        lambda b, dev: {"anchor_weights": torch.ones(5, device=dev)},
        ValueError,
        r"`anchor_weights` of shape \(6,\)",
    ),
    (
        "anchor-weights-negative",
        lambda b, dev: {"anchor_weights": -torch.ones(6, device=dev)},
        ValueError,
        "`anchor_weights`",
    ),
    ("anchor-weights-type", lambda b, dev: {"anchor_weights": 2.0}, TypeError, "`anchor_weights`"),
    (
        "fused-unsupported",
        lambda b, dev: {"impl": "fused", "negative_weights": lambda h, m: torch.ones_like(h)},
        ValueError,
        "impl='fused'",
    ),
    (
        "candidates-above-bank",
        lambda b, dev: {"bank": _bank(dev), "candidates": torch.tensor([[0, 1, 3]] * 6, device=dev)},
        ValueError,
        r"`candidates` in \[-1, 2\] \(-1 = padding, else a row of the bank of 3 entries\), but got 3",
    ),
    (
        "candidates-below-padding",
        lambda b, dev: {"bank": _bank(dev), "candidates": torch.tensor([[0, -2, 1]] * 6, device=dev)},
        ValueError,
        r"`candidates` in \[-1, 2\].*but got -2",
    ),
    ("backend", lambda b, dev: {"backend": "cuda"}, ValueError, "`backend`"),
    ("block-rows", lambda b, dev: {"block_rows": 0}, ValueError, "`block_rows`"),
    ("block-cols-type", lambda b, dev: {"block_cols": 2.0}, TypeError, "`block_cols`"),
]


@pytest.mark.parametrize(("case", "make", "error", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(case: str, make: Any, error: type[Exception], match: str, device: torch.device) -> None:
    kwargs = _base(device)
    changes = make(kwargs, device)
    if "bank" in changes and isinstance(changes["bank"], tuple):
        changes["bank"] = (changes["bank"][0], changes["bank"][1].to(device))
    kwargs.update(changes)
    with pytest.raises(error, match=match):
        multilevel_info_nce(**kwargs)


def test_level_with_tags_made_of_floats_raises() -> None:
    with pytest.raises(TypeError, match="`source`"):
        ViewTags(kind=[1, 1], quality=[0, 0], source=[0.0, 1.0])
    with pytest.raises(ValueError, match="`kind`"):
        ViewTags(kind=[1, 2], quality=[0, 0], source=[0, 1])
    with pytest.raises(ValueError, match="`quality`"):
        ViewTags(kind=[1, 1], quality=[0, 5], source=[0, 1])
