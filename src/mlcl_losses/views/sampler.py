"""Cutting the four views of one image: lesion and healthy patches from the image and its degraded copy.

:class:`FourViewSampler` places each lesion box in a patch of side ``P`` (jittered when the box
is smaller, a containing square resized to ``P`` when larger), draws healthy patches away from
the lesions and the background, and returns the views with their tags as :class:`FourViews`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl_losses._image_checks import as_batch
from mlcl_losses._seeding import resolve_generator
from mlcl_losses.tags import Kind, Quality, ViewTags
from mlcl_losses.views.augment import LightAugment

__all__ = ["FourViewSampler", "FourViews", "crop_square"]

logger = logging.getLogger(__name__)

Augment = Callable[[Tensor, torch.Generator], Tensor]


class FourViews(NamedTuple):
    """Views and their tags.

    Attributes:
        views: ``(N, C, P, P)`` float patches.
        tags: :class:`~mlcl_losses.tags.ViewTags` of length ``N``.
    """

    views: Tensor
    tags: ViewTags


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
