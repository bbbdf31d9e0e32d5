"""Tests of mlcl_losses.levels: Select, Level, comcl_levels, level_masks, bank_negative_mask.

The hypothesis strategies for random tags and random levels defined here are also used by
test_functional.py and test_pml.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlcl_losses.levels import (
    Level,
    Select,
    bank_negative_mask,
    comcl_levels,
    level_masks,
    validate_levels,
)
from mlcl_losses.tags import Kind, Quality, ViewTags

LESION, HEALTHY = int(Kind.LESION), int(Kind.HEALTHY)
HIGH, LOW = int(Quality.HIGH), int(Quality.LOW)


# --------------------------------------------------------------------------- strategies


@st.composite
def random_tags(
    draw: st.DrawFn,
    min_size: int = 1,
    max_size: int = 10,
    label: bool | None = None,
    image: bool | None = None,
    source_offset: int = 0,
) -> ViewTags:
    """Small random tags: few sources, labels and images so that all relations occur."""
    n = draw(st.integers(min_size, max_size))

    def ints(upper: int, offset: int = 0) -> list[int]:
        return [offset + v for v in draw(st.lists(st.integers(0, upper), min_size=n, max_size=n))]

    with_label = draw(st.booleans()) if label is None else label
    with_image = draw(st.booleans()) if image is None else image
    return ViewTags(
        kind=ints(1),
        quality=ints(1),
        source=ints(max(1, n // 3), source_offset),
        label=ints(2) if with_label else None,
        image=ints(n) if with_image else None,
    )


selects = st.builds(
    Select,
    kind=st.sampled_from([None, None, LESION, HEALTHY]),
    quality=st.sampled_from([None, None, HIGH, LOW]),
)


@st.composite
def random_level(draw: st.DrawFn, name: str = "level", allow_label: bool = True) -> Level:
    """A random level: random selectors, relation, flags and weight."""
    return Level(
        name=name,
        anchors=draw(selects),
        positives=draw(selects),
        relation=draw(st.sampled_from(["source", "label"] if allow_label else ["source"])),
        negatives=draw(selects),
        weight=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        exclude_same_label=draw(st.booleans()) if allow_label else False,
        in_batch_negatives=draw(st.sampled_from([True, True, False])),
        bank_negatives=draw(st.booleans()),
    )


@st.composite
def random_levels(draw: st.DrawFn, allow_label: bool = True, max_levels: int = 3) -> list[Level]:
    n = draw(st.integers(1, max_levels))
    return [draw(random_level(name=f"level{i}", allow_label=allow_label)) for i in range(n)]


# --------------------------------------------------------------------------- naive rules


def naive_is_negative(tags: ViewTags, i: int, other: ViewTags, j: int, level: Level) -> bool:
    """The never-negative rules of levels.py written per pair (other = batch or bank)."""
    if int(other.source[j]) == int(tags.source[i]):
        return False
    if tags.image is not None and other.image is not None and int(other.image[j]) == int(tags.image[i]):
        return False
    if level.needs_label and tags.label is not None and other.label is not None:
        if int(other.label[j]) == int(tags.label[i]):
            return False
    return select_ok(level.negatives, other, j)


def select_ok(select: Select, tags: ViewTags, j: int) -> bool:
    return (select.kind is None or int(tags.kind[j]) == select.kind) and (
        select.quality is None or int(tags.quality[j]) == select.quality
    )


def naive_masks(tags: ViewTags, level: Level) -> tuple[list[bool], list[list[bool]], list[list[bool]]]:
    n = len(tags)
    anchors = [select_ok(level.anchors, tags, i) for i in range(n)]
    key = tags.source if level.relation == "source" else tags.label
    assert key is not None
    pos = [
        [anchors[i] and i != j and int(key[i]) == int(key[j]) and select_ok(level.positives, tags, j) for j in range(n)]
        for i in range(n)
    ]
    neg = [
        [
            anchors[i] and level.in_batch_negatives and i != j and naive_is_negative(tags, i, tags, j, level)
            for j in range(n)
        ]
        for i in range(n)
    ]
    return anchors, pos, neg


def four_views(device: torch.device) -> ViewTags:
    """One lesion box (V1a, V1b, V2) and one healthy patch (V3, V4), then a second of each."""
    return ViewTags(
        kind=torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 0, 0], device=device),
        quality=torch.tensor([0, 0, 1, 0, 1, 0, 0, 1, 0, 1], device=device),
        source=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3], device=device),
        image=torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2], device=device),
    )


# --------------------------------------------------------------------------- Select


def test_select_predicates(device: torch.device) -> None:
    tags = four_views(device)
    assert Select()(tags).all()
    assert Select(kind=LESION)(tags).tolist() == (tags.kind == 1).tolist()
    assert Select(kind=HEALTHY, quality=LOW)(tags).tolist() == [False, False, False, False, True] * 2
    assert Select(quality=HIGH)(tags).device.type == device.type


def test_select_str() -> None:
    assert str(Select()) == "any"
    assert str(Select(kind=LESION, quality=LOW)) == "kind=LESION, quality=LOW"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"kind": 2}, "`kind`.*2", id="kind-2"),
        pytest.param({"quality": -1}, "`quality`.*-1", id="quality-neg"),
        pytest.param({"kind": "lesion"}, "`kind`", id="kind-string"),
    ],
)
def test_select_rejects_unknown_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Select(**kwargs)  # type: ignore[arg-type]


def test_select_on_2d_tags(device: torch.device) -> None:
    tags = four_views(device)[torch.tensor([[0, 3], [4, 2]], device=device)]
    assert Select(kind=LESION)(tags).tolist() == [[True, False], [False, True]]


# --------------------------------------------------------------------------- Level


def test_level_presets() -> None:
    inst = Level.instance(weight=0.5)
    assert (inst.name, inst.relation, inst.weight, inst.needs_label) == ("instance", "source", 0.5, False)
    sup = Level.supervised()
    assert (sup.name, sup.relation, sup.needs_label) == ("supervised", "label", True)
    assert Level(exclude_same_label=True).needs_label


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"relation": "image"}, ValueError, "`relation`.*'image'", id="relation"),
        pytest.param({"weight": -0.1}, ValueError, "`weight`.*-0.1", id="negative-weight"),
        pytest.param({"weight": float("nan")}, ValueError, "`weight`", id="nan-weight"),
        pytest.param({"weight": float("inf")}, ValueError, "`weight`", id="inf-weight"),
        pytest.param({"anchors": 1}, TypeError, "`anchors`", id="anchors-not-select"),
        pytest.param({"negatives": {"kind": 1}}, TypeError, "`negatives`", id="negatives-not-select"),
    ],
)
def test_level_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Level(**kwargs)  # type: ignore[arg-type]


def test_comcl_levels_table() -> None:
    lesion, quality, healthy = comcl_levels()
    assert lesion == Level("lesion", Select(LESION, HIGH), Select(quality=HIGH), "source", Select(kind=HEALTHY))
    assert quality == Level("quality", Select(LESION, LOW), Select(quality=HIGH), "source", Select(kind=HEALTHY))
    assert healthy == Level("healthy", Select(HEALTHY, LOW), Select(quality=HIGH), "source", Select(kind=LESION))


@pytest.mark.parametrize(
    ("weights", "names"),
    [
        pytest.param((1.0, 0.0, 1.0), ["lesion", "healthy"], id="no-quality"),
        pytest.param((0.0, 0.0, 2.0), ["healthy"], id="healthy-only"),
        pytest.param((0.0, 0.0, 0.0), [], id="none"),
    ],
)
def test_comcl_levels_drops_zero_weights(weights: tuple[float, float, float], names: list[str]) -> None:
    levels = comcl_levels(*weights)
    assert [lv.name for lv in levels] == names
    assert all(lv.weight == w for lv, w in zip(levels, [w for w in weights if w > 0], strict=True))


def test_comcl_levels_negative_weight_raises() -> None:
    with pytest.raises(ValueError, match="`weight`"):
        comcl_levels(quality_weight=-1.0)


def test_validate_levels() -> None:
    assert validate_levels(Level.instance()) == [Level.instance()]
    with pytest.raises(ValueError, match="`levels`"):
        validate_levels([])
    with pytest.raises(TypeError, match="`levels`.*str"):
        validate_levels(["instance"])  # type: ignore[list-item]
    tags = ViewTags(kind=[1], quality=[0], source=[0])
    with pytest.raises(ValueError, match="tags.label"):
        validate_levels([Level.supervised()], tags)
    with pytest.raises(ValueError, match="tags.label"):
        level_masks(tags, [Level(exclude_same_label=True)])


# --------------------------------------------------------------------------- level_masks


def test_comcl_masks_on_four_views(device: torch.device) -> None:
    tags = four_views(device)
    lesion, quality, healthy = level_masks(tags, comcl_levels())
    # lesion: anchors V1a/V1b, positive the other high-quality view, negatives healthy patches of other images
    assert lesion.anchors.nonzero()[:, 0].tolist() == [0, 1, 5, 6]
    assert lesion.positives.nonzero().tolist() == [[0, 1], [1, 0], [5, 6], [6, 5]]
    # patches 3, 4 share image 0 with the first box, so they are not its negatives
    assert lesion.negatives[0].nonzero()[:, 0].tolist() == [8, 9]
    assert lesion.negatives[5].nonzero()[:, 0].tolist() == [3, 4, 8, 9]
    # quality: anchor V2, positives V1a and V1b
    assert quality.positives.nonzero().tolist() == [[2, 0], [2, 1], [7, 5], [7, 6]]
    # healthy: anchor V4, positive V3, negatives lesion views of other images
    assert healthy.anchors.nonzero()[:, 0].tolist() == [4, 9]
    assert healthy.positives.nonzero().tolist() == [[4, 3], [9, 8]]
    assert healthy.negatives[4].nonzero()[:, 0].tolist() == [5, 6, 7]
    assert healthy.negatives[9].nonzero()[:, 0].tolist() == [0, 1, 2, 5, 6, 7]


def test_in_batch_negatives_off(device: torch.device) -> None:
    (masks,) = level_masks(four_views(device), [Level(in_batch_negatives=False)])
    assert not masks.negatives.any()
    assert masks.positives.any()


@given(tags=random_tags(label=True), levels=random_levels())
def test_level_masks_match_the_rules(tags: ViewTags, levels: list[Level]) -> None:
    for level, masks in zip(levels, level_masks(tags, levels), strict=True):
        anchors, pos, neg = naive_masks(tags, level)
        assert masks.anchors.dtype == torch.bool
        assert masks.anchors.tolist() == anchors
        assert masks.positives.tolist() == pos
        assert masks.negatives.tolist() == neg


@given(tags=random_tags(), levels=random_levels(allow_label=False))
def test_masks_never_pair_self_source_or_image(tags: ViewTags, levels: list[Level]) -> None:
    n = len(tags)
    eye = torch.eye(n, dtype=torch.bool)
    same_source = tags.source[:, None] == tags.source[None, :]
    for level, m in zip(levels, level_masks(tags, levels), strict=True):
        assert not (m.positives & eye).any()
        assert not (m.negatives & eye).any()
        assert not (m.negatives & same_source).any()
        if tags.image is not None:
            assert not (m.negatives & (tags.image[:, None] == tags.image[None, :])).any()
        assert not (m.positives & m.negatives).any()
        assert not m.positives[~m.anchors].any()
        assert not m.negatives[~m.anchors].any()
        assert (m.positives <= same_source).all()
        assert (m.negatives <= level.negatives(tags)[None, :]).all()
        assert (m.positives <= level.positives(tags)[None, :]).all()


@given(tags=random_tags(label=True), levels=random_levels())
def test_label_levels_never_pair_same_label_as_negative(tags: ViewTags, levels: list[Level]) -> None:
    assert tags.label is not None
    same_label = tags.label[:, None] == tags.label[None, :]
    for level, m in zip(levels, level_masks(tags, levels), strict=True):
        if level.needs_label:
            assert not (m.negatives & same_label).any()
        if level.relation == "label":
            assert (m.positives <= same_label).all()


@given(tags=random_tags(min_size=2), levels=random_levels(allow_label=False), data=st.data())
def test_level_masks_permutation_equivariant(tags: ViewTags, levels: list[Level], data: st.DataObject) -> None:
    perm = torch.tensor(data.draw(st.permutations(range(len(tags)))))
    for a, b in zip(level_masks(tags, levels), level_masks(tags[perm], levels), strict=True):
        assert torch.equal(a.anchors[perm], b.anchors)
        assert torch.equal(a.positives[perm][:, perm], b.positives)
        assert torch.equal(a.negatives[perm][:, perm], b.negatives)


def test_level_masks_on_device(device: torch.device) -> None:
    (m,) = level_masks(four_views(device), [Level.instance()])
    assert m.positives.device.type == device.type
    assert m.positives.shape == (10, 10)


# --------------------------------------------------------------------------- bank_negative_mask


@given(
    tags=random_tags(label=True),
    bank=random_tags(label=True, max_size=6),
    level=random_level(),
    same_images=st.booleans(),
)
def test_bank_negative_mask_matches_the_rules(tags: ViewTags, bank: ViewTags, level: Level, same_images: bool) -> None:
    if not same_images:  # bank without image tags: images are then not compared
        bank = ViewTags(kind=bank.kind, quality=bank.quality, source=bank.source, label=bank.label)
    mask = bank_negative_mask(tags, bank, level)
    assert mask.shape == (len(tags), len(bank))
    for i in range(len(tags)):
        for j in range(len(bank)):
            expected = level.bank_negatives and select_ok(level.anchors, tags, i)
            expected = expected and naive_is_negative(tags, i, bank, j, level)
            assert bool(mask[i, j]) == expected, (i, j)


@given(tags=random_tags(label=True), bank=random_tags(label=True, max_size=6), level=random_level(), data=st.data())
def test_bank_negative_mask_per_anchor_candidates(
    tags: ViewTags, bank: ViewTags, level: Level, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, 4))
    size = len(tags) * k
    idx = torch.tensor(data.draw(st.lists(st.integers(0, len(bank) - 1), min_size=size, max_size=size)))
    idx = idx.reshape(len(tags), k)
    mask = bank_negative_mask(tags, bank[idx], level)
    full = bank_negative_mask(tags, bank, level)
    assert mask.shape == (len(tags), k)
    assert torch.equal(mask, torch.gather(full, 1, idx))


def test_bank_negative_mask_excludes_source_and_image(device: torch.device) -> None:
    tags = four_views(device)
    bank = ViewTags(
        kind=torch.tensor([0, 0, 0, 1], device=device),
        quality=torch.tensor([1, 1, 0, 0], device=device),
        source=torch.tensor([0, 7, 8, 9], device=device),
        image=torch.tensor([9, 0, 9, 9], device=device),
    )
    mask = bank_negative_mask(tags, bank, comcl_levels()[0])
    # entry 0 shares the first box's source, entry 1 its image, entry 3 is a lesion
    assert mask[0].tolist() == [False, False, True, False]
    assert mask[5].tolist() == [True, True, True, False]
    assert not mask[2].any()  # not an anchor of the lesion level
    off = bank_negative_mask(tags, bank, Level(bank_negatives=False))
    assert off.shape == (10, 4)
    assert not off.any()
