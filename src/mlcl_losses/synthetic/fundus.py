"""Synthetic colour fundus photographs with diabetic-retinopathy lesions and quality labels.

Each image has a circular field of view (FOV), an optic disc with a cup, a vessel tree
(arcades around the macula, arteries and veins, two levels of branching), a darker macula
and, depending on the DR grade (0-4, as in EyeQ / Kaggle DR), lesions with their boxes:

=====  ============================================================================
grade  lesions (counts drawn uniformly in the ranges)
=====  ============================================================================
0      none
1      microaneurysms 1-4
2      microaneurysms 3-10, haemorrhages 1-5, hard exudates 0-4, cotton-wool 0-2
3      microaneurysms 8-18, haemorrhages 6-14, hard exudates 2-8, cotton-wool 1-4
4      as grade 3 (more), plus 1-2 patches of neovascularisation
=====  ============================================================================

The image quality label (0 Good, 1 Usable, 2 Reject, as in EyeQ) is made by
:func:`~mlcl_losses.degrade.degrade_fundus` at a severity drawn from a range that rises
with the label, with one of the seven degradation combinations drawn per image. The
sample returns the clean image too, for view construction.

Speed: rendering runs under :func:`torch.inference_mode`, draws only the lesion kinds of the
grade, rasterises the vessels in two width bins and degrades without re-validating its own
output; what remains is per-pixel work on full images (vessel blurs, the blur degradation, random
noise fields) and the fixed cost of the small operations. The throughput is measured by
``benchmarks/bench_synthetic.py`` (figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mlcl_losses._seeding import mix_seed
from mlcl_losses.degrade.fundus import FUNDUS_COMBINATIONS, degrade_fundus_unchecked
from mlcl_losses.synthetic._arguments import check_dataset_shape, check_probs, check_severity_ranges
from mlcl_losses.synthetic._draw import (
    blobs,
    choice,
    draw_lines,
    pick_points,
    rand,
    randint,
    randn,
    render_sample,
    smooth_noise,
    walk,
)

__all__ = ["FUNDUS_LESIONS", "FundusSample", "SyntheticFundus"]

logger = logging.getLogger(__name__)

#: Lesion kind names; ``FundusSample.lesion_kinds`` holds indices into this tuple.
FUNDUS_LESIONS: tuple[str, ...] = (
    "microaneurysm",
    "haemorrhage",
    "hard_exudate",
    "cotton_wool_spot",
    "neovascularisation",
)
_MA, _HEM, _EX, _CWS, _NV = range(5)

# (min, max) count of each lesion kind per grade, in FUNDUS_LESIONS order.
_LESION_COUNTS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    ((1, 4), (0, 0), (0, 0), (0, 0), (0, 0)),
    ((3, 10), (1, 5), (0, 4), (0, 2), (0, 0)),
    ((8, 18), (6, 14), (2, 8), (1, 4), (0, 0)),
    ((10, 20), (8, 16), (3, 10), (2, 5), (1, 2)),
)

_RED = torch.tensor([0.42, 0.05, 0.03])
_EXUDATE = torch.tensor([0.97, 0.88, 0.42])
_COTTON = torch.tensor([0.92, 0.86, 0.76])
_NV_TINT = 0.6 * torch.tensor([0.5, 0.85, 0.8])  # opacity of new vessels per channel


@dataclass(frozen=True)
class FundusSample:
    """One synthetic fundus photograph.

    Attributes:
        index: index of the sample in its dataset.
        image: ``(3, S, S)`` float32 in [0, 1], degraded according to ``quality``.
        clean_image: ``(3, S, S)`` float32 in [0, 1], the same image before degradation.
        fov: ``(1, S, S)`` bool field of view.
        boxes: ``(K, 4)`` float32 lesion boxes ``x1, y1, x2, y2`` in pixels (K = 0 for grade 0).
        lesion_kinds: ``(K,)`` int64 indices into :data:`~mlcl_losses.synthetic.FUNDUS_LESIONS`.
        grade: DR grade 0-4.
        quality: 0 Good, 1 Usable, 2 Reject.
        severity: degradation severity in [0, 1] used to make ``image``.
        degradations: names of the degradations applied (empty when ``severity`` is 0).
    """

    index: int
    image: Tensor
    clean_image: Tensor
    fov: Tensor
    boxes: Tensor
    lesion_kinds: Tensor
    grade: int
    quality: int
    severity: float
    degradations: tuple[str, ...]

    @property
    def lesion_names(self) -> list[str]:
        """Names of the lesion kinds, one per box."""
        return [FUNDUS_LESIONS[i] for i in self.lesion_kinds.tolist()]


class SyntheticFundus:
    """Indexable dataset of synthetic fundus photographs (a ``Dataset``-like sequence).

    Sample ``i`` depends only on ``(seed, i)`` (not on access order or worker), so it can
    be regenerated anywhere.

    Args:
        n: number of samples.
        size: side ``S`` of the square images in pixels (>= 32).
        seed: base seed.
        grade_probs: weights of DR grades 0-4.
        quality_probs: weights of quality labels Good, Usable, Reject.
        severity_ranges: severity range of each quality label; must rise with the label.

    Examples:
        >>> data = SyntheticFundus(n=4, size=64, seed=0)
        >>> sample = data[1]
        >>> sample.image.shape, sample.boxes.shape[1], sample.grade in range(5)
        (torch.Size([3, 64, 64]), 4, True)
        >>> torch.equal(data[1].image, SyntheticFundus(n=4, size=64, seed=0)[1].image)
        True
    """

    def __init__(
        self,
        n: int,
        size: int = 256,
        seed: int = 0,
        grade_probs: Sequence[float] = (0.4, 0.15, 0.2, 0.125, 0.125),
        quality_probs: Sequence[float] = (0.5, 0.3, 0.2),
        severity_ranges: Sequence[tuple[float, float]] = ((0.0, 0.1), (0.3, 0.55), (0.7, 1.0)),
    ) -> None:
        check_dataset_shape(n, size, seed)
        self.n, self.size, self.seed = n, size, seed
        self.grade_probs = check_probs("grade_probs", grade_probs, 5)
        self.quality_probs = check_probs("quality_probs", quality_probs, 3)
        self.severity_ranges = check_severity_ranges(severity_ranges)

    def __len__(self) -> int:
        """Number of samples."""
        return self.n

    def __getitem__(self, index: int) -> FundusSample:
        """Render sample ``index`` (negative indices count from the end)."""
        return render_sample(index, self.n, self._render)

    def _render(self, index: int) -> FundusSample:
        g = torch.Generator().manual_seed(mix_seed(self.seed, index))
        grade = choice(g, self.grade_probs)
        quality = choice(g, self.quality_probs)
        low, high = self.severity_ranges[quality]
        severity = low + (high - low) * float(rand(g, 1))
        combo = FUNDUS_COMBINATIONS[randint(g, 0, len(FUNDUS_COMBINATIONS) - 1)]
        clean, fov, boxes, kinds = render_fundus(self.size, grade, g)
        if severity > 0:  # the renderer's output needs no checks
            image = degrade_fundus_unchecked(clean, fov, severity, combo, g, _centred_fov_geometry(fov))
        else:
            image, combo = clean.clone(), ()
        return FundusSample(
            index=index,
            image=image,
            clean_image=clean,
            fov=fov,
            boxes=boxes,
            lesion_kinds=kinds,
            grade=grade,
            quality=quality,
            severity=severity,
            degradations=combo,
        )


def _centred_fov_geometry(fov: Tensor) -> tuple[float, float, float]:
    """``(cx, cy, radius)`` of the renderer's FOV ``(1, S, S)``, equal to the degradation's moment geometry.

    The FOV is a disc centred on the image centre and symmetric under both flips (its pixel
    distances are computed symmetrically), so the mean pixel index is the centre exactly;
    only the area needs counting.
    """
    s = fov.shape[-1]
    return (s - 1) / 2, (s - 1) / 2, math.sqrt(int(fov.sum()) / math.pi)


# The eight main vessel trunks in a canonical frame (temporal = -x before mirroring, superior = -y):
# the temporal arcades start up/down and slightly temporal, then curve round the macula; the nasal
# vessels fan out. Rows: initial heading (rad), curvature (x 1.35 / radius), length (x radius),
# width (px at 256 px), artery (1) or vein (0).
_TRUNKS = torch.tensor(
    [
        [-1.95, 1.95, -2.05, 2.05, -1.05, 1.05, -0.45, 0.45],
        [-1.0, 1.0, -1.0, 1.0, 0.3, -0.3, 0.1, -0.1],
        [1.25, 1.25, 1.15, 1.15, 0.7, 0.7, 0.65, 0.65],
        [1.55, 1.55, 1.2, 1.2, 1.3, 1.1, 1.0, 1.1],
        [0, 0, 1, 1, 0, 1, 1, 0],
    ]
)


def _vessel_tree(g: torch.Generator, s: int, disc: tuple[float, float], side: float, radius: float) -> Tensor:
    """Opacity maps ``(2, S, S)`` (veins, arteries) of a vessel tree rooted at the disc.

    Three levels: the eight trunks, three branches off each, one branch off each branch.
    """
    scale = s / 256.0
    step = 1.2 * scale
    heading, curv, length, width, artery = _TRUNKS.unbind()
    z = randn(g, 5, 8)
    theta = heading + 0.12 * z[0]
    if side < 0:  # mirror for the eye side: the temporal direction is -x for side=+1 (disc right of centre)
        theta = math.pi - theta
    curv = curv * (z[1] * 0.15 + 1.0) * (side * 1.35 / radius)
    length = length * (z[2] * 0.1 + 1.0) * radius
    width = width * scale
    start = z[3:].T.mul(2 * scale).add_(torch.tensor(disc))
    points, widths, arteries = [], [], []
    for kids in (3, 1, 0):  # branches off each vessel of this level
        n = start.shape[0]
        steps = int(float(length.max()) / step) + 1
        pts, heads = walk(g, start, theta, curv, steps, step, wiggle=0.035)
        frac = torch.arange(steps, dtype=torch.float32).mul_(step) / length[:, None]  # (n, steps) along the vessel
        points.append(pts.reshape(-1, 2))
        # tapering width; -1 marks the points beyond the vessel's length (dropped below)
        taper = frac.clamp(max=1.0).mul_(-0.45).add_(1.0).mul_(width[:, None])
        widths.append(taper.masked_fill_(frac > 1, -1.0).view(-1))
        arteries.append(artery.repeat_interleave(steps))
        if not kids:
            break
        u = rand(g, 5, n, kids)
        at = ((0.15 + 0.7 * u[0]) * (length / step)[:, None]).long().clamp_(max=steps - 1)  # branch points
        at += torch.arange(0, n * steps, steps)[:, None]
        start = points[-1][at.view(-1)]
        turn = torch.where(u[1] < 0.5, -1.0, 1.0).mul_(0.45 + 0.5 * u[2])
        theta = (heads.view(-1)[at] + turn).view(-1)
        curv = randn(g, n * kids) * (0.6 / radius)
        length = (length[:, None] * (0.3 + 0.35 * u[3])).view(-1)
        width = (width[:, None] * (0.55 + 0.15 * u[4])).view(-1)
        artery = artery.repeat_interleave(kids)
    w_all = torch.cat(widths)
    keep = w_all >= 0
    pts_all, w_all, art_all = torch.cat(points)[keep], w_all[keep], torch.cat(arteries)[keep]
    bins = torch.tensor([0.6, 1.3]) * scale  # two width bins: one blur each
    widths_all = torch.where(art_all > 0, w_all * 0.85, w_all)
    return draw_lines(pts_all, widths_all, step, s, s, bins, art_all.long(), 2)


def render_fundus(size: int, grade: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render one clean synthetic fundus photograph.

    Args:
        size: side ``S`` in pixels.
        grade: DR grade 0-4 (sets the lesion counts, see the module docstring).
        g: source of randomness (CPU generator).

    Returns:
        ``image (3, S, S)`` float32 in [0, 1], ``fov (1, S, S)`` bool, ``boxes (K, 4)`` float32
        ``x1, y1, x2, y2``, ``lesion_kinds (K,)`` int64 indices into :data:`~mlcl_losses.synthetic.FUNDUS_LESIONS`.
    """
    s = size
    c = (s - 1) / 2.0
    radius = s * (0.455 + 0.02 * float(rand(g, 1)))
    side = 1.0 if float(rand(g, 1)) < 0.5 else -1.0  # disc right or left of centre
    xs = torch.arange(s, dtype=torch.float32).view(1, s)
    ys = torch.arange(s, dtype=torch.float32).view(s, 1)
    r2 = ((xs - c) ** 2 + (ys - c) ** 2) / radius**2
    fov = r2 <= 1.0
    # background: orange-red retina, vignetting, low-frequency and choroidal texture
    base = torch.tensor([0.72, 0.31, 0.12]) + torch.tensor([0.1, 0.05, 0.03]) * (2 * rand(g, 3) - 1)
    r2c = r2.clamp(max=1.0)
    noise = smooth_noise(g, (s, s), 5)[0] * 0.06 + smooth_noise(g, (s, s), 48)[0] * 0.025
    shade = 1.0 - 0.38 * r2c * r2c.sqrt() + noise  # (S, S)
    # macula: darker, browner region ~2.5 disc diameters temporal to the disc; fovea at its centre
    disc_r = radius * (0.115 + 0.02 * float(rand(g, 1)))
    disc_x = c + side * radius * (0.42 + 0.05 * float(rand(g, 1)))
    disc_y = c + radius * 0.05 * float(randn(g, 1))
    mac_x, mac_y = disc_x - side * 4.2 * disc_r, disc_y + radius * (0.03 + 0.03 * float(rand(g, 1)))
    sm, sf = 0.13 * radius, 0.025 * radius
    mac = torch.exp(-((ys - mac_y) ** 2) / (2 * sm**2)) * torch.exp(-((xs - mac_x) ** 2) / (2 * sm**2))
    fovea = torch.exp(-((ys - mac_y) ** 2) / (2 * sf**2)) * torch.exp(-((xs - mac_x) ** 2) / (2 * sf**2))
    # vessels: veins darker and wider than arteries
    vessels = _vessel_tree(g, s, (disc_x, disc_y), side, radius)
    img = base.view(3, 1, 1) * (shade * (1.0 - 0.15 * fovea))  # (3, S, S)
    dark = torch.tensor([0.3, 0.45, 0.4]).view(3, 1, 1) * mac
    dark.addcmul_(torch.tensor([0.42, 0.62, 0.55]).view(3, 1, 1), vessels[0])
    dark.addcmul_(torch.tensor([0.25, 0.45, 0.4]).view(3, 1, 1), vessels[1])
    img.mul_(dark.neg_().add_(1.0).clamp_min_(0.05))
    # optic disc (in a window around it): pale yellow rim, brighter cup, soft edge, vessels on top
    ell = 1 + 0.08 * float(randn(g, 1))
    disc_col = torch.tensor([0.97, 0.8, 0.5]) + 0.04 * randn(g, 3)
    cup_r = disc_r * (0.35 + 0.25 * float(rand(g, 1)))
    x0, x1 = max(0, int(disc_x - 2 * disc_r)), min(s, int(disc_x + 2 * disc_r) + 1)
    y0, y1 = max(0, int(disc_y - 2 * disc_r)), min(s, int(disc_y + 2 * disc_r) + 1)
    if x1 > x0 and y1 > y0:
        wx, wy = xs[:, x0:x1], ys[y0:y1]
        d_disc = torch.sqrt(((wx - disc_x) * ell) ** 2 + ((wy - disc_y) / ell) ** 2)
        alpha = 0.85 * torch.sigmoid((disc_r - d_disc) / (0.1 * disc_r))
        alpha_cup = 0.6 * torch.sigmoid((cup_r - d_disc) / (0.2 * cup_r))
        vs = 1.0 - 0.6 * vessels[0, y0:y1, x0:x1] - 0.4 * vessels[1, y0:y1, x0:x1]
        win = img[:, y0:y1, x0:x1]
        win = win * (1 - alpha) + disc_col.view(3, 1, 1) * (alpha * vs)
        win = win * (1 - alpha_cup) + torch.tensor([1.0, 0.95, 0.82]).view(3, 1, 1) * (alpha_cup * vs)
        img[:, y0:y1, x0:x1] = win
    # lesions: only the kinds of the grade are drawn (absent kinds draw no randomness and add no field)
    counts = [randint(g, lo, hi) if hi else 0 for lo, hi in _LESION_COUNTS[grade]]
    avoid = (disc_x, disc_y, 1.8 * disc_r)
    red: list[_Blobs] = []
    found: list[tuple[int, Tensor]] = []  # (kind, boxes), in FUNDUS_LESIONS order
    ex_field = cw_field = nv_alpha = None  # fields of the kinds present
    if counts[_MA]:
        blob, box = _microaneurysms(g, counts[_MA], c, radius, avoid, s)
        red.append(blob)
        found.append((_MA, box))
    if counts[_HEM]:
        blob, box = _haemorrhages(g, counts[_HEM], c, radius, avoid, s)
        red.append(blob)
        found.append((_HEM, box))
    if counts[_EX]:
        ex_blobs, box = _hard_exudates(g, counts[_EX], (mac_x, mac_y), c, radius, s)
        found.append((_EX, box))
        ex_field = blobs(s, s, *ex_blobs)
    if counts[_CWS]:
        cw_blobs, box = _cotton_wool_spots(g, counts[_CWS], c, radius, avoid, s)
        found.append((_CWS, box))
        cw_field = blobs(s, s, *cw_blobs)
        cw_field.mul_(smooth_noise(g, (s, s), 40)[0].mul_(0.25).add_(1.0))
    if counts[_NV]:
        nv_alpha, box = _neovascularisation(g, counts[_NV], (disc_x, disc_y), c, radius, s)
        found.append((_NV, box))
    # composite (in this order): cotton wool, exudates, red lesions, new vessels
    if cw_field is not None:
        img.lerp_(_COTTON.view(3, 1, 1).expand(3, s, s), cw_field.clamp_(0, 0.85))
    if ex_field is not None:
        img.lerp_(_EXUDATE.view(3, 1, 1) * shade.mul(0.15).add_(0.85), ex_field.clamp_(0, 1))
    if red:
        cx, cy, sx, sy, amp = (torch.cat(parts) for parts in zip(*red, strict=True))
        red_field = blobs(s, s, cx, cy, sx, sy, amp)
        img.lerp_(_RED.view(3, 1, 1) * shade.clamp(0.3, 1.0), red_field.clamp_(0, 1))
    if nv_alpha is not None:
        img.mul_((_NV_TINT.view(3, 1, 1) * nv_alpha).neg_().add_(1.0))
    img.add_(randn(g, 1, s, s), alpha=0.006).clamp_(0, 1).mul_(fov)
    box_t = torch.cat([box for _, box in found]).float() if found else torch.zeros(0, 4)
    kind_t = torch.cat([torch.full((len(box),), kind) for kind, box in found]) if found else torch.zeros(0)
    return img, fov.unsqueeze(0), box_t, kind_t.long()


#: Parameters ``(cx, cy, sx, sy, amp)`` of Gaussian blobs (see :func:`~mlcl_losses.synthetic._draw.blobs`).
_Blobs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _microaneurysms(
    g: torch.Generator, n: int, c: float, radius: float, avoid: tuple[float, float, float], s: int
) -> tuple[_Blobs, Tensor]:
    """Tiny dark-red dots: their blobs and ``(n, 4)`` boxes."""
    scale = s / 256.0
    pts = pick_points(g, n, c, c, 0.8 * radius, avoid)
    sig = (0.9 + 0.6 * rand(g, n)) * scale
    blob = (pts[:, 0], pts[:, 1], sig, sig, torch.full((n,), 2.6))
    half = (2.6 * sig).clamp_min(2.0)[:, None]
    return blob, torch.cat((pts - half, pts + half), 1).clamp(0, s - 1)


def _haemorrhages(
    g: torch.Generator, n: int, c: float, radius: float, avoid: tuple[float, float, float], s: int
) -> tuple[_Blobs, Tensor]:
    """Dot-blot haemorrhages, clusters of 1-3 anisotropic blobs: their blobs and ``(n, 4)`` boxes."""
    scale = s / 256.0
    pts = pick_points(g, n, c, c, 0.7 * radius, avoid)
    sub = 3
    size_h = (2.5 + 3.5 * rand(g, n)) * scale
    offs = randn(g, n, sub, 2).clamp(-1.5, 1.5) * size_h[:, None, None] * 0.6
    keep = torch.arange(sub)[None, :] < torch.randint(1, sub + 1, (n, 1), generator=g)
    m = int(keep.sum())
    bs = size_h[:, None].expand(n, sub)[keep] * (0.6 + 0.5 * rand(g, m))
    ani = 0.7 + 0.6 * rand(g, m)
    centres = (pts[:, None, :] + offs)[keep]  # (m, 2)
    blob = (centres[:, 0], centres[:, 1], bs * ani, bs / ani, torch.full((m,), 2.2))
    ext = (offs.abs() + 2.6 * size_h[:, None, None]).masked_fill(~keep[..., None], 0).amax(1)  # (n, 2)
    return blob, torch.cat((pts - ext, pts + ext), 1).clamp(0, s - 1)


def _hard_exudates(
    g: torch.Generator, n: int, macula: tuple[float, float], c: float, radius: float, s: int
) -> tuple[_Blobs, Tensor]:
    """Clusters of bright yellow dots, mostly around the macula: their blobs and ``(n, 4)`` boxes."""
    scale = s / 256.0
    mac = torch.tensor([macula])
    pts = pick_points(g, n, *macula, 0.5 * radius, (*macula, 0.12 * radius))
    inside = ((pts - c) ** 2).sum(1) < (0.8 * radius) ** 2
    pts = torch.where(inside[:, None], pts, mac + 0.3 * (pts - mac))  # pull outliers towards the macula
    dots = 8
    spread = (3.0 + 6.0 * rand(g, n)) * scale
    doffs = randn(g, n, dots, 2).clamp(-3.0, 3.0) * spread[:, None, None] * 0.5
    dkeep = torch.arange(dots)[None, :] < torch.randint(3, dots + 1, (n, 1), generator=g)
    dsig = (0.8 + 0.9 * rand(g, n, dots)) * scale
    centres = (pts[:, None, :] + doffs)[dkeep]  # (m, 2)
    sig = dsig[dkeep]
    blob = (centres[:, 0], centres[:, 1], sig, sig, torch.full((sig.numel(),), 3.0))
    ext = (doffs.abs() + 2.2 * dsig[..., None]).masked_fill(~dkeep[..., None], 0).amax(1)  # (n, 2)
    return blob, torch.cat((pts - ext, pts + ext), 1).clamp(0, s - 1)


def _cotton_wool_spots(
    g: torch.Generator, n: int, c: float, radius: float, avoid: tuple[float, float, float], s: int
) -> tuple[_Blobs, Tensor]:
    """Pale fluffy spots near the arcades: their blobs and ``(n, 4)`` boxes."""
    scale = s / 256.0
    pts = pick_points(g, n, c, c, 0.68 * radius, avoid)
    csig = (3.5 + 3.5 * rand(g, n)) * scale
    cani = 0.75 + 0.5 * rand(g, n)
    sx, sy = csig * cani, csig / cani
    half = 2.2 * torch.stack((sx, sy), 1)
    return (pts[:, 0], pts[:, 1], sx, sy, torch.full((n,), 1.1)), torch.cat((pts - half, pts + half), 1).clamp(0, s - 1)


def _neovascularisation(
    g: torch.Generator, n: int, disc: tuple[float, float], c: float, radius: float, s: int
) -> tuple[Tensor, Tensor]:
    """Tangles of fine new vessels between the disc and the centre: ``(S, S)`` opacity and ``(n, 4)`` boxes."""
    scale = s / 256.0
    # on the way from the disc towards the centre, so that the tangle stays inside the FOV
    along = 0.35 + 0.35 * rand(g, n, 1)
    centre = torch.tensor([disc]) + along * torch.tensor([[c - disc[0], c - disc[1]]])
    centre = centre + randn(g, n, 2).clamp(-2, 2) * 0.05 * radius
    loops, steps, step = 6, 28, 0.8 * scale
    st = centre.repeat_interleave(loops, 0) + randn(g, n * loops, 2).clamp(-2, 2) * 3 * scale
    pts, _ = walk(g, st, 2 * math.pi * rand(g, n * loops), randn(g, n * loops) * 0.25, steps, step, 0.35)
    widths = torch.full((n * loops * steps,), 0.5 * scale)
    alpha = draw_lines(pts.reshape(-1, 2), widths, step, s, s, torch.tensor([0.5 * scale]))[0]
    pts = pts.reshape(n, loops * steps, 2)
    return alpha, torch.cat((pts.amin(1) - 2 * scale, pts.amax(1) + 2 * scale), 1).clamp(0, s - 1)
