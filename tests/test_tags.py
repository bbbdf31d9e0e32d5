"""Tests of mlcl_losses.tags: ViewTags, Kind, Quality, pack/unpack."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlcl_losses.tags import MAX_IMAGE, MAX_LABEL, MAX_PACKED, MAX_SOURCE, Kind, Quality, ViewTags


@st.composite
def valid_tags(draw: st.DrawFn, max_size: int = 12) -> ViewTags:
    """Random valid tags over the whole packable range (extremes included)."""
    n = draw(st.integers(1, max_size))

    def ints(upper: int) -> list[int]:
        values = st.one_of(st.integers(0, upper), st.sampled_from([0, upper]))
        return draw(st.lists(values, min_size=n, max_size=n))

    return ViewTags(
        kind=ints(1),
        quality=ints(1),
        source=ints(MAX_SOURCE),
        label=ints(MAX_LABEL) if draw(st.booleans()) else None,
        image=ints(MAX_IMAGE) if draw(st.booleans()) else None,
    )


def _example(device: torch.device) -> ViewTags:
    return ViewTags(
        kind=torch.tensor([1, 1, 0, 0], device=device),
        quality=torch.tensor([0, 1, 0, 1], device=device),
        source=torch.tensor([0, 0, 1, 1], device=device),
        label=torch.tensor([2, 2, 0, 0], device=device),
        image=torch.tensor([5, 5, 5, 5], device=device),
    )


# --------------------------------------------------------------------------- construction


def test_enums() -> None:
    assert int(Kind.HEALTHY) == 0
    assert int(Kind.LESION) == 1
    assert int(Quality.HIGH) == 0
    assert int(Quality.LOW) == 1


def test_sequences_become_int64(device: torch.device) -> None:
    tags = ViewTags(kind=[1, 0], quality=(0, 1), source=torch.tensor([3, 4], dtype=torch.int32, device=device))
    for name, value in tags.fields().items():
        if value is not None:
            assert value.dtype == torch.int64, name
    assert tags.label is None
    assert tags.image is None
    assert len(tags) == 2
    assert tags.shape == (2,)


def test_device_follows_kind(device: torch.device) -> None:
    tags = _example(device)
    assert tags.device.type == device.type
    assert tags.to("cpu").device.type == "cpu"


def test_indexing_clone_equal_cat(device: torch.device) -> None:
    tags = _example(device)
    sub = tags[tags.kind == Kind.LESION]
    assert sub.source.tolist() == [0, 0]
    assert sub.label is not None
    assert sub.label.tolist() == [2, 2]
    assert tags[1:3].quality.tolist() == [1, 0]
    assert tags[torch.tensor([3, 0], device=device)].source.tolist() == [1, 0]
    clone = tags.clone()
    assert clone.equal(tags)
    assert clone.kind.data_ptr() != tags.kind.data_ptr()
    both = ViewTags.cat([tags, tags[:2]])
    assert len(both) == 6
    assert both[4:].equal(tags[:2])
    assert not tags.equal(tags[:3])
    no_label = ViewTags(kind=tags.kind, quality=tags.quality, source=tags.source, image=tags.image)
    assert not tags.equal(no_label)


def test_cat_mixed_optional_raises(device: torch.device) -> None:
    tags = _example(device)
    no_label = ViewTags(kind=tags.kind, quality=tags.quality, source=tags.source, image=tags.image)
    with pytest.raises(ValueError, match="`label`"):
        ViewTags.cat([tags, no_label])
    with pytest.raises(ValueError, match="at least one"):
        ViewTags.cat([])


def test_repr_mentions_optional() -> None:
    text = repr(ViewTags(kind=[1], quality=[0], source=[0], label=[1]))
    assert "label" in text
    assert "image" not in text


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        pytest.param("kind", [0.0, 1.0], TypeError, "`kind`.*integer", id="float-kind"),
        pytest.param("quality", torch.tensor([0.5, 1.0]), TypeError, "`quality`.*integer", id="float-quality"),
        pytest.param("source", [0.0, 1.0], TypeError, "`source`.*integer", id="float-source"),
        pytest.param("label", [0.0, 1.0], TypeError, "`label`.*integer", id="float-label"),
        pytest.param("image", torch.tensor([True, False]), TypeError, "`image`.*integer", id="bool-image"),
        pytest.param("kind", "ab", TypeError, "`kind`", id="string-kind"),
        pytest.param("kind", [2, 0], ValueError, "`kind`.*got 2", id="unknown-kind"),
        pytest.param("kind", [-1, 0], ValueError, "`kind`.*got -1", id="negative-kind"),
        pytest.param("quality", [0, 3], ValueError, "`quality`.*got 3", id="unknown-quality"),
        pytest.param("source", [-1, 0], ValueError, "`source`.*got -1", id="negative-source"),
        pytest.param("source", [0, MAX_SOURCE + 1], ValueError, "`source`", id="source-too-large"),
        pytest.param("label", [0, MAX_LABEL + 1], ValueError, "`label`", id="label-too-large"),
        pytest.param("image", [-3, 0], ValueError, "`image`.*got -3", id="negative-image"),
        pytest.param("image", [0, 1, 2], ValueError, "`image`.*shape", id="shape-mismatch"),
    ],
)
def test_bad_tags_raise(field: str, value: object, error: type[Exception], match: str) -> None:
    args: dict[str, object] = {"kind": [1, 0], "quality": [0, 1], "source": [0, 1]}
    args[field] = value
    with pytest.raises(error, match=match):
        ViewTags(**args)  # type: ignore[arg-type]


def test_empty_tags_are_valid() -> None:
    tags = ViewTags(kind=torch.zeros(0, dtype=torch.long), quality=[], source=[])
    assert len(tags) == 0


def test_validate_false_skips_checks() -> None:
    tags = ViewTags(kind=[7], quality=[0], source=[0], validate=False)
    assert tags.kind.tolist() == [7]


# --------------------------------------------------------------------------- packing


def test_pack_layout_is_documented() -> None:
    tags = ViewTags(kind=[1], quality=[1], source=[3], label=[4], image=[2])
    packed = int(tags.pack()[0])
    assert packed & 1 == 1
    assert (packed >> 1) & 1 == 1
    assert (packed >> 2) & ((1 << 13) - 1) == 5
    assert (packed >> 15) & ((1 << 24) - 1) == 3
    assert packed >> 39 == 3


def test_pack_extremes_fit_int64() -> None:
    tags = ViewTags(kind=[1], quality=[1], source=[MAX_SOURCE], label=[MAX_LABEL], image=[MAX_IMAGE])
    packed = tags.pack()
    assert packed.dtype == torch.int64
    assert int(packed[0]) >= 0
    assert ViewTags.unpack(packed).equal(tags)


@given(tags=valid_tags())
def test_pack_unpack_round_trip(tags: ViewTags) -> None:
    packed = tags.pack()
    assert packed.dtype == torch.int64
    assert packed.shape == tags.shape
    assert bool((packed >= 0).all())
    assert ViewTags.unpack(packed).equal(tags)


@given(tags=valid_tags())
def test_pack_is_injective(tags: ViewTags) -> None:
    packed = tags.pack()
    for i in range(len(tags)):
        for j in range(len(tags)):
            same = all(v is None or int(v[i]) == int(v[j]) for v in tags.fields().values())
            assert same == (int(packed[i]) == int(packed[j]))


def test_pack_keeps_shape_2d(device: torch.device) -> None:
    tags = _example(device)
    grid = tags[torch.tensor([[0, 1], [2, 3]], device=device)]
    assert grid.pack().shape == (2, 2)
    assert ViewTags.unpack(grid.pack()).equal(grid)


def test_pack_on_device(device: torch.device) -> None:
    tags = _example(device)
    assert tags.pack().device.type == device.type
    assert ViewTags.unpack(tags.pack()).equal(tags)


@pytest.mark.parametrize(
    ("packed", "error", "match"),
    [
        pytest.param(torch.tensor([-1, 0]), ValueError, "packed tags >= 0", id="negative"),
        pytest.param(torch.tensor([0.0, 1.0]), TypeError, "`packed`", id="float"),
        pytest.param(
            ViewTags([1, 1], [0, 0], [0, 1]).pack().int(),
            TypeError,
            f"`packed` of dtype torch.int64.*{MAX_PACKED}.*torch.int32",
            id="narrowed-int32",
        ),
        pytest.param(torch.tensor([1, 3], dtype=torch.int16), TypeError, "torch.int16", id="int16"),
        pytest.param(torch.tensor([1, 3], dtype=torch.uint8), TypeError, "torch.uint8", id="uint8"),
        pytest.param(
            torch.cat([ViewTags([1], [0], [0], label=[1]).pack(), ViewTags([1], [0], [1]).pack()]),
            ValueError,
            "`label`",
            id="label-for-some",
        ),
        pytest.param(
            torch.cat([ViewTags([1], [0], [0], image=[1]).pack(), ViewTags([1], [0], [1]).pack()]),
            ValueError,
            "`image`",
            id="image-for-some",
        ),
    ],
)
def test_unpack_rejects_foreign_values(packed: torch.Tensor, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ViewTags.unpack(packed)


@pytest.mark.parametrize("field", ["kind", "quality", "source"])
@pytest.mark.parametrize("validate", [True, False])
def test_required_field_none_is_a_type_error(field: str, validate: bool) -> None:
    fields: dict[str, object] = {"kind": [1, 0], "quality": [0, 1], "source": [0, 1], field: None}
    with pytest.raises(TypeError, match=f"Expected `{field}` to be an integer tensor or sequence.*got None"):
        ViewTags(**fields, validate=validate)  # type: ignore[arg-type]
