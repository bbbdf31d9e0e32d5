"""Synthetic frontal chest radiographs with ChestX-ray14-style findings and quality labels.

Each image shows the thorax (soft tissue, spine, clavicles, posterior ribs), two lung fields
with vascular markings from the hila, the heart and the diaphragm domes, and 0-3 findings
among the 14 ChestX-ray14 labels (:data:`~mlcl_losses.synthetic.CHESTXRAY14_LABELS`, official order). Localised
findings come with a box (``x1, y1, x2, y2`` pixels); diffuse ones (Edema, Emphysema,
Fibrosis) with none. How each finding is drawn:

=====================  ==========================================================  =====
label                  appearance                                                  box
=====================  ==========================================================  =====
Atelectasis            plate-like horizontal opacity in a lower zone               yes
Cardiomegaly           heart widened (cardiothoracic ratio > 0.5)                  yes
Effusion               fluid layer at a lung base with a meniscus                  yes
Infiltration           several faint ill-defined opacities                         yes
Mass                   large round opacity                                         yes
Nodule                 small round opacity                                         yes
Pneumonia              patchy airspace opacity in one zone                         yes
Pneumothorax           lucent rim without lung markings, visible pleural line      yes
Consolidation          dense homogeneous opacity                                   yes
Edema                  bilateral perihilar haze                                    no
Emphysema              hyperlucent, taller lungs, flattened diaphragm              no
Fibrosis               reticular pattern in the lower, peripheral zones            no
Pleural_Thickening     bright band along the lateral chest wall                    yes
Hernia                 retrocardiac round opacity with an air-fluid level          yes
=====================  ==========================================================  =====

The quality label (0 Good, 1 Usable, 2 Reject) is made by
:func:`~mlcl_losses.degrade.degrade_xray` at a severity rising with the label and a random
non-empty set of X-ray degradations; the clean image is returned too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mlcl_losses._seeding import mix_seed
from mlcl_losses.degrade.xray import degrade_xray, random_xray_kinds
from mlcl_losses.synthetic._arguments import check_dataset_shape, check_probs, check_severity_ranges
from mlcl_losses.synthetic._draw import blobs, choice, draw_lines, rand, randn, render_sample, smooth_noise, walk

__all__ = ["CHESTXRAY14_LABELS", "ChestXraySample", "SyntheticChestXray"]

logger = logging.getLogger(__name__)

#: The 14 ChestX-ray14 labels in the official order (``Data_Entry_2017.csv``).
CHESTXRAY14_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
(ATL, CARD, EFF, INF, MASS, NOD, PNA, PTX, CONS, EDEMA, EMPH, FIB, PT, HERNIA) = range(14)
#: Labels drawn with a box.
LOCALISED: frozenset[int] = frozenset(range(14)) - {EDEMA, EMPH, FIB}

# Default weights of the findings (flattened ChestX-ray14-like frequencies; a choice, not data).
_LABEL_WEIGHTS = (10.0, 5.0, 10.0, 12.0, 7.0, 7.0, 4.0, 7.0, 6.0, 4.0, 4.0, 3.5, 5.0, 2.0)


@dataclass(frozen=True)
class ChestXraySample:
    """One synthetic chest radiograph.

    Attributes:
        index: index of the sample in its dataset.
        image: ``(1, S, S)`` float32 in [0, 1], degraded according to ``quality``.
        clean_image: ``(1, S, S)`` float32 in [0, 1], before degradation.
        labels: ``(14,)`` float32 multi-hot over :data:`~mlcl_losses.synthetic.CHESTXRAY14_LABELS` (all 0 = No Finding).
        boxes: ``(K, 4)`` float32 boxes ``x1, y1, x2, y2`` of the localised findings.
        box_labels: ``(K,)`` int64 label index of each box.
        quality: 0 Good, 1 Usable, 2 Reject.
        severity: degradation severity in [0, 1] used to make ``image``.
        degradations: names of the degradations applied (empty when ``severity`` is 0).
    """

    index: int
    image: Tensor
    clean_image: Tensor
    labels: Tensor
    boxes: Tensor
    box_labels: Tensor
    quality: int
    severity: float
    degradations: tuple[str, ...]

    @property
    def label_names(self) -> list[str]:
        """Names of the positive labels (empty list for No Finding)."""
        return [CHESTXRAY14_LABELS[i] for i in torch.nonzero(self.labels).flatten().tolist()]


class SyntheticChestXray:
    """Indexable dataset of synthetic chest radiographs (a ``Dataset``-like sequence).

    Sample ``i`` depends only on ``(seed, i)``.

    Args:
        n: number of samples.
        size: side ``S`` of the square images (>= 32).
        seed: base seed.
        normal_prob: probability of No Finding.
        label_probs: 14 weights of the findings (default: flattened ChestX-ray14-like frequencies).
        quality_probs: weights of quality labels Good, Usable, Reject.
        severity_ranges: severity range of each quality label; must rise with the label.

    Examples:
        >>> data = SyntheticChestXray(n=3, size=64, seed=0)
        >>> sample = data[0]
        >>> sample.image.shape, sample.labels.shape, sample.boxes.shape[1]
        (torch.Size([1, 64, 64]), torch.Size([14]), 4)
    """

    def __init__(
        self,
        n: int,
        size: int = 256,
        seed: int = 0,
        normal_prob: float = 0.4,
        label_probs: Sequence[float] = _LABEL_WEIGHTS,
        quality_probs: Sequence[float] = (0.5, 0.3, 0.2),
        severity_ranges: Sequence[tuple[float, float]] = ((0.0, 0.1), (0.3, 0.55), (0.7, 1.0)),
    ) -> None:
        check_dataset_shape(n, size, seed)
        if not 0.0 <= normal_prob <= 1.0:
            raise ValueError(f"Expected `normal_prob` in [0, 1], but got {normal_prob!r}")
        self.n, self.size, self.seed, self.normal_prob = n, size, seed, float(normal_prob)
        self.label_probs = check_probs("label_probs", label_probs, 14)
        self.quality_probs = check_probs("quality_probs", quality_probs, 3)
        self.severity_ranges = check_severity_ranges(severity_ranges)

    def __len__(self) -> int:
        """Number of samples."""
        return self.n

    def __getitem__(self, index: int) -> ChestXraySample:
        """Render sample ``index`` (negative indices count from the end)."""
        return render_sample(index, self.n, self._render)

    def _render(self, index: int) -> ChestXraySample:
        g = torch.Generator().manual_seed(mix_seed(self.seed, index, 1))
        labels = torch.zeros(14)
        if float(rand(g, 1)) >= self.normal_prob:
            k = 1 + choice(g, torch.tensor([0.55, 0.3, 0.15]))
            labels[torch.multinomial(self.label_probs, k, replacement=False, generator=g)] = 1.0
        quality = choice(g, self.quality_probs)
        low, high = self.severity_ranges[quality]
        severity = low + (high - low) * float(rand(g, 1))
        kinds = random_xray_kinds(g)
        clean, boxes, box_labels = render_chest_xray(self.size, labels, g)
        if severity > 0:
            image = degrade_xray(clean, severity, kinds, generator=g)
        else:
            image, kinds = clean.clone(), ()
        return ChestXraySample(
            index=index,
            image=image,
            clean_image=clean,
            labels=labels,
            boxes=boxes,
            box_labels=box_labels,
            quality=quality,
            severity=severity,
            degradations=tuple(kinds),
        )


def _ellipse(u: Tensor, v: Tensor, cx: float, cy: float, rx: float, ry: float, soft: float) -> Tensor:
    """Soft ellipse indicator ``(S, S)`` in [0, 1] in normalised coordinates."""
    d = torch.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return torch.sigmoid((1.0 - d) / soft)


def render_chest_xray(size: int, labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Render one clean synthetic chest radiograph with the given findings.

    Args:
        size: side ``S`` in pixels.
        labels: ``(14,)`` multi-hot findings (:data:`~mlcl_losses.synthetic.CHESTXRAY14_LABELS` order).
        g: source of randomness (CPU generator).

    Returns:
        ``image (1, S, S)`` float32 in [0, 1], ``boxes (K, 4)`` float32 ``x1, y1, x2, y2`` pixels,
        ``box_labels (K,)`` int64.
    """
    s = size
    scale = s / 256.0
    on = set(torch.nonzero(labels).flatten().tolist())
    u = (torch.arange(s, dtype=torch.float32).view(1, s) + 0.5) / s
    v = (torch.arange(s, dtype=torch.float32).view(s, 1) + 0.5) / s
    jit = 0.015 * randn(g, 12)
    # body: soft tissue inside the thorax outline, air outside; shoulders at the top
    body = _ellipse(u, v, 0.5 + jit[0].item(), 0.62, 0.47, 0.6, 0.03)
    img = 0.08 + 0.42 * body + 0.04 * smooth_noise(g, (s, s), 6)[0]
    # lungs: two ellipses cut by the diaphragm domes; emphysema makes them taller and darker
    emph = EMPH in on
    tall = 0.04 if emph else 0.0
    lungs = torch.zeros(s, s)
    side_lungs: list[Tensor] = []
    lung_geo = []
    for side in (-1, 1):
        cx = 0.5 + side * (0.2 + jit[1 + (side > 0)].item())
        cy, rx, ry = 0.44 + tall / 2, 0.158 + 0.01 * jit[3].item(), 0.31 + tall
        dome = 0.7 + tall + jit[4].item() - (0.02 if emph else 0.06) * ((u - cx) / rx) ** 2  # (1, S)
        lung = _ellipse(u, v, cx, cy, rx, ry, 0.09) * torch.sigmoid((dome - v) / 0.015)
        lungs = torch.maximum(lungs, lung)
        side_lungs.append(lung)
        lung_geo.append((cx, cy, rx, ry, float(dome.max())))
    # heart: left of the patient = right of the image; cardiomegaly widens it
    wide = 1.4 + 0.1 * float(rand(g, 1)) if CARD in on else 1.0
    hcx, hcy, hrx, hry = 0.55, 0.62 + jit[5].item(), 0.14 * wide, 0.12
    heart = _ellipse(u, v, hcx, hcy, hrx, hry, 0.05)
    mediast = torch.sigmoid((0.055 - (u - 0.5).abs()) / 0.01) * torch.sigmoid((0.62 - v) / 0.05)
    lungs = lungs * (1 - heart) * (1 - mediast)
    # lung markings: vessels fanning out from the hila
    n_br = 14
    hila = torch.tensor([[0.42, 0.47], [0.59, 0.47]]).repeat_interleave(n_br // 2, 0) * s
    ang = torch.where(torch.arange(n_br) < n_br // 2, math.pi, 0.0) + (rand(g, n_br) - 0.5) * 2.4
    step = 1.5 * scale
    pts, _ = walk(g, hila, ang, randn(g, n_br) * 0.004, int(0.2 * s / step), step, 0.08)
    widths = torch.linspace(1.4, 0.5, pts.shape[1]).repeat(n_br) * scale
    markings = draw_lines(pts.reshape(-1, 2), widths, step, s, s, torch.tensor([0.6, 1.1]) * scale)[0]
    dark = 0.42 if emph else 0.33
    img = img - dark * lungs * (1.0 - 0.18 * markings)
    # posterior ribs over the lungs, clavicles, spine
    lateral = (u - 0.5).abs()
    phase = (v - 0.4 * lateral - 1.2 * (lateral - 0.15) ** 2 + jit[6].item()) / (0.078 + 0.004 * jit[7].item())
    ribs = torch.sigmoid((torch.cos(2 * math.pi * phase) - 0.55) * 8.0) * torch.sigmoid((lateral - 0.06) / 0.02)
    ribs = ribs * torch.sigmoid((0.8 - v) / 0.03) * torch.sigmoid((v - 0.1) / 0.03) * body
    img = img + 0.11 * ribs * (0.12 + 0.88 * lungs)
    for side in (-1, 1):  # clavicles: bright bands from the sternum to the shoulders
        x0, y0, x1, y1 = 0.5 + side * 0.05, 0.2 + jit[8].item(), 0.5 + side * 0.33, 0.13 + jit[9].item()
        t = (((u - x0) * (x1 - x0) + (v - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2)).clamp(0, 1)
        dist = torch.sqrt((u - x0 - t * (x1 - x0)) ** 2 + (v - y0 - t * (y1 - y0)) ** 2)
        img = img + 0.16 * torch.sigmoid((0.014 - dist) / 0.004)
    img = img + 0.12 * torch.sigmoid((0.04 - lateral) / 0.008) * (0.85 + 0.15 * torch.cos(2 * math.pi * v / 0.045))
    img = img + 0.08 * heart
    # findings
    boxes: list[list[float]] = []
    box_labels: list[int] = []

    def add_box(label: int, cx: float, cy: float, hx: float, hy: float) -> None:
        boxes.append([(cx - hx) * s, (cy - hy) * s, (cx + hx) * s, (cy + hy) * s])
        box_labels.append(label)

    def add_cluster_box(label: int, bx: Tensor, by: Tensor, margin: Tensor) -> None:
        """Box around blob centres ``(bx, by)`` (normalised), widened by ``margin`` on each side."""
        add_box(
            label,
            float((bx.min() + bx.max()) / 2),
            float((by.min() + by.max()) / 2),
            float((bx.max() - bx.min()) / 2 + margin),
            float((by.max() - by.min()) / 2 + margin),
        )

    def lung_point(side: int, v_low: float, v_high: float) -> tuple[float, float]:
        cx, cy, rx, ry, _ = lung_geo[(side + 1) // 2]
        r = rand(g, 2)
        py = v_low + (v_high - v_low) * float(r[0])
        half = rx * math.sqrt(max(0.05, 1 - ((py - cy) / ry) ** 2)) * 0.7
        return cx + half * (2 * float(r[1]) - 1), py

    sides = torch.where(rand(g, 14) < 0.5, -1, 1).tolist()
    if ATL in on:
        cx, cy = lung_point(sides[ATL], 0.58, 0.66)
        hx, hy = 0.07 + 0.02 * float(rand(g, 1)), 0.012
        img = img + 0.22 * blobs(
            s,
            s,
            torch.tensor([cx * s]),
            torch.tensor([cy * s]),
            torch.tensor([hx * s / 2]),
            torch.tensor([hy * s]),
            torch.ones(1),
        ).clamp(max=1)
        add_box(ATL, cx, cy, hx * 1.1, hy * 2.5)
    if CARD in on:
        add_box(CARD, hcx, hcy, hrx * 1.05, hry * 1.05)
    if EFF in on:
        side = sides[EFF]
        cx, cy, rx, ry, dome_v = lung_geo[(side + 1) // 2]
        level = dome_v - 0.1 - 0.1 * float(rand(g, 1))
        meniscus = level - 0.08 * ((u - cx) * side / rx).clamp(min=0) ** 2  # fluid climbs laterally
        fluid = torch.sigmoid((v - meniscus) / 0.01) * side_lungs[(side + 1) // 2]
        img = img + 1.1 * dark * fluid
        top = level - 0.08
        add_box(EFF, cx, (top + dome_v) / 2, rx * 1.05, (dome_v - top) / 2 + 0.01)
    if INF in on:
        cx, cy = lung_point(sides[INF], 0.3, 0.6)
        m = 5
        bx = cx + 0.05 * randn(g, m).clamp(-1.5, 1.5)
        by = cy + 0.05 * randn(g, m).clamp(-1.5, 1.5)
        sig = 0.015 + 0.015 * rand(g, m)
        img = img + 0.14 * blobs(s, s, bx * s, by * s, sig * s, sig * s, torch.ones(m)).clamp(max=1)
        add_cluster_box(INF, bx, by, 2 * sig.max())
    for label, (r_lo, r_hi), amp in ((MASS, (0.035, 0.05), 0.3), (NOD, (0.008, 0.014), 0.28)):
        if label in on:
            cx, cy = lung_point(sides[label], 0.22, 0.6)
            r = r_lo + (r_hi - r_lo) * float(rand(g, 1))
            blob = blobs(
                s,
                s,
                torch.tensor([cx * s]),
                torch.tensor([cy * s]),
                torch.tensor([r * s]),
                torch.tensor([r * s]),
                torch.ones(1),
            )
            img = img + amp * (blob * 2.0).clamp(max=1)
            add_box(label, cx, cy, 1.6 * r, 1.6 * r)
    for label, amp, spread in ((PNA, 0.2, 0.06), (CONS, 0.3, 0.045)):
        if label in on:
            cx, cy = lung_point(sides[label], 0.35, 0.62)
            m = 6
            bx = cx + spread * (rand(g, m) - 0.5) * 2
            by = cy + spread * (rand(g, m) - 0.5) * 1.5
            sig = spread * (0.35 + 0.3 * rand(g, m))
            field = blobs(s, s, bx * s, by * s, sig * s, sig * s, torch.ones(m)) * (1.6 if label == CONS else 1.0)
            if label == PNA:
                field = field * (0.75 + 0.25 * smooth_noise(g, (s, s), 40)[0])
            img = img + amp * field.clamp(0, 1) * (0.3 + 0.7 * lungs)
            add_cluster_box(label, bx, by, 1.6 * sig.max())
    if PTX in on:
        side = sides[PTX]
        cx, cy, rx, ry, _ = lung_geo[(side + 1) // 2]
        shrink = 0.75 + 0.12 * float(rand(g, 1))
        ccx, ccy = cx - side * rx * (1 - shrink) * 0.9, cy + ry * (1 - shrink) * 0.6
        collapsed = _ellipse(u, v, ccx, ccy, rx * shrink, ry * shrink, 0.02)
        side_mask = torch.sigmoid(((u - 0.5) * side - 0.02) / 0.01)
        region = lungs * (1 - collapsed) * side_mask
        img = img - 0.1 * region + 0.5 * 0.18 * markings * region  # no markings in the air rim
        rim = torch.sqrt(((u - ccx) / (rx * shrink)) ** 2 + ((v - ccy) / (ry * shrink)) ** 2)
        img = img + 0.12 * torch.exp(-(((rim - 1.0) / 0.012) ** 2)) * lungs * side_mask
        add_box(PTX, cx, cy - ry * 0.15, rx * 1.05, ry * 0.85)
    if EDEMA in on:
        haze = blobs(
            s,
            s,
            torch.tensor([0.4, 0.61]) * s,
            torch.tensor([0.5, 0.5]) * s,
            torch.tensor([0.09, 0.09]) * s,
            torch.tensor([0.12, 0.12]) * s,
            torch.ones(2),
        )
        img = img + 0.16 * haze.clamp(max=1) * lungs
    if FIB in on:
        net = smooth_noise(g, (s, s), 64)[0]
        reticular = torch.exp(-((net / 0.35) ** 2))  # thin lines along the zero set of a random field
        zone = torch.sigmoid((v - 0.45) / 0.05) * torch.sigmoid((lateral - 0.12) / 0.04)
        img = img + 0.12 * reticular * lungs * zone
    if PT in on:
        side = sides[PT]
        cx, cy, rx, ry, _ = lung_geo[(side + 1) // 2]
        ring = torch.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
        band = torch.sigmoid((ring - 0.9) / 0.02) * torch.sigmoid((1.02 - ring) / 0.02)
        lateral_side = torch.sigmoid(((u - cx) * side) / 0.01) * torch.sigmoid((cy + 0.1 - v) / 0.03)
        img = img + 0.18 * band * lateral_side
        add_box(PT, cx + side * rx * 0.7, cy - ry * 0.25, rx * 0.35, ry * 0.7)
    if HERNIA in on:
        hx, hy, r = 0.5 + 0.02 * float(randn(g, 1)), hcy + 0.04, 0.035 + 0.01 * float(rand(g, 1))
        disc = _ellipse(u, v, hx, hy, r, r * 0.9, 0.05)
        air = disc * torch.sigmoid((hy - 0.2 * r - v) / 0.004)
        img = img + 0.15 * disc - 0.2 * air
        add_box(HERNIA, hx, hy, r * 1.15, r * 1.05)
    img = img + 0.012 * smooth_noise(g, (s, s), 90)[0]
    img = img.clamp(0, 1).unsqueeze(0).float()
    if boxes:
        box_t = torch.tensor(boxes, dtype=torch.float32).clamp(0, s - 1)
    else:
        box_t = torch.zeros(0, 4)
    return img, box_t, torch.tensor(box_labels, dtype=torch.long)
