"""Fused (tiled) path of multilevel_info_nce: equals the dense reference, memory linear in N."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlcl_losses import Level, Select, ViewTags, _fused, comcl_levels
from mlcl_losses._tiles import Plan
from mlcl_losses.functional import multilevel_info_nce

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def blocks(rows: int, cols: int) -> dict[str, int]:
    """Small tiles, so that tests cross tile borders (keyword arguments of the loss)."""
    return {"block_rows": rows, "block_cols": cols}


def random_tags(n: int, gen: torch.Generator, device: torch.device, sources: int | None = None) -> ViewTags:
    def ints(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=gen).to(device)

    return ViewTags(
        kind=ints(2),
        quality=ints(2),
        source=ints(sources or max(1, n // 3)),
        label=ints(3),
        image=ints(max(1, n // 2)),
    )


def comcl_tags(sources: int, device: torch.device) -> ViewTags:
    """V1a, V1b, V2 of lesion sources and V3, V4 of healthy sources (docs/glossary.md)."""
    kind, quality, source = [], [], []
    for s in range(sources):
        kind += [1, 1, 1, 0, 0]
        quality += [0, 0, 1, 0, 1]
        source += [2 * s, 2 * s, 2 * s, 2 * s + 1, 2 * s + 1]
    return ViewTags(kind=kind, quality=quality, source=source, label=[0] * len(kind)).to(device)


def elementwise_weights(hardness: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(4.0 * hardness) * mask


elementwise_weights.is_elementwise = True  # type: ignore[attr-defined]

LEVELS = {
    "comcl": comcl_levels(),
    "instance": [Level.instance()],
    "supervised": [Level.supervised()],
    "mixed": [
        Level("a", Select(kind=1), Select(quality=0), "label", Select(kind=0), 0.5),
        Level("b", Select(quality=1), Select(), "source", Select(), 2.0, exclude_same_label=True),
        Level("c", Select(), Select(), "source", Select(quality=0), 1.0, in_batch_negatives=False),
        Level("d", Select(kind=0), Select(), "source", Select(), 1.0, bank_negatives=False),
    ],
}


def run_both(
    z: torch.Tensor,
    tags: ViewTags,
    levels: list[Level],
    bank: tuple[torch.Tensor, ViewTags] | None = None,
    **kwargs: Any,
) -> list[tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor | None]]:
    out = []
    for impl in ("reference", "fused"):
        zz = z.detach().clone().requires_grad_()
        bk = None if bank is None else (bank[0].detach().clone().requires_grad_(), bank[1])
        loss, stats = multilevel_info_nce(zz, tags, levels, bank=bk, impl=impl, **kwargs)
        loss.backward()
        out.append((loss, stats, zz.grad, None if bk is None else bk[0].grad))
    return out


def assert_same(results: list, dtype: torch.dtype) -> None:
    (l0, s0, g0, b0), (l1, s1, g1, b1) = results
    tol = TOL[dtype]
    torch.testing.assert_close(l1, l0, **tol)
    torch.testing.assert_close(g1, g0, **tol)
    if b0 is not None:
        torch.testing.assert_close(b1, b0, **tol)
    assert s0.keys() == s1.keys()
    for name in s0:
        for field, a, b in zip(s0[name]._fields, s0[name], s1[name], strict=True):
            if field == "path":
                assert (a, b) == ("reference", "fused-torch")
                continue
            assert a.dtype == b.dtype, (name, field)
            torch.testing.assert_close(b, a, **tol, msg=f"{name}.{field}")


@given(
    n=st.integers(2, 24),
    d=st.sampled_from([32, 64, 128, 256]),
    levels=st.sampled_from(sorted(LEVELS)),
    denominator=st.sampled_from(["pos_neg", "all"]),
    bank_size=st.sampled_from([0, 7]),
    use_candidates=st.booleans(),
    weights=st.sampled_from(["none", "tensor", "callable"]),
    block_rows=st.integers(2, 8),
    block_cols=st.integers(3, 9),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_reference_float64(
    n: int,
    d: int,
    levels: str,
    denominator: str,
    bank_size: int,
    use_candidates: bool,
    weights: str,
    block_rows: int,
    block_cols: int,
    seed: int,
) -> None:
    device = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))
    gen = torch.Generator().manual_seed(seed)
    tags = random_tags(n, gen, device)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    bank, candidates, c_b = None, None, 0
    if bank_size:
        bank = (
            torch.randn(bank_size, d, generator=gen, dtype=torch.float64).to(device),
            random_tags(bank_size, gen, device),
        )
        c_b = bank_size
        if use_candidates:
            candidates = torch.randint(-1, bank_size, (n, 4), generator=gen).to(device)
            c_b = 4
    negative_weights: Any = None
    if weights == "tensor":
        negative_weights = torch.rand(n, n + c_b, generator=gen, dtype=torch.float64).to(device)
    elif weights == "callable":
        negative_weights = elementwise_weights
    results = run_both(
        z,
        tags,
        LEVELS[levels],
        bank,
        temperature=0.2,
        denominator=denominator,
        candidates=candidates,
        negative_weights=negative_weights,
        **blocks(block_rows, block_cols),
    )
    assert_same(results, torch.float64)


@pytest.mark.parametrize("n", [37, 128], ids=["n37", "n128"])
@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
def test_fused_equals_reference_float32_comcl(n: int, denominator: str, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(n)
    tags = comcl_tags(n // 5 + 1, device)
    m = len(tags)
    z = torch.randn(m, 64, generator=gen).to(device)
    bank = (torch.randn(50, 64, generator=gen).to(device), comcl_tags(10, device))
    candidates = [torch.randint(-1, 50, (m, 6), generator=gen).to(device), None, None]
    results = run_both(
        z,
        tags,
        comcl_levels(),
        bank,
        temperature=0.07,
        denominator=denominator,
        candidates=candidates,
        **blocks(16, 24),
    )
    assert_same(results, torch.float32)


@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
def test_fused_equals_reference_shared_images_and_label_level(denominator: str, device: torch.device) -> None:
    """CoMCL views whose lesion and healthy patches share images (never-negative masks inside the span tiles),
    plus a label level (dense positives), with row and column tiles that cut the spans."""
    gen = torch.Generator().manual_seed(7)
    base = comcl_tags(12, device)
    m = len(base)
    tags = ViewTags(
        kind=base.kind,
        quality=base.quality,
        source=base.source,
        label=torch.randint(0, 3, (m,), generator=gen).to(device),
        image=(base.source // 4).to(device),  # two lesion and two healthy sources per image
    )
    levels = comcl_levels() + [Level("grade", Select(kind=1), Select(quality=0), "label", Select(kind=0), 0.5)]
    z = torch.randn(m, 16, generator=gen, dtype=torch.float64).to(device)
    results = run_both(z, tags, levels, temperature=0.3, denominator=denominator, **blocks(5, 7))
    assert_same(results, torch.float64)


def test_tiles_cover_only_admitted_columns() -> None:
    """CoMCL: the batch tiles cover V1 x healthy, V2 x healthy and V4 x lesion, nothing else."""
    n_sources = 40
    tags = comcl_tags(n_sources, torch.device("cpu"))
    levels = comcl_levels()
    plan = Plan(tags, levels, 0.1, "pos_neg", None, 0, [None] * 3, [None] * 3, 16, 24)
    z = torch.nn.functional.normalize(torch.randn(len(tags), 8), dim=1)
    covered = 0
    for group in plan.groups(plan.anchors):
        for tile in plan.tiles(z, z, None, group, group.levels):
            covered += tile.logits.numel()
            assert all(q is None for q in tile.neg.values())  # no source shared between lesion and healthy
    lesion, healthy = 3 * n_sources, 2 * n_sources
    v1, v2, v4 = 2 * n_sources, n_sources, n_sources
    assert covered == v1 * healthy + v2 * healthy + v4 * lesion


def test_per_level_candidates_and_weights(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    n, m = 40, 12
    tags = random_tags(n, gen, device)
    bank = (torch.randn(m, 32, generator=gen, dtype=torch.float64).to(device), random_tags(m, gen, device))
    levels = LEVELS["mixed"]
    cands = [
        torch.randint(-1, m, (n, 3), generator=gen).to(device),
        None,
        torch.randint(-1, m, (n, 5), generator=gen),
        None,
    ]
    weights: list[Any] = [torch.rand(n, n + 3, dtype=torch.float64).to(device), elementwise_weights, None, None]
    results = run_both(
        torch.randn(n, 32, generator=gen, dtype=torch.float64).to(device),
        tags,
        levels,
        bank,
        candidates=cands,
        negative_weights=weights,
        **blocks(6, 7),
    )
    assert_same(results, torch.float64)


def test_zero_weights_and_no_valid_anchor(device: torch.device) -> None:
    """All-zero negative weights: finite loss; no valid anchor at all: zero loss, zero gradient."""
    tags = ViewTags(kind=[1, 1, 1, 1], quality=[0, 0, 0, 0], source=[0, 0, 1, 1]).to(device)
    z = torch.randn(4, 8, dtype=torch.float64, device=device)
    results = run_both(z, tags, [Level.instance()], negative_weights=torch.zeros(4, 4, dtype=torch.float64))
    assert_same(results, torch.float64)
    lonely = ViewTags(kind=[1, 1, 1], quality=[0, 0, 0], source=[0, 1, 2]).to(device)  # no positives
    zz = torch.randn(3, 8, device=device, requires_grad=True)
    loss, stats = multilevel_info_nce(zz, lonely, comcl_levels() + [Level.instance(name="i")], impl="fused")
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert zz.grad is not None
    assert torch.equal(zz.grad, torch.zeros_like(zz))
    assert int(stats["i"].skipped) == 3
    assert int(stats["i"].anchors) == 0


def test_gradcheck_fused_function() -> None:
    gen = torch.Generator().manual_seed(0)
    n, m, d = 9, 5, 4
    tags = random_tags(n, gen, torch.device("cpu"), sources=4)
    bank_tags = random_tags(m, gen, torch.device("cpu"))
    levels = [Level.instance(), Level.supervised(weight=0.5)]
    for denominator in ("pos_neg", "all"):
        plan = Plan(tags, levels, 0.5, denominator, bank_tags, m, [None, None], [None, None], 3, 4)
        z = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
        bank = torch.randn(m, d, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, p=plan: _fused._FusedInfoNCE.apply(a, b, p)[0], (z, bank))


def saved_bytes(n: int, impl: str) -> int:
    tags = comcl_tags(n // 5, torch.device("cpu"))
    z = torch.randn(len(tags), 32, requires_grad=True)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        multilevel_info_nce(z, tags, comcl_levels(), impl=impl)
    return total


def test_saved_memory_linear_in_n() -> None:
    """The fused path saves O(N) for backward; the dense reference O(N^2)."""
    small, large = saved_bytes(200, "fused"), saved_bytes(800, "fused")
    assert large <= 4.2 * small, (small, large)
    assert large <= 800 * (6 * 32 * 4 + 200)  # a few copies of the embeddings (normalisation) + row statistics
    ref_small, ref_large = saved_bytes(200, "reference"), saved_bytes(800, "reference")
    assert ref_large > 10 * ref_small  # the check above could fail


def test_largest_allocation_is_a_tile() -> None:
    """No op of the fused forward+backward allocates anything N x N (torch profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    n = 300
    tags = comcl_tags(n // 5, torch.device("cpu"))
    largest = {}
    for impl in ("reference", "fused"):
        z = torch.randn(n, 16, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, _ = multilevel_info_nce(z, tags, comcl_levels(), impl=impl, **blocks(32, 64))
            loss.backward()
        largest[impl] = max(e.cpu_memory_usage for e in prof.events())
    assert largest["reference"] >= 4 * n * n  # an N x N float matrix
    assert largest["fused"] < n * n, largest  # less than one N x N bool matrix


def test_autocast_bf16_matches_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    tags = comcl_tags(20, torch.device("cpu"))
    z = torch.randn(len(tags), 64, generator=gen).bfloat16()
    out = []
    for impl in ("reference", "fused"):
        zz = z.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = multilevel_info_nce(zz, tags, comcl_levels(), impl=impl, **blocks(16, 32))
        assert loss.dtype == torch.float32
        loss.backward()
        out.append((loss, zz.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1].float(), out[0][1].float(), rtol=1e-2, atol=1e-4)


def not_elementwise(hardness: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(hardness)


def test_only_a_non_elementwise_callable_falls_back() -> None:
    tags = ViewTags(kind=[1] * 10, quality=[0] * 10, source=[i // 2 for i in range(10)])
    z = torch.randn(10, 8)
    ref, _ = multilevel_info_nce(z, tags, [Level.instance()], impl="reference", negative_weights=not_elementwise)
    auto, stats = multilevel_info_nce(z, tags, [Level.instance()], impl="auto", negative_weights=not_elementwise)
    torch.testing.assert_close(auto, ref)
    assert stats["instance"].path == "reference"
    with pytest.raises(ValueError, match="impl='fused'.*not_elementwise"):
        multilevel_info_nce(z, tags, [Level.instance()], impl="fused", negative_weights=not_elementwise)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"anchor_weights": torch.rand(10)},
        {"tau_plus": 0.1},
        {"beta": 0.5},
        {"pair_mask": (torch.rand(10, 10) > 0.2, torch.rand(10, 10) > 0.2)},
        {"reduction": "none"},
    ],
    ids=["anchor_weights", "tau_plus", "beta", "pair_mask", "reduction_none"],
)
def test_options_run_fused(kwargs: dict) -> None:
    """Options the fused path once refused now run on it (``stats.path``) and equal the reference."""
    tags = ViewTags(kind=[1] * 10, quality=[0] * 10, source=[i // 2 for i in range(10)])
    z = torch.randn(10, 8, dtype=torch.float64)
    ref, _ = multilevel_info_nce(z, tags, [Level.instance()], impl="reference", **kwargs)
    auto, stats = multilevel_info_nce(z, tags, [Level.instance()], impl="auto", **kwargs)
    assert stats["instance"].path == "fused-torch"
    torch.testing.assert_close(auto, ref, **TOL[torch.float64])


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (torch.full((6, 6), -1.0), "negative_weights"),
        (torch.ones(6, 5), "shape"),
    ],
    ids=["negative", "shape"],
)
def test_bad_weights_raise(weights: torch.Tensor, match: str) -> None:
    tags = ViewTags(kind=[1] * 6, quality=[0] * 6, source=[0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=match):
        multilevel_info_nce(torch.randn(6, 4), tags, [Level.instance()], negative_weights=weights, impl="fused")


def test_torch_compile_matches_eager() -> None:
    """The fused Function runs under torch.compile (graph breaks allowed: validation reads values)."""
    tags = comcl_tags(3, torch.device("cpu"))
    z = torch.randn(len(tags), 16)

    def step(x: torch.Tensor) -> torch.Tensor:
        return multilevel_info_nce(x, tags, comcl_levels(), impl="fused")[0]

    compiled = torch.compile(step, backend="aot_eager")
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    eager, comp = step(za), compiled(zb)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(zb.grad, za.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("denominator", ["pos_neg", "all"])
def test_fused_equals_reference_cuda(denominator: str) -> None:
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    tags = comcl_tags(200, device)
    z = torch.randn(len(tags), 128, generator=gen).to(device)
    bank = (torch.randn(300, 128, generator=gen).to(device), comcl_tags(60, device))
    results = run_both(z, tags, comcl_levels(), bank, denominator=denominator, **blocks(128, 256))
    assert_same(results, torch.float32)
