"""Tests of mlcl_losses.pml: the pytorch-metric-learning loss, miner, cross-batch memory and reducer."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss, SupConLoss
from pytorch_metric_learning.reducers import (
    AvgNonZeroReducer,
    DoNothingReducer,
    MeanReducer,
    SumReducer,
)

from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.levels import Level, bank_negative_mask, comcl_levels, level_masks
from mlcl_losses.pml import (
    MultiLevelCrossBatchMemory,
    MultiLevelInfoNCELoss,
    MultiLevelMiner,
    SelfPacedReducer,
)
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting
from mlcl_losses.tags import ViewTags
from test_levels import random_levels, random_tags

TOL64 = {"rtol": 1e-10, "atol": 1e-10}
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
with_device = settings(
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)


def randn(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def four_views(device: torch.device, offset: int = 0, image: bool = True) -> ViewTags:
    """Two lesion boxes (V1a, V1b, V2) and two healthy patches (V3, V4); sources from ``offset``."""
    return ViewTags(
        kind=torch.tensor([1, 1, 1, 0, 0] * 2, device=device),
        quality=torch.tensor([0, 0, 1, 0, 1] * 2, device=device),
        source=offset + torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3], device=device),
        label=torch.tensor([1, 1, 1, 0, 0, 2, 2, 2, 0, 0], device=device),
        image=(offset + torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2], device=device)) if image else None,
    )


def grads(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


# --------------------------------------------------------------------------- MultiLevelInfoNCELoss


@with_device
@given(
    tags=random_tags(min_size=2, max_size=9, label=True),
    levels=random_levels(),
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.1, 0.5]),
    denominator=st.sampled_from(["pos_neg", "all"]),
)
def test_adapter_equals_function(
    tags: ViewTags, levels: list[Level], seed: int, temperature: float, denominator: str, device: torch.device
) -> None:
    tags = tags.to(device)
    z = randn((len(tags), 4), seed, device).requires_grad_(True)
    loss_fn = MultiLevelInfoNCELoss(levels, temperature=temperature, denominator=denominator)
    loss = loss_fn(z, tags.pack())
    expected, _ = multilevel_info_nce(z, tags, levels, temperature, denominator, impl="reference")
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


def test_adapter_default_levels_are_comcl(device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 1, device)
    loss_fn = MultiLevelInfoNCELoss()
    assert [lv.name for lv in loss_fn.levels] == ["lesion", "quality", "healthy"]
    expected, _ = multilevel_info_nce(z, tags, comcl_levels(), 0.1)
    torch.testing.assert_close(loss_fn(z, tags.pack()), expected, **TOL64)


def _per_level_elements(z: torch.Tensor, tags: ViewTags, levels: list[Level]) -> list[torch.Tensor]:
    none, stats = multilevel_info_nce(z, tags, levels, 0.1, reduction="none")
    return [row[stats[lv.name].valid] for row, lv in zip(none, levels, strict=True)]


@pytest.mark.parametrize(
    ("reducer", "reduce"),
    [
        pytest.param(MeanReducer(), lambda x: x.mean(), id="mean"),
        pytest.param(SumReducer(), lambda x: x.sum(), id="sum"),
        pytest.param(
            AvgNonZeroReducer(), lambda x: x[x > 0].mean() if bool((x > 0).any()) else x.sum() * 0, id="avg-nonzero"
        ),
    ],
)
@pytest.mark.parametrize("n_levels", [1, 3], ids=["one-level", "three-levels"])
def test_adapter_with_pml_reducers(reducer: object, reduce: object, n_levels: int, device: torch.device) -> None:
    tags = four_views(device)
    levels = [Level.instance()] if n_levels == 1 else comcl_levels(1.0, 0.5, 2.0)
    z = randn((10, 8), 2, device).requires_grad_(True)
    loss = MultiLevelInfoNCELoss(levels, temperature=0.1, reducer=reducer)(z, tags.pack())
    expected = sum(reduce(x) for x in _per_level_elements(z, tags, levels))  # type: ignore[operator]
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


def test_adapter_do_nothing_reducer_exposes_elements(device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 3, device)
    out = MultiLevelInfoNCELoss(comcl_levels(), reducer=DoNothingReducer())(z, tags.pack())
    assert set(out) == {"lesion", "quality", "healthy"}
    _, stats = multilevel_info_nce(z, tags, comcl_levels(), 0.1)
    for name, info in out.items():
        assert info["reduction_type"] == "element"
        assert info["indices"].tolist() == stats[name].valid.nonzero()[:, 0].tolist()
        torch.testing.assert_close(info["losses"].mean(), stats[name].loss, **TOL64)


def test_adapter_level_without_valid_anchor_is_zero(device: torch.device) -> None:
    tags = ViewTags(kind=[1, 1, 1], quality=[0, 0, 0], source=[0, 0, 0]).to(device)
    z = randn((3, 4), 4, device).requires_grad_(True)
    loss = MultiLevelInfoNCELoss([Level.instance()])(z, tags.pack())
    assert loss.item() == 0.0
    assert torch.equal(grads(loss, z), torch.zeros_like(z))


def test_adapter_indices_tuple_restricts_pairs(device: torch.device) -> None:
    tags = four_views(device)
    levels = comcl_levels()
    z = randn((10, 8), 5, device).requires_grad_(True)
    masks = level_masks(tags, levels)
    pos = torch.stack([m.positives for m in masks]).any(0)
    neg = torch.stack([m.negatives for m in masks]).any(0)
    gen = torch.Generator().manual_seed(0)
    keep_pos = pos & (torch.rand(10, 10, generator=gen) < 0.7).to(device)
    keep_neg = neg & (torch.rand(10, 10, generator=gen) < 0.7).to(device)
    a1, p = keep_pos.nonzero(as_tuple=True)
    a2, n = keep_neg.nonzero(as_tuple=True)
    loss = MultiLevelInfoNCELoss(levels)(z, tags.pack(), indices_tuple=(a1, p, a2, n))
    expected, _ = multilevel_info_nce(z, tags, levels, 0.1, pair_mask=(keep_pos, keep_neg), impl="reference")
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)
    # the miner's own pairs restrict nothing
    mined = MultiLevelMiner(levels)(z, tags.pack())
    full, _ = multilevel_info_nce(z, tags, levels, 0.1)
    torch.testing.assert_close(MultiLevelInfoNCELoss(levels)(z, tags.pack(), indices_tuple=mined), full, **TOL64)


def test_adapter_triplets_become_pairs(device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 6, device)
    a, p, n = torch.tensor([0, 0, 5]), torch.tensor([1, 1, 6]), torch.tensor([8, 9, 3])
    loss = MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), indices_tuple=(a, p, n))
    pos = torch.zeros(10, 10, dtype=torch.bool, device=device)
    neg = torch.zeros(10, 10, dtype=torch.bool, device=device)
    pos[a, p] = True
    neg[a, n] = True
    expected, _ = multilevel_info_nce(z, tags, comcl_levels(), 0.1, pair_mask=(pos, neg), impl="reference")
    torch.testing.assert_close(loss, expected, **TOL64)
    with pytest.raises(ValueError, match="`indices_tuple`"):
        MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), indices_tuple=(a, p))


def test_adapter_reference_set_supplies_negatives(device: torch.device) -> None:
    tags = four_views(device)
    ref_tags = four_views(device, offset=10)
    z = randn((10, 8), 7, device).requires_grad_(True)
    ref = randn((10, 8), 8, device)
    levels = comcl_levels()
    loss = MultiLevelInfoNCELoss(levels)(z, tags.pack(), ref_emb=ref, ref_labels=ref_tags.pack())
    bank_levels = [dataclasses.replace(lv, in_batch_negatives=False) for lv in levels]
    expected, _ = multilevel_info_nce(z, tags, bank_levels, 0.1, bank=(ref, ref_tags))
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"temperature": 0.0}, ValueError, "`temperature`", id="temperature-0"),
        pytest.param({"temperature": -1.0}, ValueError, "`temperature`", id="temperature-neg"),
        pytest.param({"distance": LpDistance()}, ValueError, "cosine similarity", id="distance"),
        pytest.param({"levels": []}, ValueError, "`levels`", id="no-levels"),
        pytest.param({"levels": ["lesion"]}, TypeError, "`levels`", id="not-a-level"),
        pytest.param({"levels": [Level.instance(), Level.instance()]}, ValueError, "unique level names", id="dup"),
        pytest.param({"levels": [Level("a.b"), Level("c")]}, ValueError, "level names", id="dotted-name"),
    ],
)
def test_adapter_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MultiLevelInfoNCELoss(**kwargs)  # type: ignore[arg-type]


def test_adapter_rejects_bad_calls(device: torch.device) -> None:
    z = randn((10, 8), 9, device)
    loss_fn = MultiLevelInfoNCELoss(comcl_levels())
    with pytest.raises(ValueError, match="`labels`"):
        loss_fn(z)
    with pytest.raises(ValueError, match="packed tags >= 0"):
        loss_fn(z, -torch.ones(10, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="`ref_labels`"):
        loss_fn.compute_loss(z, four_views(device).pack(), None, z.clone(), None)
    no_label = four_views(device)
    no_label = ViewTags(kind=no_label.kind, quality=no_label.quality, source=no_label.source)
    with pytest.raises(ValueError, match="tags.label"):
        MultiLevelInfoNCELoss([Level.supervised()])(z, no_label.pack())


# --------------------------------------------------------------------------- cross-batch memory


def test_plain_cross_batch_memory_refuses_our_loss() -> None:
    with pytest.raises(Exception, match="not supported for MultiLevelInfoNCELoss"):  # noqa: PT011 (PML raises Exception)
        CrossBatchMemory(MultiLevelInfoNCELoss(), embedding_size=8)
    assert "MultiLevelInfoNCELoss" in MultiLevelCrossBatchMemory.supported_losses()
    assert set(CrossBatchMemory.supported_losses()) < set(MultiLevelCrossBatchMemory.supported_losses())


def test_cross_batch_memory_first_batch_is_bank_of_itself(device: torch.device) -> None:
    tags = four_views(device)
    levels = comcl_levels()
    z = randn((10, 8), 10, device).requires_grad_(True)
    memory = MultiLevelCrossBatchMemory(MultiLevelInfoNCELoss(levels), embedding_size=8, memory_size=25).to(device)
    loss = memory(z, tags.pack())
    bank_levels = [dataclasses.replace(lv, in_batch_negatives=False) for lv in levels]
    expected, _ = multilevel_info_nce(z, tags, bank_levels, 0.1, bank=(z.detach(), tags))
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


def test_cross_batch_memory_trains(device: torch.device) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).to(device)
    memory = MultiLevelCrossBatchMemory(MultiLevelInfoNCELoss(comcl_levels()), embedding_size=8, memory_size=25)
    memory = memory.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(4):  # 4 batches of 10 into a memory of 25: it wraps around
        tags = four_views(device, offset=10 * step)  # globally unique sources and images
        x = torch.randn(10, 6, device=device)
        loss = memory(model(x), tags.pack())
        assert torch.isfinite(loss)
        assert loss.item() > 0
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert memory.has_been_filled
    assert memory.queue_idx == 40 % 25
    # slots hold the last 25 of the 40 embeddings: batch 1 items 5-9, batch 2, batch 3
    sources = set(ViewTags.unpack(memory.label_memory).source.tolist())
    assert sources == {12, 13, 20, 21, 22, 23, 30, 31, 32, 33}
    assert (memory.embedding_memory.norm(dim=1) > 0).all()


# --------------------------------------------------------------------------- miner


@given(tags=random_tags(min_size=1, max_size=9, label=True), levels=random_levels())
def test_miner_pairs_equal_level_masks(tags: ViewTags, levels: list[Level]) -> None:
    miner = MultiLevelMiner(levels)
    by_level = miner.pairs_by_level(tags.pack())
    assert list(by_level) == [lv.name for lv in levels]
    for lv, m in zip(levels, level_masks(tags, levels), strict=True):
        a1, p, a2, n = by_level[lv.name]
        pos = torch.zeros_like(m.positives)
        neg = torch.zeros_like(m.negatives)
        pos[a1, p] = True
        neg[a2, n] = True
        assert torch.equal(pos, m.positives)
        assert torch.equal(neg, m.negatives)
        assert len(a1) == int(m.positives.sum())
        assert len(a2) == int(m.negatives.sum())


@given(
    tags=random_tags(min_size=1, max_size=9, label=True),
    ref=random_tags(min_size=1, max_size=6, label=True),
    levels=random_levels(),
)
def test_miner_with_reference_set(tags: ViewTags, ref: ViewTags, levels: list[Level]) -> None:
    if (tags.image is None) != (ref.image is None):
        ref = ViewTags(kind=ref.kind, quality=ref.quality, source=ref.source, label=ref.label)
        tags = ViewTags(kind=tags.kind, quality=tags.quality, source=tags.source, label=tags.label)
    by_level = MultiLevelMiner(levels).pairs_by_level(tags.pack(), ref.pack())
    for lv in levels:
        a1, p, a2, n = by_level[lv.name]
        neg = torch.zeros(len(tags), len(ref), dtype=torch.bool)
        neg[a2, n] = True
        assert torch.equal(neg, bank_negative_mask(tags, ref, lv))
        key, ref_key = (tags.source, ref.source) if lv.relation == "source" else (tags.label, ref.label)
        assert key is not None
        assert ref_key is not None
        for i, j in zip(a1.tolist(), p.tolist(), strict=True):
            assert int(key[i]) == int(ref_key[j])
            assert lv.anchors(tags)[i]
            assert lv.positives(ref)[j]
        expected = lv.anchors(tags)[:, None] & (key[:, None] == ref_key[None, :]) & lv.positives(ref)[None, :]
        assert len(a1) == int(expected.sum())


def test_miner_union_and_single_level(device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 11, device)
    levels = comcl_levels()
    masks = level_masks(tags, levels)
    a1, p, a2, n = MultiLevelMiner(levels)(z, tags.pack())
    pos = torch.zeros(10, 10, dtype=torch.bool, device=device)
    neg = torch.zeros(10, 10, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    assert len(a1) == int(pos.sum())  # no duplicates
    assert len(a2) == int(neg.sum())
    assert torch.equal(pos, torch.stack([m.positives for m in masks]).any(0))
    assert torch.equal(neg, torch.stack([m.negatives for m in masks]).any(0))
    h1, hp, _, _ = MultiLevelMiner(levels, level="healthy")(z, tags.pack())
    assert torch.stack([h1, hp], 1).tolist() == [[4, 3], [9, 8]]
    with pytest.raises(ValueError, match="`level`.*'lesions'"):
        MultiLevelMiner(levels, level="lesions")


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
)
def test_miner_feeds_pml_ntxent(dtype: torch.dtype, device: torch.device) -> None:
    """Instance-level pairs from the miner make PML's NTXentLoss the library's instance level."""
    source = torch.arange(6, device=device).repeat(2)
    tags = ViewTags(kind=torch.ones_like(source), quality=(torch.arange(12, device=device) >= 6).long(), source=source)
    z = randn((12, 8), 12, device, dtype).requires_grad_(True)
    pairs = MultiLevelMiner([Level.instance()])(z, tags.pack())
    loss = NTXentLoss(temperature=0.2)(z, tags.pack(), indices_tuple=pairs)
    expected, _ = multilevel_info_nce(z, tags, Level.instance(), 0.2)
    tol = TOL64 if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **tol)
    # any level's pairs run through PML losses
    for name, (a1, p, a2, n) in MultiLevelMiner(comcl_levels()).pairs_by_level(four_views(device).pack()).items():
        out = NTXentLoss()(randn((10, 8), 13, device, dtype), four_views(device).pack(), indices_tuple=(a1, p, a2, n))
        assert torch.isfinite(out), name


def test_miner_inside_cross_batch_memory_with_ntxent(device: torch.device) -> None:
    memory = CrossBatchMemory(NTXentLoss(), embedding_size=8, memory_size=30, miner=MultiLevelMiner(comcl_levels()))
    memory = memory.to(device)
    for step in range(2):
        loss = memory(torch.randn(10, 8, device=device), four_views(device, offset=10 * step).pack())
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------- SelfPacedReducer


def anchor_spl(lam: float | PaceSchedule = 1.0, regularizer: str = "linear") -> SelfPacedWeighting:
    schedule = lam if isinstance(lam, PaceSchedule) else PaceSchedule.constant(lam)
    return SelfPacedWeighting(regularizer, schedule, target="anchors")  # type: ignore[arg-type]


@pytest.mark.parametrize("regularizer", ["hard", "linear"])
def test_self_paced_reducer_with_pml_supcon(regularizer: str, device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 14, device).requires_grad_(True)
    spl = anchor_spl(3.0, regularizer)
    loss = SupConLoss(temperature=0.1, reducer=SelfPacedReducer(spl))(z, tags.label)
    elements = SupConLoss(temperature=0.1, reducer=DoNothingReducer())(z, tags.label)["loss"]["losses"]
    v = spl(elements.detach())
    expected = (v * elements).mean()
    assert 0 < int((v > 0).sum()) <= 10
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


def test_self_paced_reducer_with_pair_loss_and_our_loss(device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 15, device).requires_grad_(True)
    spl = anchor_spl(8.0)
    ntxent = NTXentLoss(temperature=0.2, reducer=SelfPacedReducer(spl))(z, tags.source)
    pairs = NTXentLoss(temperature=0.2, reducer=DoNothingReducer())(z, tags.source)["loss"]["losses"]
    torch.testing.assert_close(ntxent, (spl(pairs.detach()) * pairs).mean(), **TOL64)
    levels = comcl_levels()
    ours = MultiLevelInfoNCELoss(levels, reducer=SelfPacedReducer(spl))(z, tags.pack())
    expected = sum((spl(x.detach()) * x).mean() for x in _per_level_elements(z, tags, levels))
    torch.testing.assert_close(ours, expected, **TOL64)


def test_self_paced_reducer_follows_the_callers_pace(device: torch.device) -> None:
    """PML deep-copies reducers; the copy must still follow the weighting the caller steps."""
    tags = four_views(device)
    z = randn((10, 8), 16, device)
    spl = anchor_spl(PaceSchedule.linear(start=0.01, end=100.0, steps=1), "hard")
    loss_fn = SupConLoss(temperature=0.1, reducer=SelfPacedReducer(spl))
    assert loss_fn(z, tags.label).item() == 0.0  # lambda 0.01: every anchor is too hard
    spl.step()
    full = SupConLoss(temperature=0.1, reducer=MeanReducer())(z, tags.label)
    torch.testing.assert_close(loss_fn(z, tags.label), full, **TOL64)  # lambda 100: all admitted
    clone = copy.deepcopy(loss_fn)
    assert clone.reducer.weighting is spl


def test_self_paced_reducer_rejects_negative_weighting() -> None:
    with pytest.raises(ValueError, match="`weighting`.*anchors"):
        SelfPacedReducer(SelfPacedWeighting("linear", target="negatives"))
    with pytest.raises(ValueError, match="`weighting`"):
        SelfPacedReducer("linear")  # type: ignore[arg-type]
