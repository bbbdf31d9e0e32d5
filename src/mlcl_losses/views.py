"""Four-view construction: lesion and healthy patches at high and low quality (``docs/glossary.md``).

For each lesion box of an image and for each healthy patch, :class:`FourViewSampler` cuts

=====  =======================================================  ==========  ==========
view   content                                                  ``kind``    ``quality``
=====  =======================================================  ==========  ==========
V1a    lesion patch from the image, augmentation a              LESION      HIGH
V1b    the same lesion patch, augmentation b                    LESION      HIGH
V2     the same lesion patch cut from the degraded copy         LESION      LOW
V3     healthy patch from the image                             HEALTHY     HIGH
V4     the same healthy patch from the degraded copy            HEALTHY     LOW
=====  =======================================================  ==========  ==========

All views of one lesion box (V1a, V1b, V2) share a ``source`` id; so do V3 and V4 of one
healthy patch. Views are returned grouped by view: ``[V1a × K, V1b × K, V2 × K, V3 × M, V4 × M]``
for ``K`` lesion boxes and ``M`` healthy patches.

Patches have a fixed size ``P``; a box smaller than ``P`` is placed at a random (jittered)
position inside its patch, and a box larger than ``P`` is cut with a square region that
contains all of it and resized to ``P`` (never cut). :class:`FourViewDataset` and
:func:`collate_four_views` give batches ``(views (B, C, P, P), tags (B,))`` with unique
source ids, reproducible for a given ``(base_seed, epoch, index)`` whatever the number of
DataLoader workers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mlcl_losses._image_checks import as_batch
from mlcl_losses._seeding import mix_seed, resolve_generator
from mlcl_losses.tags import MAX_SOURCE, Kind, Quality, ViewTags

__all__ = [
    "FourViewDataset",
    "FourViewRecord",
    "FourViewSampler",
    "FourViews",
    "LightAugment",
    "collate_four_views",
    "crop_square",
]

logger = logging.getLogger(__name__)

Augment = Callable[[Tensor, torch.Generator], Tensor]
ImageSource = Tensor | Callable[[], Tensor] | str | os.PathLike


class FourViews(NamedTuple):
    """Views and their tags.

    Attributes:
        views: ``(N, C, P, P)`` float patches.
        tags: :class:`~mlcl_losses.tags.ViewTags` of length ``N``.
    """

    views: Tensor
    tags: ViewTags


_RANGE_SLACK = 1e-3  # resampling rounds a patch in [0, 1] to slightly outside it; the output is clamped


@dataclass(frozen=True)
class LightAugment:
    """Light augmentation of one patch, in pure torch: flips, 90° rotations, colour jitter.

    Args:
        flip: random horizontal and vertical flips (each with probability 0.5).
        rotate: random rotation by a multiple of 90°.
        brightness: maximum relative brightness change (factor in ``[1 - b, 1 + b]``).
        contrast: maximum relative contrast change around the patch mean.
        saturation: maximum relative saturation change (3-channel patches only).

    Raises:
        ValueError: ``brightness``, ``contrast`` or ``saturation`` not a finite number in ``[0, 1)``.
        TypeError: one of them not a number.

    Examples:
        >>> aug = LightAugment()
        >>> aug(torch.rand(3, 8, 8), torch.Generator().manual_seed(0)).shape
        torch.Size([3, 8, 8])
    """

    flip: bool = True
    rotate: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Expected `{name}` to be a number in [0, 1), but got {type(value).__name__}")
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"Expected `{name}` in [0, 1) (a relative change), but got {value}")

    def __call__(self, patch: Tensor, generator: torch.Generator) -> Tensor:
        """Augment ``patch`` ``(C, P, P)`` float in [0, 1]; returns the same shape, in [0, 1].

        Raises:
            TypeError: ``patch`` not a floating-point tensor (e.g. ``uint8``: scale it to [0, 1] first),
                or ``generator`` not a :class:`torch.Generator`.
            ValueError: ``patch`` not 3-D, with NaN or infinite values, or with values outside [0, 1]
                (beyond a rounding slack of 1e-3).
        """
        if not isinstance(patch, Tensor) or not patch.is_floating_point():
            kind = patch.dtype if isinstance(patch, Tensor) else type(patch).__name__
            raise TypeError(f"Expected `patch` to be a float tensor with values in [0, 1], but got {kind}")
        if patch.ndim != 3:
            raise ValueError(f"Expected `patch` of shape (C, P, P), but got {tuple(patch.shape)}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}")
        if patch.numel():
            low, high = (float(v) for v in torch.aminmax(patch))  # one pass; NaN propagates into both
            inside = low >= -_RANGE_SLACK and high <= 1 + _RANGE_SLACK
            if not inside and not bool(torch.isfinite(patch).all()):
                raise ValueError("Expected `patch` to be finite, but it contains NaN or infinite values")
            if not inside:
                raise ValueError(
                    f"Expected `patch` values in [0, 1], but got values in [{low:.6g}, {high:.6g}] "
                    "(an 8-bit image must be divided by 255 first)"
                )
        r = torch.rand(6, generator=generator, device=generator.device).tolist()
        out = patch
        if self.flip and r[0] < 0.5:
            out = out.flip(-1)
        if self.flip and r[1] < 0.5:
            out = out.flip(-2)
        if self.rotate:
            out = torch.rot90(out, int(r[2] * 4) % 4, dims=(-2, -1))
        out = out * (1.0 + self.brightness * (2 * r[3] - 1))
        mean = out.mean()
        out = mean + (1.0 + self.contrast * (2 * r[4] - 1)) * (out - mean)
        if out.shape[0] == 3 and self.saturation:
            grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]).unsqueeze(0)
            out = grey + (1.0 + self.saturation * (2 * r[5] - 1)) * (out - grey)
        return out.clamp(0, 1)


def crop_square(image: Tensor, x0: int, y0: int, side: int, size: int) -> Tensor:
    """Cut the square ``[y0, y0 + side) × [x0, x0 + side)`` and resize it to ``size``.

    Parts of the square outside the image are zero. Downscaling uses antialiased bilinear
    interpolation; a square of side ``size`` is copied exactly.

    Args:
        image: ``(C, H, W)`` float.
        x0: left column (may be negative).
        y0: top row (may be negative).
        side: side of the square in pixels (>= 1).
        size: output side ``P``.

    Returns:
        ``(C, P, P)`` float.

    Examples:
        >>> img = torch.arange(16.0).view(1, 4, 4)
        >>> crop_square(img, 1, 1, 2, 2)[0].tolist()
        [[5.0, 6.0], [9.0, 10.0]]
    """
    _, h, w = image.shape
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + side - w), max(0, y0 + side - h)
    src = image
    if pad_l or pad_t or pad_r or pad_b:
        src = F.pad(image, (pad_l, pad_r, pad_t, pad_b))
    patch = src[:, y0 + pad_t : y0 + pad_t + side, x0 + pad_l : x0 + pad_l + side]
    if side != size:
        patch = F.interpolate(
            patch.unsqueeze(0), size=(size, size), mode="bilinear", antialias=side > size, align_corners=False
        )[0]
    return patch


def _check_boxes(name: str, boxes: Any, h: int, w: int) -> Tensor:
    """Validate ``(K, 4)`` boxes ``x1, y1, x2, y2``; return them as float32 clipped to the image."""
    if boxes is None:
        return torch.zeros(0, 4)
    try:
        t = torch.as_tensor(boxes, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"Expected `{name}` to be a (K, 4) tensor or sequence of boxes, but got {boxes!r}") from err
    if t.numel() == 0:
        return torch.zeros(0, 4)
    if t.dim() != 2 or t.shape[1] != 4:
        raise ValueError(f"Expected `{name}` of shape (K, 4) (x1, y1, x2, y2), but got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"Expected finite `{name}`, but got {t.tolist()}")
    bad = (t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])
    if bool(bad.any()):
        raise ValueError(f"Expected `{name}` with x2 >= x1 and y2 >= y1, but got {t[bad][0].tolist()}")
    outside = (t[:, 2] < 0) | (t[:, 0] > w) | (t[:, 3] < 0) | (t[:, 1] > h)
    if bool(outside.any()):
        raise ValueError(f"Expected `{name}` to overlap the {w}x{h} image, but got {t[outside][0].tolist()}")
    t[:, 0::2] = t[:, 0::2].clamp(0, w)
    t[:, 1::2] = t[:, 1::2].clamp(0, h)
    return t


def _load(source: Any, name: str) -> Tensor:
    """Resolve an image source: a tensor, a callable returning one, or an image file path."""
    if isinstance(source, Tensor):
        return source
    if isinstance(source, (str, os.PathLike)):
        try:
            from PIL import Image
        except ImportError as err:  # pragma: no cover - pillow is in the examples extra
            raise ImportError(
                f"Loading `{name}` from a file needs pillow: `pip install pillow` (or mlcl-losses[examples]); "
                "or pass a tensor or a loader callable instead"
            ) from err
        with Image.open(source) as opened:
            pil = opened.convert("L" if opened.mode in ("L", "I", "I;16", "F") else "RGB")
            data = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
            channels = 1 if pil.mode == "L" else 3
            return data.view(pil.height, pil.width, channels).permute(2, 0, 1).float() / 255.0
    if callable(source):
        out = source()
        if not isinstance(out, Tensor):
            raise TypeError(f"Expected the `{name}` loader to return a torch.Tensor, but got {type(out).__name__}")
        return out
    raise TypeError(f"Expected `{name}` to be a tensor, a callable or a file path, but got {type(source).__name__}")


@dataclass(frozen=True)
class FourViewSampler:
    """Cut the four views (V1a, V1b, V2, V3, V4; ``docs/glossary.md``) from an image and its degraded copy.

    Args:
        patch_size: side ``P`` of every view in pixels.
        n_healthy: number of random healthy patches per image when none are given.
        jitter: in [0, 1]; 0 centres each box in its patch, 1 places it uniformly at random
            (the box always stays inside the patch).
        augment: augmentation of V1a and V1b, ``(C, P, P), generator -> (C, P, P)``;
            ``None`` for no augmentation (then V1a == V1b). Default :class:`LightAugment`.
        min_content: fraction of a random healthy patch that must be image content (a pixel
            whose brightest channel exceeds ``content_threshold``); keeps fundus patches in the
            field of view.
        content_threshold: brightness below which a pixel is background.
        max_tries: random candidate positions drawn for the healthy patches.

    Examples:
        >>> sampler = FourViewSampler(patch_size=16, n_healthy=2)
        >>> img = torch.rand(3, 64, 64)
        >>> out = sampler(img, boxes=[[10, 10, 20, 18]], degraded=img * 0.5, seed=0)
        >>> out.views.shape
        torch.Size([7, 3, 16, 16])
        >>> out.tags.kind.tolist(), out.tags.quality.tolist(), out.tags.source.tolist()
        ([1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1, 1], [0, 0, 0, 1, 2, 1, 2])
    """

    patch_size: int = 64
    n_healthy: int = 2
    jitter: float = 1.0
    augment: Augment | None = LightAugment()
    min_content: float = 0.8
    content_threshold: float = 0.04
    max_tries: int = 256

    def __post_init__(self) -> None:
        for name in ("patch_size", "max_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}")
        if isinstance(self.n_healthy, bool) or not isinstance(self.n_healthy, int) or self.n_healthy < 0:
            raise ValueError(f"Expected `n_healthy` to be an int >= 0, but got {self.n_healthy!r}")
        for name in ("jitter", "min_content"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"Expected `{name}` in [0, 1], but got {value!r}")
        if self.augment is not None and not callable(self.augment):
            raise TypeError(f"Expected `augment` to be callable or None, but got {self.augment!r}")

    # ------------------------------------------------------------------ geometry
    def lesion_region(self, box: Tensor, h: int, w: int, u: tuple[float, float]) -> tuple[int, int, int]:
        """Square region ``(x0, y0, side)`` that contains ``box`` with jitter ``u`` in [0, 1]^2.

        ``side = max(P, box width, box height)`` (integer pixels, box rounded outwards); the
        region is shifted into the image when that keeps the box inside it.
        """
        bx1, by1 = math.floor(float(box[0])), math.floor(float(box[1]))
        bx2, by2 = max(math.ceil(float(box[2])), bx1 + 1), max(math.ceil(float(box[3])), by1 + 1)
        side = max(self.patch_size, bx2 - bx1, by2 - by1)
        origin = []
        for lo_box, hi_box, extent, uu in ((bx1, bx2, w, u[0]), (by1, by2, h, u[1])):
            lo, hi = hi_box - side, lo_box  # every origin in [lo, hi] keeps the box inside
            if side <= extent and max(lo, 0) <= min(hi, extent - side):
                lo, hi = max(lo, 0), min(hi, extent - side)
            t = 0.5 + self.jitter * (uu - 0.5)
            origin.append(lo + round(t * (hi - lo)))
        return origin[0], origin[1], side

    def healthy_regions(self, image: Tensor, boxes: Tensor, generator: torch.Generator) -> list[tuple[int, int, int]]:
        """``n_healthy`` random ``P × P`` regions avoiding ``boxes`` and background, as ``(x0, y0, P)``."""
        _, h, w = image.shape
        p = self.patch_size
        if self.n_healthy == 0:
            return []
        if h < p or w < p:
            raise ValueError(f"Expected an image of at least patch_size={p} pixels a side, but got {h}x{w}")
        g = generator
        xs = torch.randint(0, w - p + 1, (self.max_tries,), generator=g, device=g.device).cpu()
        ys = torch.randint(0, h - p + 1, (self.max_tries,), generator=g, device=g.device).cpu()
        content = (image.amax(0) > self.content_threshold).float().cpu()
        integral = F.pad(content.cumsum(0).cumsum(1), (1, 0, 1, 0))  # (H + 1, W + 1)
        frac = (integral[ys + p, xs + p] - integral[ys, xs + p] - integral[ys + p, xs] + integral[ys, xs]) / (p * p)
        if boxes.numel():
            ix = (
                torch.minimum(xs[:, None] + p, boxes[None, :, 2]) - torch.maximum(xs[:, None], boxes[None, :, 0])
            ).clamp(min=0)
            iy = (
                torch.minimum(ys[:, None] + p, boxes[None, :, 3]) - torch.maximum(ys[:, None], boxes[None, :, 1])
            ).clamp(min=0)
            overlap = (ix * iy).sum(1)
        else:
            overlap = torch.zeros(self.max_tries)
        valid = (overlap == 0) & (frac >= self.min_content)
        # valid candidates first (in draw order), then the least bad ones
        score = (~valid).float() * (1e9 + overlap * 1e3 + (1 - frac))
        order = torch.argsort(score, stable=True)[: self.n_healthy]
        if int(valid.sum()) < self.n_healthy:
            logger.debug(
                "only %d of %d healthy patch candidates avoid the lesions and the background; using the least bad",
                int(valid.sum()),
                self.max_tries,
            )
        return [(int(xs[i]), int(ys[i]), p) for i in order.tolist()]

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        image: Tensor,
        boxes: Any,
        *,
        degraded: Tensor | None = None,
        degradation: Callable[..., Tensor] | None = None,
        healthy_boxes: Any = None,
        label: int | None = None,
        image_id: int | None = None,
        source_offset: int = 0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> FourViews:
        """Build the views of one image.

        Args:
            image: ``(C, H, W)`` float in [0, 1], the high-quality image.
            boxes: ``(K, 4)`` lesion boxes ``x1, y1, x2, y2`` in pixels (float; ``K`` may be 0).
            degraded: ``(C, H, W)`` float in [0, 1], the degraded copy of ``image``.
            degradation: alternative to ``degraded``: a callable ``(image, generator=...) -> image``
                such as :class:`~mlcl_losses.degrade.FundusDegradation`.
            healthy_boxes: ``(M, 4)`` healthy regions; when ``None``, ``n_healthy`` random
                patches that avoid the lesion boxes and the background.
            label: optional disease label, copied to every view's ``label`` tag.
            image_id: optional image id, copied to every view's ``image`` tag.
            source_offset: first source id (sources are ``source_offset + 0 .. K + M - 1``).
            generator: source of randomness (degradation, jitter, healthy patches, augmentation).
            seed: alternative to ``generator``.

        Returns:
            :class:`FourViews` with ``views (3K + 2M, C, P, P)`` float and their tags, ordered
            ``[V1a × K, V1b × K, V2 × K, V3 × M, V4 × M]``.
        """
        _, batched = as_batch(image)
        if batched:
            raise ValueError(f"Expected `image` of shape (C, H, W), but got shape {tuple(image.shape)}")
        _, h, w = image.shape
        g = resolve_generator(generator, seed)
        if (degraded is None) == (degradation is None):
            raise ValueError("Pass exactly one of `degraded` (a tensor) and `degradation` (a callable)")
        low = degraded if degraded is not None else degradation(image, generator=g)  # type: ignore[misc]
        as_batch(low, "degraded")
        if low.shape != image.shape:
            raise ValueError(
                f"Expected `degraded` of the same shape as `image` {tuple(image.shape)}, but got {tuple(low.shape)}"
            )
        for name, value in (("source_offset", source_offset), ("label", label), ("image_id", image_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"Expected `{name}` to be an int >= 0, but got {value!r}")
        lesion = _check_boxes("boxes", boxes, h, w)
        p = self.patch_size
        k = lesion.shape[0]
        jit = torch.rand(k, 2, generator=g, device=g.device).cpu().tolist()
        lesion_regions = [self.lesion_region(lesion[i], h, w, (jit[i][0], jit[i][1])) for i in range(k)]
        if healthy_boxes is None:
            healthy = self.healthy_regions(image, lesion, g)
        else:
            hb = _check_boxes("healthy_boxes", healthy_boxes, h, w)
            hj = torch.rand(hb.shape[0], 2, generator=g, device=g.device).cpu().tolist()
            healthy = [self.lesion_region(hb[i], h, w, (hj[i][0], hj[i][1])) for i in range(hb.shape[0])]
        m = len(healthy)
        c = image.shape[0]
        v1 = [crop_square(image, *r, p) for r in lesion_regions]
        v2 = [crop_square(low, *r, p) for r in lesion_regions]
        v3 = [crop_square(image, *r, p) for r in healthy]
        v4 = [crop_square(low, *r, p) for r in healthy]
        if self.augment is not None:
            v1a = [self.augment(x, g) for x in v1]
            v1b = [self.augment(x, g) for x in v1]
        else:
            v1a, v1b = v1, [x.clone() for x in v1]
        parts = v1a + v1b + v2 + v3 + v4
        views = torch.stack(parts) if parts else image.new_zeros(0, c, p, p)
        hi, lo = int(Quality.HIGH), int(Quality.LOW)
        lesion_src = list(range(source_offset, source_offset + k))
        healthy_src = list(range(source_offset + k, source_offset + k + m))
        n = 3 * k + 2 * m
        tags = ViewTags(
            kind=torch.tensor([int(Kind.LESION)] * 3 * k + [int(Kind.HEALTHY)] * 2 * m, dtype=torch.long),
            quality=torch.tensor([hi] * 2 * k + [lo] * k + [hi] * m + [lo] * m, dtype=torch.long),
            source=torch.tensor(lesion_src * 3 + healthy_src * 2, dtype=torch.long),
            label=None if label is None else torch.full((n,), label, dtype=torch.long),
            image=None if image_id is None else torch.full((n,), image_id, dtype=torch.long),
        )
        return FourViews(views, tags)


@dataclass(frozen=True)
class FourViewRecord:
    """One image for :class:`FourViewDataset`.

    Attributes:
        image: the high-quality image ``(C, H, W)`` float in [0, 1]: a tensor, a loader
            callable returning one, or an image file path (read with pillow).
        boxes: ``(K, 4)`` lesion boxes ``x1, y1, x2, y2`` in pixels.
        healthy_boxes: optional ``(M, 4)`` healthy regions (random patches when ``None``).
        degraded: optional degraded copy (same forms as ``image``); when ``None`` the
            dataset's ``degradation`` makes it.
        label: optional disease label (e.g. DR grade) for the ``label`` tag.
        quality: optional image-quality label (EyeQ: 0 Good, 1 Usable, 2 Reject), kept as
            metadata (the views' ``quality`` tag is HIGH/LOW by construction).
        image_id: optional image id for the ``image`` tag (default: the record's index).
    """

    image: ImageSource
    boxes: Any
    healthy_boxes: Any = None
    degraded: ImageSource | None = None
    label: int | None = None
    quality: int | None = None
    image_id: int | None = None


class FourViewDataset(Dataset[FourViews]):
    """Dataset of the four views of each record; use with :func:`collate_four_views`.

    Item ``i`` of epoch ``e`` is drawn with a generator seeded from ``(base_seed, e, i)``, so it
    is the same whatever the number of DataLoader workers. Call :meth:`set_epoch` before
    iterating each epoch (and before the DataLoader starts its workers).

    Args:
        records: a sequence (possibly lazy) of :class:`FourViewRecord`.
        sampler: the view sampler.
        degradation: callable ``(image, generator=...) -> image`` used for records without a
            ``degraded`` copy.
        base_seed: base of the per-item seeds.
        sources_per_image: source ids reserved per record: record ``i`` owns
            ``[i * sources_per_image, (i + 1) * sources_per_image)``, so ids are unique across the
            dataset (a record giving more lesion + healthy patches raises).

    Examples:
        >>> from mlcl_losses.degrade import FundusDegradation
        >>> recs = [FourViewRecord(image=torch.rand(3, 48, 48), boxes=[[5, 5, 12, 12]], label=2)]
        >>> data = FourViewDataset(recs, FourViewSampler(patch_size=16), FundusDegradation(0.5))
        >>> views, tags = collate_four_views([data[0], data[0]])
        >>> views.shape, tags.source.tolist()
        (torch.Size([14, 3, 16, 16]), [0, 0, 0, 1, 2, 1, 2, 3, 3, 3, 4, 5, 4, 5])
    """

    def __init__(
        self,
        records: Sequence[FourViewRecord],
        sampler: FourViewSampler,
        degradation: Callable[..., Tensor] | None = None,
        base_seed: int = 0,
        sources_per_image: int = 64,
    ) -> None:
        if isinstance(sources_per_image, bool) or not isinstance(sources_per_image, int) or sources_per_image < 1:
            raise ValueError(f"Expected `sources_per_image` to be an int >= 1, but got {sources_per_image!r}")
        if len(records) * sources_per_image - 1 > MAX_SOURCE:
            raise ValueError(
                f"{len(records)} records x `sources_per_image`={sources_per_image} exceed the source id range "
                f"[0, {MAX_SOURCE}]; lower `sources_per_image`"
            )
        self.sources_per_image = sources_per_image
        if not isinstance(sampler, FourViewSampler):
            raise TypeError(f"Expected `sampler` to be a FourViewSampler, but got {type(sampler).__name__}")
        if degradation is not None and not callable(degradation):
            raise TypeError(f"Expected `degradation` to be callable or None, but got {degradation!r}")
        if isinstance(base_seed, bool) or not isinstance(base_seed, int):
            raise TypeError(f"Expected `base_seed` to be an int, but got {base_seed!r}")
        self.records = records
        self.sampler = sampler
        self.degradation = degradation
        self.base_seed = base_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that enters the per-item seeds."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Expected `epoch` to be an int >= 0, but got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def __getitem__(self, index: int) -> FourViews:
        """Views of record ``index``; sources are local (0 ..), made unique by the collate function."""
        record = self.records[index]
        if not isinstance(record, FourViewRecord):
            raise TypeError(f"Expected records to be FourViewRecord, but record {index} is {type(record).__name__}")
        g = torch.Generator().manual_seed(mix_seed(self.base_seed, self.epoch, index))
        image = _load(record.image, "image")
        degraded = None if record.degraded is None else _load(record.degraded, "degraded")
        if degraded is None and self.degradation is None:
            raise ValueError(f"Record {index} has no `degraded` image and the dataset has no `degradation`")
        out = self.sampler(
            image,
            record.boxes,
            degraded=degraded,
            degradation=None if degraded is not None else self.degradation,
            healthy_boxes=record.healthy_boxes,
            label=record.label,
            image_id=index if record.image_id is None else record.image_id,
            source_offset=index * self.sources_per_image,
            generator=g,
        )
        n_sources = int(out.tags.source.unique().numel())
        if n_sources > self.sources_per_image:
            raise ValueError(
                f"Record {index} gives {n_sources} patches (lesion boxes + healthy patches), more than "
                f"`sources_per_image`={self.sources_per_image}; raise it or pass fewer boxes"
            )
        return out


def collate_four_views(batch: Sequence[FourViews]) -> FourViews:
    """Concatenate the views of several images, with sources unique in the batch.

    :class:`FourViewDataset` gives dataset-wide source ids (record ``i`` owns
    ``[i * sources_per_image, (i + 1) * sources_per_image)``), which are kept: the same lesion
    patch then has the same id in every batch and epoch, so a memory bank never offers an
    anchor its own patch as a negative, and unrelated old entries are never excluded. Only
    when items share source ids (e.g. the same item twice, or views made by a bare
    :class:`FourViewSampler`) are they renumbered: the sources of item ``j`` are shifted past
    those of items ``0 .. j - 1``.

    Args:
        batch: per-image :class:`FourViews` (from :class:`FourViewDataset`).

    Returns:
        :class:`FourViews` with ``views (B, C, P, P)`` float and ``tags`` of length ``B``,
        the total number of views.
    """
    if len(batch) == 0:
        raise ValueError("Expected at least one item to collate, but got an empty batch")
    for item in batch:
        if not isinstance(item, FourViews):
            raise TypeError(f"Expected FourViews items, but got {type(item).__name__}")
    per_item = [item.tags.source.unique() for item in batch]
    merged = torch.cat(per_item)
    if merged.unique().numel() == merged.numel():  # dataset-wide ids already unique: keep them
        return FourViews(torch.cat([item.views for item in batch]), ViewTags.cat([item.tags for item in batch]))
    views, tags = [], []
    offset = 0
    for item in batch:
        t = item.tags
        local = t.source - int(t.source.min()) if len(t) else t.source
        shifted = ViewTags(t.kind, t.quality, local + offset, t.label, t.image, validate=False)
        offset += int(local.max()) + 1 if len(t) else 0
        views.append(item.views)
        tags.append(shifted)
    return FourViews(torch.cat(views), ViewTags.cat(tags))
