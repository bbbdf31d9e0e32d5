"""PML reducers on our loss, and :class:`~mlcl_losses.pml.SelfPacedReducer` on every PML loss's output.

PML's reducers take per-element, per-pair and per-triplet losses of shape ``(P,)`` or ``(P, 1)``
and already-reduced losses; each case is checked against the reduction written out by hand from
the loss's own unreduced output (``DoNothingReducer``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import NTXentLoss, SupConLoss
from pytorch_metric_learning.reducers import (
    AvgNonZeroReducer,
    ClassWeightedReducer,
    DivisorReducer,
    DoNothingReducer,
    MeanReducer,
    MultipleReducers,
    PerAnchorReducer,
    SumReducer,
    ThresholdReducer,
)

from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.levels import Level, comcl_levels
from mlcl_losses.pml import MultiLevelInfoNCELoss, SelfPacedReducer
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting
from mlcl_losses.tags import ViewTags
from test_pml import TOL64, four_views, grads, randn

# --------------------------------------------------------------------------- every PML reducer on our loss


def per_level_elements(z: torch.Tensor, tags: ViewTags, levels: list[Level]) -> list[torch.Tensor]:
    none, stats = multilevel_info_nce(z, tags, levels, 0.1, reduction="none", impl="reference")
    return [row[stats[lv.name].valid] for row, lv in zip(none, levels, strict=True)]


def _avg_above(x: torch.Tensor, low: float) -> torch.Tensor:
    kept = x[x > low]
    return kept.mean() if kept.numel() else x.sum() * 0


OUR_LOSS_REDUCERS: dict[str, tuple[Callable[[], Any], Callable[[torch.Tensor], torch.Tensor]]] = {
    "MeanReducer": (MeanReducer, lambda x: x.mean()),
    "SumReducer": (SumReducer, lambda x: x.sum()),
    "AvgNonZeroReducer": (AvgNonZeroReducer, lambda x: _avg_above(x, 0.0)),
    "ThresholdReducer": (lambda: ThresholdReducer(low=2.5), lambda x: _avg_above(x, 2.5)),
    "PerAnchorReducer": (PerAnchorReducer, lambda x: x.mean()),  # element losses are per anchor already
    "SelfPacedReducer": (
        lambda: SelfPacedReducer(SelfPacedWeighting("linear", PaceSchedule.constant(4.0), target="anchors")),
        lambda x: ((1 - x.detach() / 4.0).clamp(0, 1) * x).mean(),
    ),
}


@pytest.mark.parametrize("name", list(OUR_LOSS_REDUCERS))
@pytest.mark.parametrize("n_levels", [1, 3], ids=["one-level", "three-levels"])
def test_every_pml_reducer_on_our_loss(name: str, n_levels: int, device: torch.device) -> None:
    make, reduce = OUR_LOSS_REDUCERS[name]
    tags = four_views(device)
    levels = [Level.instance()] if n_levels == 1 else comcl_levels(1.0, 0.5, 2.0)
    z = randn((10, 8), 40, device).requires_grad_(True)
    loss = MultiLevelInfoNCELoss(levels, reducer=make())(z, tags.pack())
    expected = sum(reduce(x) for x in per_level_elements(z, tags, levels))
    torch.testing.assert_close(loss, expected, **TOL64)
    torch.testing.assert_close(grads(loss, z), grads(expected, z), **TOL64)


def test_multiple_reducers_on_our_levels(device: torch.device) -> None:
    tags = four_views(device)
    levels = comcl_levels()
    z = randn((10, 8), 41, device)
    reducer = MultipleReducers({"lesion": SumReducer()}, default_reducer=MeanReducer())
    loss = MultiLevelInfoNCELoss(levels, reducer=reducer)(z, tags.pack())
    lesion, quality, healthy = per_level_elements(z, tags, levels)
    torch.testing.assert_close(loss, lesion.sum() + quality.mean() + healthy.mean(), **TOL64)


@pytest.mark.parametrize(
    "reducer",
    [
        pytest.param(lambda: ClassWeightedReducer(torch.ones(4)), id="ClassWeightedReducer"),
        pytest.param(lambda: DivisorReducer(), id="DivisorReducer"),
        pytest.param(lambda: PerAnchorReducer(DivisorReducer()), id="PerAnchor-Divisor"),
        pytest.param(lambda: MultipleReducers({"quality": ClassWeightedReducer(torch.ones(4))}), id="Multiple"),
    ],
)
def test_reducers_our_loss_cannot_feed_are_refused(reducer: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="`reducer`"):
        MultiLevelInfoNCELoss(comcl_levels(), reducer=reducer())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n_levels", [1, 3], ids=["one-level", "three-levels"])
def test_half_precision_loss_is_float32_whatever_the_reducer(dtype: torch.dtype, n_levels: int) -> None:
    tags = four_views(torch.device("cpu"))
    levels = [Level.instance()] if n_levels == 1 else comcl_levels()
    z = randn((10, 8), 42, torch.device("cpu"), dtype).requires_grad_(True)
    loss = MultiLevelInfoNCELoss(levels)(z, tags.pack())
    assert loss.dtype == torch.float32
    expected, _ = multilevel_info_nce(z, tags, levels, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert grads(loss, z).dtype == dtype


# --------------------------------------------------------------------------- SelfPacedReducer on every PML loss

N_CLASSES = 4
# constructors of every PML loss that takes (embeddings, labels) and a reducer
PML_LOSSES: dict[str, Callable[[], Any]] = {
    "AngularLoss": lambda: pml_losses.AngularLoss(),
    "ArcFaceLoss": lambda: pml_losses.ArcFaceLoss(N_CLASSES, 8),
    "CircleLoss": lambda: pml_losses.CircleLoss(),
    "ContrastiveLoss": lambda: pml_losses.ContrastiveLoss(),
    "CosFaceLoss": lambda: pml_losses.CosFaceLoss(N_CLASSES, 8),
    "DynamicSoftMarginLoss": lambda: pml_losses.DynamicSoftMarginLoss(),
    "FastAPLoss": lambda: pml_losses.FastAPLoss(),
    "GeneralizedLiftedStructureLoss": lambda: pml_losses.GeneralizedLiftedStructureLoss(),
    "HistogramLoss": lambda: pml_losses.HistogramLoss(),
    "InstanceLoss": lambda: pml_losses.InstanceLoss(),
    "IntraPairVarianceLoss": lambda: pml_losses.IntraPairVarianceLoss(),
    "LargeMarginSoftmaxLoss": lambda: pml_losses.LargeMarginSoftmaxLoss(N_CLASSES, 8),
    "LiftedStructureLoss": lambda: pml_losses.LiftedStructureLoss(),
    "MarginLoss": lambda: pml_losses.MarginLoss(),
    "MultiSimilarityLoss": lambda: pml_losses.MultiSimilarityLoss(),
    "NCALoss": lambda: pml_losses.NCALoss(),
    "NPairsLoss": lambda: pml_losses.NPairsLoss(),
    "NTXentLoss": lambda: pml_losses.NTXentLoss(),
    "NormalizedSoftmaxLoss": lambda: pml_losses.NormalizedSoftmaxLoss(N_CLASSES, 8),
    "PNPLoss": lambda: pml_losses.PNPLoss(),
    "ProxyAnchorLoss": lambda: pml_losses.ProxyAnchorLoss(N_CLASSES, 8),
    "ProxyNCALoss": lambda: pml_losses.ProxyNCALoss(N_CLASSES, 8),
    "SignalToNoiseRatioContrastiveLoss": lambda: pml_losses.SignalToNoiseRatioContrastiveLoss(),
    "SoftTripleLoss": lambda: pml_losses.SoftTripleLoss(N_CLASSES, 8),
    "SphereFaceLoss": lambda: pml_losses.SphereFaceLoss(N_CLASSES, 8),
    "SubCenterArcFaceLoss": lambda: pml_losses.SubCenterArcFaceLoss(num_classes=N_CLASSES, embedding_size=8),
    "SupConLoss": lambda: pml_losses.SupConLoss(),
    "ThresholdConsistentMarginLoss": lambda: pml_losses.ThresholdConsistentMarginLoss(),
    "TripletMarginLoss": lambda: pml_losses.TripletMarginLoss(),
    "TupletMarginLoss": lambda: pml_losses.TupletMarginLoss(),
}


def pml_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(43)
    return torch.randn(20, 8, generator=gen, dtype=torch.float64), torch.arange(N_CLASSES).repeat(5)


def spl_reducer(lam: float) -> SelfPacedReducer:
    return SelfPacedReducer(SelfPacedWeighting("linear", PaceSchedule.constant(lam), target="anchors"))


def build(name: str, reducer: Any) -> Any:
    """The PML loss with ``reducer``; its parameters (proxies...) drawn identically for every reducer."""
    torch.manual_seed(0)
    loss = PML_LOSSES[name]()
    loss.set_reducer(reducer)
    return loss.double()


def by_hand(info: dict[str, Any], lam: float) -> torch.Tensor:
    """The self-paced mean written out: one linear weight per loss entry; already reduced passes through."""
    losses = info["losses"]
    if info["reduction_type"] == "already_reduced":
        return losses if torch.is_tensor(losses) else torch.tensor(float(losses), dtype=torch.float64)
    weights = (1 - losses.detach() / lam).clamp(0, 1)
    return (weights * losses).mean()


@pytest.mark.parametrize("name", list(PML_LOSSES))
def test_self_paced_reducer_on_every_pml_loss(name: str) -> None:
    emb, labels = pml_batch()
    unreduced = build(name, DoNothingReducer())(emb, labels)
    shapes = {
        info["reduction_type"]: tuple(info["losses"].shape) if torch.is_tensor(info["losses"]) else ()
        for info in unreduced.values()
    }
    assert set(shapes) <= {"element", "pos_pair", "neg_pair", "triplet", "already_reduced"}
    # an infinite pace admits everything: PML's MeanReducer
    torch.testing.assert_close(build(name, spl_reducer(math.inf))(emb, labels), build(name, MeanReducer())(emb, labels))
    # a finite pace: the weighted mean of each sub-loss, summed
    lam = 0.5
    expected = sum(by_hand(info, lam) for info in unreduced.values())
    torch.testing.assert_close(build(name, spl_reducer(lam))(emb, labels), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "CircleLoss", "LiftedStructureLoss", "TupletMarginLoss"])
def test_self_paced_reducer_takes_column_losses(name: str) -> None:
    """Item 1: losses of shape ``(P, 1)`` are weighted entry by entry, not refused."""
    emb, labels = pml_batch()
    (info,) = build(name, DoNothingReducer())(emb, labels).values()
    assert info["losses"].dim() == 2
    assert info["losses"].shape[1] == 1
    emb = emb.clone().requires_grad_(True)
    loss = build(name, spl_reducer(0.5))(emb, labels)
    assert torch.isfinite(loss)
    assert torch.isfinite(grads(loss, emb)).all()


def test_self_paced_reducer_errors_speak_of_losses() -> None:
    reducer = spl_reducer(1.0)
    with pytest.raises(ValueError, match="SelfPacedReducer got 'pos_pair' losses containing NaN"):
        reducer.pos_pair_reduction(torch.tensor([1.0, float("nan")]), None, None, None)
    with pytest.raises(TypeError, match="SelfPacedReducer expected 'element' losses as a float tensor"):
        reducer.element_reduction(torch.tensor([1, 2]), None, None, None)
    zero = reducer(
        {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}, torch.ones(2, 3), None
    )
    assert float(zero) == 0.0


# --------------------------------------------------------------------------- SelfPacedReducer basics


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
    expected = sum((spl(x.detach()) * x).mean() for x in per_level_elements(z, tags, levels))
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
    with pytest.raises(ValueError, match="`weighting` with target='anchors'.*got target='negatives'"):
        SelfPacedReducer(SelfPacedWeighting("linear", target="negatives"))
    with pytest.raises(TypeError, match="`weighting`.*got str"):
        SelfPacedReducer("linear")  # type: ignore[arg-type]
