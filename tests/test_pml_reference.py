"""PML adapters with a reference set: ``ref_emb``, mined pairs that index it, and the cross-batch memory.

The cross-batch-memory checks follow pytorch-metric-learning's own sanity check (written anew for
our adapters): with the memory as large as the batch, the memory's loss is the inner loss.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pytorch_metric_learning import miners
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import common_functions as c_f

from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.levels import Level, comcl_levels
from mlcl_losses.pml import MultiLevelCrossBatchMemory, MultiLevelInfoNCELoss, MultiLevelMiner
from mlcl_losses.tags import ViewTags
from test_levels import naive_is_negative, random_levels, random_tags, select_ok
from test_pml import TOL64, four_views, grads, randn

CPU = torch.device("cpu")

# --------------------------------------------------------------------------- naive oracle


def naive_reference_loss(
    z: torch.Tensor,
    tags: ViewTags,
    ref: torch.Tensor,
    ref_tags: ViewTags,
    levels: list[Level],
    temperature: float,
    pos_pairs: set[tuple[int, int]] | None = None,
    neg_pairs: set[tuple[int, int]] | None = None,
) -> float:
    """The loss written per anchor from its equation: anchors from the batch, candidates from ``ref``."""
    zn = z.detach().double() / z.detach().double().norm(dim=1, keepdim=True)
    rn = ref.detach().double() / ref.detach().double().norm(dim=1, keepdim=True)
    total = 0.0
    for level in levels:
        per_anchor = []
        for i in range(len(tags)):
            if not select_ok(level.anchors, tags, i):
                continue
            key = tags.source if level.relation == "source" else tags.label
            ref_key = ref_tags.source if level.relation == "source" else ref_tags.label
            assert key is not None
            assert ref_key is not None
            pos = [
                j
                for j in range(len(ref_tags))
                if int(key[i]) == int(ref_key[j])
                and select_ok(level.positives, ref_tags, j)
                and (pos_pairs is None or (i, j) in pos_pairs)
            ]
            neg = [
                j
                for j in range(len(ref_tags))
                if level.bank_negatives
                and naive_is_negative(tags, i, ref_tags, j, level)
                and (neg_pairs is None or (i, j) in neg_pairs)
            ]
            if not pos or not neg:
                continue
            s = [float(zn[i] @ rn[j]) / temperature for j in range(len(ref_tags))]
            neg_sum = sum(math.exp(s[j]) for j in neg)
            per_anchor.append(sum(-math.log(math.exp(s[p]) / (math.exp(s[p]) + neg_sum)) for p in pos) / len(pos))
        if per_anchor:
            total += level.weight * sum(per_anchor) / len(per_anchor)
    return total


# --------------------------------------------------------------------------- ref_emb: PML's convention


@given(
    tags=random_tags(min_size=1, max_size=7, label=True, image=False),
    ref_tags=random_tags(min_size=1, max_size=7, label=True, image=False),
    levels=random_levels(),
    seed=st.integers(0, 2**31 - 1),
    mined=st.booleans(),
)
def test_reference_set_supplies_positives_and_negatives(
    tags: ViewTags, ref_tags: ViewTags, levels: list[Level], seed: int, mined: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(tags), 4, generator=gen, dtype=torch.float64)
    ref = torch.randn(len(ref_tags), 4, generator=gen, dtype=torch.float64)
    pos_pairs = neg_pairs = None
    indices = None
    if mined:  # a random subset of all (anchor, reference) pairs
        keep_pos = torch.rand(len(tags), len(ref_tags), generator=gen) < 0.6
        keep_neg = torch.rand(len(tags), len(ref_tags), generator=gen) < 0.6
        a1, p = keep_pos.nonzero(as_tuple=True)
        a2, n = keep_neg.nonzero(as_tuple=True)
        indices = (a1, p, a2, n)
        pos_pairs = set(zip(a1.tolist(), p.tolist(), strict=True))
        neg_pairs = set(zip(a2.tolist(), n.tolist(), strict=True))
    with warnings.catch_warnings():  # a mined subset may leave a level without pairs: warned elsewhere
        warnings.simplefilter("ignore")
        loss = MultiLevelInfoNCELoss(levels, temperature=0.5)(z, tags.pack(), indices, ref, ref_tags.pack())
    expected = naive_reference_loss(z, tags, ref, ref_tags, levels, 0.5, pos_pairs, neg_pairs)
    assert math.isclose(float(loss), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_mined_positives_index_the_reference_set(device: torch.device) -> None:
    """Item 2: ``(a1, p)`` given with a reference set restricts the positives to those reference rows."""
    tags = four_views(device)
    z = randn((10, 8), 20, device).requires_grad_(True)
    ref = randn((10, 8), 21, device)
    loss_fn = MultiLevelInfoNCELoss([Level.instance()])
    full = loss_fn(z, tags.pack(), ref_emb=ref, ref_labels=tags.pack())
    a1, p = torch.tensor([0, 1, 5]), torch.tensor([2, 2, 7])  # one positive each for three anchors
    a2, n = torch.arange(10).repeat_interleave(10), torch.arange(10).repeat(10)
    mined = loss_fn(z, tags.pack(), (a1, p, a2, n), ref, tags.pack())
    expected = naive_reference_loss(z, tags, ref, tags, [Level.instance()], 0.1, {(0, 2), (1, 2), (5, 7)}, None)
    assert math.isclose(float(mined.detach()), expected, rel_tol=1e-9)
    assert not math.isclose(float(mined), float(full), rel_tol=1e-3)  # the restriction has an effect
    assert grads(mined, z).abs().sum() > 0


def test_positive_views_given_only_in_ref_emb_are_positives(device: torch.device) -> None:
    """Item 4: high-quality views passed as ``ref_emb`` are the positives of the batch's low-quality anchors."""
    tags = four_views(device)
    high = tags.quality == 0
    z = randn((10, 8), 22, device)
    loss_fn = MultiLevelInfoNCELoss(comcl_levels(), reducer=None)
    low_tags, high_tags = tags[~high], tags[high]
    loss = loss_fn(z[~high], low_tags.pack(), ref_emb=z[high], ref_labels=high_tags.pack())
    expected = naive_reference_loss(z[~high], low_tags, z[high], high_tags, comcl_levels(), 0.1)
    assert expected > 0
    assert math.isclose(float(loss), expected, rel_tol=1e-9)
    # quality anchors (V2) find their V1 positives and healthy anchors (V4) their V3 positives
    from pytorch_metric_learning.reducers import DoNothingReducer

    out = MultiLevelInfoNCELoss(comcl_levels(), reducer=DoNothingReducer())(
        z[~high], low_tags.pack(), ref_emb=z[high], ref_labels=high_tags.pack()
    )
    assert out["quality"]["indices"].numel() == 2
    assert out["healthy"]["indices"].numel() == 2


def test_reference_set_gradients_reach_both_sides(device: torch.device) -> None:
    tags = four_views(device)
    z = randn((10, 8), 23, device).requires_grad_(True)
    ref = randn((10, 8), 24, device).requires_grad_(True)
    loss = MultiLevelInfoNCELoss(comcl_levels())(z, tags.pack(), ref_emb=ref, ref_labels=tags.pack())
    gz, gr = torch.autograd.grad(loss, (z, ref))
    assert gz.abs().sum() > 0
    assert gr.abs().sum() > 0
    # the same loss as the in-batch function on the joint rows, restricted to the batch-to-reference block
    joint = torch.cat([z, ref])
    pos = torch.zeros(20, 20, dtype=torch.bool, device=device)
    pos[:10, 10:] = True
    expected, _ = multilevel_info_nce(
        joint, ViewTags.cat([tags, tags]), comcl_levels(), 0.1, pair_mask=(pos, pos), impl="reference"
    )
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(gz, grads(expected, z), **TOL64)


# --------------------------------------------------------------------------- cross-batch memory sanity check


def tags_of(setup: str, offset: int = 0) -> tuple[ViewTags, list[Level]]:
    if setup == "instance":  # 5 sources with 4 views each, all of one kind and quality
        source = torch.arange(5).repeat_interleave(4) + offset
        return ViewTags(kind=torch.ones_like(source), quality=torch.zeros_like(source), source=source), [
            Level.instance()
        ]
    return ViewTags.cat([four_views(torch.device("cpu"), offset=offset + 4 * b) for b in range(2)]), comcl_levels()


PML_MINERS = {
    "AngularMiner": lambda: miners.AngularMiner(angle=20),
    "BatchEasyHardMiner": lambda: miners.BatchEasyHardMiner(),
    "BatchHardMiner": lambda: miners.BatchHardMiner(),
    "DistanceWeightedMiner": lambda: miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
    "HDCMiner": lambda: miners.HDCMiner(filter_percentage=0.5),
    "MultiSimilarityMiner": lambda: miners.MultiSimilarityMiner(epsilon=0.1),
    "PairMarginMiner": lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    "TripletMarginMiner": lambda: miners.TripletMarginMiner(margin=0.1),
    "UniformHistogramMiner": lambda: miners.UniformHistogramMiner(num_bins=10, pos_per_bin=5, neg_per_bin=5),
}
# These miners choose differently when the memory holds the anchor itself (its copy is the easiest
# positive) or draw at random; PML's own NTXentLoss fails the sanity check with them too. With a
# memory of the batch they are checked on the pairs the memory passed instead.
SELF_SENSITIVE = {"BatchEasyHardMiner", "DistanceWeightedMiner", "HDCMiner", "UniformHistogramMiner"}
MINER_IDS = ["no-miner", "MultiLevelMiner", *PML_MINERS]


def make_miner(name: str, levels: list[Level]) -> BaseMiner | None:
    if name == "no-miner":
        return None
    if name == "MultiLevelMiner":
        return MultiLevelMiner(levels)
    return PML_MINERS[name]()


def recording(loss_fn: MultiLevelInfoNCELoss) -> dict[str, object]:
    """Keep the ``indices_tuple`` the memory passes to ``loss_fn`` (in the returned dict)."""
    seen: dict[str, object] = {}
    compute = loss_fn.compute_loss

    def compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels):  # type: ignore[no-untyped-def]
        seen["indices_tuple"] = indices_tuple
        return compute(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    loss_fn.compute_loss = compute_loss  # type: ignore[method-assign]
    return seen


@pytest.mark.filterwarnings("ignore:`indices_tuple` leaves level")
@pytest.mark.parametrize("setup", ["instance", "comcl"])
@pytest.mark.parametrize("miner_name", MINER_IDS)
@pytest.mark.parametrize("enqueue", [False, True], ids=["memory-is-batch", "enqueue-mask"])
def test_cross_batch_memory_sanity_check(setup: str, miner_name: str, enqueue: bool) -> None:
    tags, levels = tags_of(setup)
    n = len(tags)
    for seed in range(2):
        loss_fn = MultiLevelInfoNCELoss(levels, temperature=0.5)
        seen = recording(loss_fn)
        miner = make_miner(miner_name, levels)
        memory = MultiLevelCrossBatchMemory(loss_fn, embedding_size=8, memory_size=n, miner=miner)
        if enqueue:  # queries (not enqueued) then keys of the same tags (enqueued)
            labels = ViewTags.cat([tags, tags]).pack()
            z = randn((2 * n, 8), seed, torch.device("cpu"))
            mask = torch.arange(2 * n) >= n
            torch.manual_seed(seed)
            got = memory(z, labels, enqueue_mask=mask)
            torch.manual_seed(seed)
            pairs = (miner or MultiLevelMiner(levels))(z[:n], labels[:n], z[n:], labels[n:])
            expected = loss_fn(z, labels, c_f.shift_indices_tuple(pairs, n))
        else:
            labels = tags.pack()
            z = randn((n, 8), seed, torch.device("cpu")).requires_grad_(True)
            torch.manual_seed(seed)
            got = memory(z, labels)
            passed = seen["indices_tuple"]
            torch.manual_seed(seed)
            if miner_name in SELF_SENSITIVE:  # the memory is the batch: ref index j is batch row j
                expected = loss_fn(z, labels, passed)  # type: ignore[arg-type]
            else:
                expected = loss_fn(z, labels, None if miner is None else miner(z, labels))
        torch.testing.assert_close(got, expected, **TOL64)


def test_cross_batch_memory_holds_old_batches_as_candidates() -> None:
    levels = comcl_levels()
    memory = MultiLevelCrossBatchMemory(MultiLevelInfoNCELoss(levels), embedding_size=8, memory_size=25)
    z1, t1 = randn((10, 8), 30, torch.device("cpu")), four_views(torch.device("cpu"), offset=0)
    memory(z1, t1.pack())
    # the second batch repeats the first batch's sources (an epoch later): their old views are positives
    z2 = randn((10, 8), 31, torch.device("cpu"))
    loss = memory(z2, t1.pack())
    mem_z, mem_t = torch.cat([z1, z2]), ViewTags.cat([t1, t1])
    pairs = MultiLevelMiner(levels)(z2, t1.pack(), mem_z, mem_t.pack())
    a1, p, a2, n = pairs
    keep = p != a1 + 10  # the memory removes each anchor's own copy
    expected = naive_reference_loss(
        z2,
        t1,
        mem_z,
        mem_t,
        levels,
        0.1,
        set(zip(a1[keep].tolist(), p[keep].tolist(), strict=True)),
        set(zip(a2.tolist(), n.tolist(), strict=True)),
    )
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_memory_mixing_tags_with_and_without_image_says_what_differs() -> None:
    memory = MultiLevelCrossBatchMemory(MultiLevelInfoNCELoss(), embedding_size=8, memory_size=30)
    memory(randn((10, 8), 32, torch.device("cpu")), four_views(torch.device("cpu")).pack())
    no_image = four_views(torch.device("cpu"), offset=10, image=False)
    with pytest.raises(ValueError, match=r"`image` for 10 of 20 entries.*same optional tags") as info:
        memory(randn((10, 8), 33, torch.device("cpu")), no_image.pack())
    assert "not made by" not in str(info.value)


# --------------------------------------------------------------------------- the function under the adapter


def test_positive_pair_mask_over_the_bank_makes_it_a_reference_set() -> None:
    """``pair_mask`` positives of width ``N + M`` admit related bank entries as positives, nothing else."""
    tags, ref_tags = four_views(CPU), four_views(CPU, offset=0)
    z, ref = randn((10, 8), 35, CPU), randn((10, 8), 36, CPU)
    levels = [dataclasses.replace(lv, in_batch_negatives=False) for lv in comcl_levels()]
    pos = torch.zeros(10, 20, dtype=torch.bool)
    pos[:, 10:] = True
    loss, _ = multilevel_info_nce(z, tags, levels, 0.1, bank=(ref, ref_tags), pair_mask=(pos, None))
    expected = naive_reference_loss(z, tags, ref, ref_tags, comcl_levels(), 0.1)
    assert math.isclose(float(loss), expected, rel_tol=1e-9)
    # an (N, N) positive mask keeps the bank out of the positives (the bank gives negatives only)
    batch_pos = torch.ones(10, 10, dtype=torch.bool)
    plain, _ = multilevel_info_nce(z, tags, comcl_levels(), 0.1, bank=(ref, ref_tags))
    masked, _ = multilevel_info_nce(z, tags, comcl_levels(), 0.1, bank=(ref, ref_tags), pair_mask=(batch_pos, None))
    torch.testing.assert_close(masked, plain, **TOL64)


@pytest.mark.parametrize(
    ("pair_mask", "candidates", "match"),
    [
        pytest.param(
            (torch.ones(10, 12, dtype=torch.bool), None),
            None,
            r"positives .*\(10, 10\) or \(10, 14\)",
            id="pos",
        ),
        pytest.param((None, torch.ones(10, 10, dtype=torch.bool)), None, r"negatives .*\(10, 14\)", id="neg"),
        pytest.param((torch.ones(10, 10), None), None, "positives a bool tensor", id="float"),
        pytest.param(
            (torch.ones(10, 14, dtype=torch.bool), None),
            torch.zeros(10, 2, dtype=torch.long),
            r"positives .* \(10, 10\), but",
            id="cand",
        ),
    ],
)
def test_bad_pair_masks_are_refused(pair_mask: tuple, candidates: torch.Tensor | None, match: str) -> None:
    tags = four_views(CPU)
    with pytest.raises(ValueError, match=f"`pair_mask` {match}"):
        multilevel_info_nce(
            randn((10, 8), 37, CPU),
            tags,
            comcl_levels(),
            0.1,
            bank=(randn((4, 8), 38, CPU), tags[:4]),
            candidates=candidates,
            pair_mask=pair_mask,
        )
