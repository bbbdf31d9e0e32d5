"""View tags: what each embedding of a batch is (content, quality, origin).

Every embedding that enters a loss carries five integer tags (``docs/glossary.md``):

============  =========================================================  ==========
tag           meaning                                                    required
============  =========================================================  ==========
``kind``      :attr:`Kind.LESION` or :attr:`Kind.HEALTHY`                yes
``quality``   :attr:`Quality.HIGH` or :attr:`Quality.LOW`                yes
``source``    id of the patch a view was cut from (V1a, V1b, V2 share)   yes
``label``     disease grade / class id                                   no
``image``     id of the image the patch came from                        no
============  =========================================================  ==========

PyTorch-metric-learning passes one integer label per embedding, so the tags
pack invertibly into one non-negative ``int64`` (:meth:`~mlcl_losses.tags.ViewTags.pack`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Kind", "Quality", "ViewTags"]


class Kind(enum.IntEnum):
    """Content of a patch."""

    #: A patch of healthy tissue.
    HEALTHY = 0
    #: A patch centred on a lesion.
    LESION = 1


class Quality(enum.IntEnum):
    """Image quality a patch was cut from."""

    #: Cut from a high-quality image.
    HIGH = 0
    #: Cut from a low-quality (degraded) image.
    LOW = 1


# Bit layout of a packed label (63 bits, so the packed value is a non-negative int64):
#   bit 0: kind | bit 1: quality | bits 2-14: label + 1 (0 = none)
#   bits 15-38: image + 1 (0 = none) | bits 39-62: source
_LABEL_BITS, _IMAGE_BITS, _SOURCE_BITS = 13, 24, 24
_LABEL_SHIFT = 2
_IMAGE_SHIFT = _LABEL_SHIFT + _LABEL_BITS
_SOURCE_SHIFT = _IMAGE_SHIFT + _IMAGE_BITS
MAX_LABEL = (1 << _LABEL_BITS) - 2
MAX_IMAGE = (1 << _IMAGE_BITS) - 2
MAX_SOURCE = (1 << _SOURCE_BITS) - 1

# The largest packed value (every field at its maximum): only int64 holds the packing.
MAX_PACKED = (MAX_SOURCE << _SOURCE_SHIFT) | ((MAX_IMAGE + 1) << _IMAGE_SHIFT) | ((MAX_LABEL + 1) << _LABEL_SHIFT) | 3

_FIELDS = ("kind", "quality", "source", "label", "image")


def _as_int_tensor(name: str, value: Any, device: torch.device | None) -> Tensor:
    if isinstance(value, Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"Expected `{name}` to be an integer tensor or sequence, but got {value!r}") from err
        if tensor.numel() == 0:  # an empty sequence has no dtype (torch.as_tensor([]) is float)
            return tensor.long()
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to have an integer dtype, but got {tensor.dtype}")
    return tensor.long()


@dataclass(frozen=True, eq=False)
class ViewTags:
    """Tags of a batch of embeddings, one entry per embedding.

    Args:
        kind: ``(N,)`` int64, :attr:`~mlcl_losses.tags.Kind.LESION` (1) or
            :attr:`~mlcl_losses.tags.Kind.HEALTHY` (0).
        quality: ``(N,)`` int64, :attr:`~mlcl_losses.tags.Quality.HIGH` (0) or
            :attr:`~mlcl_losses.tags.Quality.LOW` (1).
        source: ``(N,)`` int64 >= 0, id of the patch each view was cut from.
        label: ``(N,)`` int64 >= 0 or ``None``, disease grade or class.
        image: ``(N,)`` int64 >= 0 or ``None``, id of the source image; patches of
            one image are never each other's negatives.

    Sequences are converted with :func:`torch.as_tensor`; floating-point values, and ``None``
    for ``kind``, ``quality`` or ``source``, raise :class:`TypeError`. All fields must have the
    same shape (normally ``(N,)``; the index returns ``(N, k)`` tags of its hits) and live on
    one device.

    Examples:
        >>> tags = ViewTags(kind=[1, 1, 0], quality=[0, 1, 0], source=[0, 0, 1])
        >>> len(tags)
        3
        >>> ViewTags.unpack(tags.pack()).source.tolist()
        [0, 0, 1]
        >>> tags[tags.kind == Kind.LESION].quality.tolist()
        [0, 1]
    """

    kind: Tensor
    quality: Tensor
    source: Tensor
    label: Tensor | None = None
    image: Tensor | None = None

    def __init__(
        self,
        kind: Any,
        quality: Any,
        source: Any,
        label: Any | None = None,
        image: Any | None = None,
        *,
        validate: bool = True,
    ) -> None:
        for name, required in (("kind", kind), ("quality", quality), ("source", source)):
            if required is None:
                raise TypeError(f"Expected `{name}` to be an integer tensor or sequence (it is required), but got None")
        device = kind.device if isinstance(kind, Tensor) else None
        values = {"kind": kind, "quality": quality, "source": source, "label": label, "image": image}
        for name, value in values.items():
            object.__setattr__(self, name, None if value is None else _as_int_tensor(name, value, device))
        if validate:
            self._validate()

    def _validate(self) -> None:
        shape, device = self.kind.shape, self.kind.device
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape != shape:
                raise ValueError(
                    f"All tags must have the same shape, but `kind` has shape {tuple(shape)} "
                    f"and `{name}` has shape {tuple(value.shape)}"
                )
            if value.device != device:
                raise ValueError(
                    f"All tags must be on one device, but `kind` is on {device} and `{name}` on {value.device}"
                )
        if self.kind.numel() == 0:
            return
        for name, allowed in (("kind", Kind), ("quality", Quality)):
            value = getattr(self, name)
            bad = (value != 0) & (value != 1)
            if bool(bad.any()):
                raise ValueError(
                    f"Expected `{name}` values in {[int(v) for v in allowed]} ({', '.join(a.name for a in allowed)}), "
                    f"but got {int(value[bad][0])}"
                )
        for name, upper in (("source", MAX_SOURCE), ("label", MAX_LABEL), ("image", MAX_IMAGE)):
            value = getattr(self, name)
            if value is None:
                continue
            low, high = int(value.min()), int(value.max())
            if low < 0 or high > upper:
                raise ValueError(f"Expected `{name}` values in [0, {upper}], but got {low if low < 0 else high}")

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        """Number of tagged embeddings (first dimension)."""
        return int(self.kind.shape[0]) if self.kind.dim() > 0 else 1

    @property
    def shape(self) -> torch.Size:
        """Shape shared by all tag tensors."""
        return self.kind.shape

    @property
    def device(self) -> torch.device:
        """Device of the tag tensors."""
        return self.kind.device

    def _map(self, fn: Any) -> ViewTags:
        return ViewTags(
            **{name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in _FIELDS},
            validate=False,
        )

    def __getitem__(self, index: Any) -> ViewTags:
        """Select entries like a tensor: ``tags[mask]``, ``tags[idx]``, ``tags[2:5]``."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> ViewTags:
        """Copy of the tags on ``device``."""
        return self._map(lambda t: t.to(device))

    def clone(self) -> ViewTags:
        """Copy of the tags with their own storage."""
        return self._map(lambda t: t.clone())

    def fields(self) -> dict[str, Tensor | None]:
        """The five tag tensors by name (``None`` for absent optional tags)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def cat(cls, tags: Sequence[ViewTags]) -> ViewTags:
        """Concatenate tags along the first dimension.

        Optional tags must be present in all parts or in none.
        """
        if len(tags) == 0:
            raise ValueError("Expected at least one ViewTags to concatenate, but got an empty sequence")
        merged: dict[str, Any] = {}
        for name in _FIELDS:
            parts = [getattr(t, name) for t in tags]
            present = [p is not None for p in parts]
            if all(present):
                merged[name] = torch.cat(parts)
            elif any(present):
                raise ValueError(f"Cannot concatenate tags where `{name}` is given for some parts and None for others")
            else:
                merged[name] = None
        return cls(**merged)

    def equal(self, other: ViewTags) -> bool:
        """True if every tag tensor (and absence of optional tags) matches ``other``."""
        for name in _FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                return False
            if a is not None and b is not None and not torch.equal(a, b):
                return False
        return True

    # ------------------------------------------------------------------ packing
    def pack(self) -> Tensor:
        """Pack all tags into one non-negative ``int64`` per embedding.

        Returns:
            Tensor of the tags' shape, dtype ``int64``; :meth:`unpack` inverts it.
            Fits the ``labels`` argument of pytorch-metric-learning losses and miners.
        """
        packed = self.kind | (self.quality << 1) | (self.source << _SOURCE_SHIFT)
        if self.label is not None:
            packed = packed | ((self.label + 1) << _LABEL_SHIFT)
        if self.image is not None:
            packed = packed | ((self.image + 1) << _IMAGE_SHIFT)
        return packed

    @classmethod
    def unpack(cls, packed: Tensor) -> ViewTags:
        """Inverse of :meth:`pack`.

        Args:
            packed: int64 tensor of packed tags, any shape.

        Raises:
            TypeError: if ``packed`` is a tensor of a dtype other than ``int64`` (a narrower
                integer, e.g. ``labels.int()``, has lost the high bits that hold ``source``).
            ValueError: if the values are negative or the optional tags are present
                for some entries and absent for others (not made by :meth:`pack`).
        """
        if isinstance(packed, Tensor) and packed.dtype != torch.int64:
            raise TypeError(
                f"Expected `packed` of dtype torch.int64 (packed tags reach {MAX_PACKED}, "
                f"which {packed.dtype} cannot hold), but got {packed.dtype}"
            )
        packed = _as_int_tensor("packed", packed, None)
        if packed.numel() and int(packed.min()) < 0:
            raise ValueError(f"Expected packed tags >= 0 (made by ViewTags.pack), but got {int(packed.min())}")
        label_field = (packed >> _LABEL_SHIFT) & ((1 << _LABEL_BITS) - 1)
        image_field = (packed >> _IMAGE_SHIFT) & ((1 << _IMAGE_BITS) - 1)
        optional: dict[str, Tensor | None] = {}
        for name, field in (("label", label_field), ("image", image_field)):
            present = field > 0
            if bool(present.all()) and packed.numel() > 0:
                optional[name] = field - 1
            elif bool(present.any()):
                raise ValueError(
                    f"Packed tags carry `{name}` for {int(present.sum())} of {packed.numel()} entries: tags with "
                    f"and without `{name}` were put together (e.g. batches of both kinds in one memory); "
                    "give every batch the same optional tags"
                )
            else:
                optional[name] = None
        return cls(
            kind=packed & 1,
            quality=(packed >> 1) & 1,
            source=packed >> _SOURCE_SHIFT,
            label=optional["label"],
            image=optional["image"],
        )

    def __repr__(self) -> str:
        """Short summary: length and which optional tags are present."""
        extra = [name for name in ("label", "image") if getattr(self, name) is not None]
        return f"ViewTags(shape={tuple(self.shape)}, device={self.device}, optional={extra})"
