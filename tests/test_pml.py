"""Tests of mlcl_losses.pml: the pytorch-metric-learning loss, miner, cross-batch memory and reducer."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner, PairMarginMiner, TripletMarginMiner
from pytorch_metric_learning.reducers import DoNothingReducer

from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.levels import Level, bank_negative_mask, comcl_levels, level_masks
from mlcl_losses.pml import (
    MultiLevelCrossBatchMemory,
    MultiLevelInfoNCELoss,
    MultiLevelMiner,
)
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
    tags = ViewTags(kind=[1, 1, 1], quality=[0, 0, 0], source=[1, 1, 1]).to(device)  # one source: no negative
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
    with pytest.warns(UserWarning, match="without any anchor-positive-negative pair"):
        loss = MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), indices_tuple=(a, p, n))
    pos = torch.zeros(10, 10, dtype=torch.bool, device=device)
    neg = torch.zeros(10, 10, dtype=torch.bool, device=device)
    pos[a, p] = True
    neg[a, n] = True
    expected, _ = multilevel_info_nce(z, tags, comcl_levels(), 0.1, pair_mask=(pos, neg), impl="reference")
    torch.testing.assert_close(loss, expected, **TOL64)
    with pytest.raises(ValueError, match="`indices_tuple` of length 3.*got length 2"):
        MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), indices_tuple=(a, p))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"temperature": 0.0}, ValueError, "`temperature`", id="temperature-0"),
        pytest.param({"temperature": -1.0}, ValueError, "`temperature`", id="temperature-neg"),
        pytest.param({"distance": LpDistance()}, ValueError, "`distance`.*default CosineSimilarity", id="distance"),
        pytest.param({"distance": CosineSimilarity(power=2)}, ValueError, "`distance`.*power=2", id="cosine-power-2"),
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


@pytest.mark.parametrize(
    ("indices", "error", "match"),
    [
        pytest.param(([-1], [1], [0], [3]), ValueError, r"`indices_tuple` a1 in \[0, 9\].*got -1", id="a1=-1"),
        pytest.param(([0], [99], [0], [3]), ValueError, r"`indices_tuple` p in \[0, 9\].*got 99", id="p=99"),
        pytest.param(([0], [1], [0], [-1]), ValueError, r"`indices_tuple` n in \[0, 9\].*got -1", id="n=-1"),
        pytest.param(([0], [1], [10]), ValueError, r"`indices_tuple` negatives n in \[0, 9\].*got 10", id="triplet"),
        pytest.param(([0, 1], [1], [0], [3]), ValueError, r"`indices_tuple` a1, p of one length", id="lengths"),
        pytest.param(([0.0], [1.0], [0.0], [3.0]), TypeError, "`indices_tuple` a1 to be an integer tensor", id="float"),
        pytest.param("pairs", TypeError, "`indices_tuple` to be a tuple", id="not-a-tuple"),
    ],
)
def test_adapter_validates_indices_tuple(indices: object, error: type[Exception], match: str) -> None:
    """Issue 18: -1 used to wrap to the last row and 99 gave an IndexError naming nothing."""
    tags = four_views(torch.device("cpu"))
    z = randn((10, 8), 30, torch.device("cpu"))
    as_tensors = indices if isinstance(indices, str) else tuple(torch.tensor(x) for x in indices)  # type: ignore[union-attr]
    with pytest.raises(error, match=match):
        MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), indices_tuple=as_tensors)


def test_adapter_validates_indices_into_the_reference_set() -> None:
    tags = four_views(torch.device("cpu"))
    z, ref = randn((10, 8), 31, torch.device("cpu")), randn((4, 8), 32, torch.device("cpu"))
    pairs = (torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"`indices_tuple` p in \[0, 3\] \(rows of `ref_emb`\), but got 4"):
        MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), pairs, ref, tags[:4].pack())
    with pytest.raises(ValueError, match=r"`ref_emb` of shape \(M, 8\)"):
        MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), None, ref[:, :5], tags[:4].pack())


@pytest.mark.parametrize(
    "miner",
    [
        pytest.param(PairMarginMiner(pos_margin=0.2, neg_margin=0.8), id="PairMarginMiner"),
        pytest.param(TripletMarginMiner(margin=0.2), id="TripletMarginMiner"),
        pytest.param(MultiSimilarityMiner(), id="MultiSimilarityMiner"),
    ],
)
def test_pml_miner_pairs_that_starve_a_level_are_warned_once(miner: object) -> None:
    """Item 3: PML miners pair equal packed labels only, so cross-view levels get no pair."""
    tags = ViewTags.cat([four_views(torch.device("cpu"), offset=4 * b) for b in range(2)])
    z = randn((20, 8), 33, torch.device("cpu"))
    loss_fn = MultiLevelInfoNCELoss(comcl_levels())
    with pytest.warns(UserWarning, match="without any anchor-positive-negative pair") as record:
        loss_fn(z, tags.pack(), miner(z, tags.pack()))  # type: ignore[operator]
    starved = [str(w.message).split("'")[1] for w in record if "without any" in str(w.message)]
    assert {"healthy", "quality"} <= set(starved)  # the lesion level too if the miner found no hard lesion pair
    assert len(starved) == len(set(starved))
    assert all("MultiLevelMiner" in str(w.message) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(z, tags.pack(), miner(z, tags.pack()))  # type: ignore[operator]  # once per level
        MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), MultiLevelMiner(comcl_levels())(z, tags.pack()))


def test_no_warning_when_a_level_has_no_pair_anyway() -> None:
    tags = four_views(torch.device("cpu"))
    lesion_only = tags[tags.kind == 1]  # no healthy patch: no negatives for any level
    z = randn((len(lesion_only), 8), 34, torch.device("cpu"))
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(MultiLevelInfoNCELoss(comcl_levels())(z, lesion_only.pack(), pairs)) == 0.0


# --------------------------------------------------------------------------- cross-batch memory


def test_plain_cross_batch_memory_refuses_our_loss() -> None:
    with pytest.raises(Exception, match="not supported for MultiLevelInfoNCELoss"):  # noqa: PT011 (PML raises Exception)
        CrossBatchMemory(MultiLevelInfoNCELoss(), embedding_size=8)
    assert "MultiLevelInfoNCELoss" in MultiLevelCrossBatchMemory.supported_losses()
    assert set(CrossBatchMemory.supported_losses()) < set(MultiLevelCrossBatchMemory.supported_losses())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"embedding_size": 8, "memory_size": 0}, ValueError, r"`memory_size` >= 1, but got 0"),
        ({"embedding_size": 0}, ValueError, r"`embedding_size` >= 1, but got 0"),
        ({"embedding_size": 8, "memory_size": 2.5}, TypeError, r"`memory_size` to be an int, but got float 2.5"),
        ({"embedding_size": True}, TypeError, r"`embedding_size` to be an int, but got bool"),
    ],
    ids=["memory-zero", "embedding-zero", "memory-float", "embedding-bool"],
)
def test_cross_batch_memory_refuses_bad_sizes(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MultiLevelCrossBatchMemory(MultiLevelInfoNCELoss(), **kwargs)  # type: ignore[arg-type]


def test_cross_batch_memory_refuses_bad_calls() -> None:
    memory = MultiLevelCrossBatchMemory(MultiLevelInfoNCELoss(), embedding_size=8, memory_size=6)
    cpu = torch.device("cpu")
    tags = four_views(cpu).pack()
    with pytest.raises(
        ValueError, match=r"`embeddings` of shape \(N, 8\) \(the memory's `embedding_size`\).*\(10, 5\)"
    ):
        memory(randn((10, 5), 0, cpu, torch.float32), tags)
    with pytest.raises(ValueError, match=r"at most `memory_size` \(6\) entries to enqueue per call, but got 10"):
        memory(randn((10, 8), 0, cpu, torch.float32), tags)
    with pytest.raises(ValueError, match=r"`labels` of shape \(5,\)"):
        memory(randn((5, 8), 0, cpu, torch.float32), tags)
    with pytest.raises(TypeError, match=r"`enqueue_mask` to be a bool tensor"):
        memory(randn((10, 8), 0, cpu, torch.float32), tags, enqueue_mask=torch.ones(10))
    assert memory.queue_idx == 0  # nothing was enqueued
    mask = torch.tensor([True] * 5 + [False] * 5)  # 5 enqueued fit a memory of 6
    assert torch.isfinite(memory(randn((10, 8), 0, cpu, torch.float32), tags, enqueue_mask=mask))


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


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2, 3, 3], [3, 1, 2, 0], [1]], ids=["pairs", "one-each", "one"])
def test_adapter_and_miner_warn_on_plain_class_labels(labels: list[int]) -> None:
    """Values all in [0, 3] decode as one source (loss 0 whatever the embeddings): a warning, not an error,
    because one patch's views in a batch of their own (a short last batch) pack to the same values."""
    z = randn((len(labels), 8), 3, torch.device("cpu")).requires_grad_(True)
    match = r"`labels` to be packed ViewTags.*ViewTags\(kind, quality, source, \.\.\.\)\.pack\(\).*class labels"
    with pytest.warns(UserWarning, match=match):
        loss = MultiLevelInfoNCELoss()(z, torch.tensor(labels))
    assert loss.item() == 0.0
    with pytest.warns(UserWarning, match=match):
        MultiLevelMiner()(z, torch.tensor(labels))
    # a batch of source 0 with a reference set of other sources is packed tags: no warning, a real loss
    ref = four_views(torch.device("cpu"), offset=1)
    ref_z = randn((len(ref), 8), 4, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loss = MultiLevelInfoNCELoss()(z, torch.tensor(labels), ref_emb=ref_z, ref_labels=ref.pack())
    assert torch.isfinite(loss)


def test_adapter_takes_one_patchs_views_as_a_batch() -> None:
    """A legitimate one-source batch (the views of one lesion and its healthy patch share source 0 here)
    trains on: loss 0 and a warning, as the core loss gives, never an exception."""
    tags = ViewTags(kind=[0, 0, 1, 1], quality=[0, 1, 0, 1], source=[0, 0, 0, 0])
    z = randn((4, 8), 6, torch.device("cpu")).requires_grad_(True)
    with pytest.warns(UserWarning, match="class labels"):
        loss = MultiLevelInfoNCELoss()(z, tags.pack())
    loss.backward()
    assert loss.item() == 0.0


def test_adapter_warns_once_when_no_level_has_an_anchor(caplog: pytest.LogCaptureFixture) -> None:
    loss_fn = MultiLevelInfoNCELoss()
    tags = ViewTags(kind=[1, 1, 0, 0], quality=[0, 1, 0, 1], source=[5, 5, 5, 5])  # one source: no negative
    z = randn((4, 8), 5, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="mlcl_losses.pml"):
        assert loss_fn(z, tags.pack()).item() == 0.0
        assert loss_fn(z, tags.pack()).item() == 0.0
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "loss is 0" in warned[0].getMessage()
    assert "packed ViewTags (ViewTags.pack())" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlcl_losses.pml"):
        loss_fn(randn((10, 8), 6, torch.device("cpu")), four_views(torch.device("cpu")).pack())
    assert not caplog.records  # a batch with anchors logs nothing


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
