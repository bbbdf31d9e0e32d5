"""ChestX-ray14 data for the pipeline: the built-in synthetic look-alike (default) or the real NIH files.

Synthetic (``data.source: synthetic``): :class:`mlcl_losses.synthetic.SyntheticChestXray` train and
test sets (14-label multi-hot targets, lesion boxes, quality Good / Usable / Reject), rendered once
(in ``data.synthetic.workers`` processes) and cached as uint8 tensors under
``data.synthetic.cache_dir``. Each training image gets ``n_view_copies`` degraded copies
(:class:`mlcl_losses.degrade.XrayDegradation`, severity ``pretrain.degradation_severity``, random
kinds) for the low-quality views V2 / V4; epoch ``e`` uses copy ``e % n_view_copies``. Fine-tuning and
evaluation use each sample's own image, degraded according to its quality label.

Real ChestX-ray14 (``data.source: chestxray14``): ``Data_Entry_2017.csv``, ``train_val_list.txt`` /
``test_list.txt`` (patients checked disjoint) and the PNG folder, read with
:mod:`examples.chestxray.readers`. ChestX-ray14 has no image-quality labels, so each image gets a
quality level drawn from ``(data seed, image name)`` (``quality_probs``) and is degraded with an
:class:`~mlcl_losses.degrade.XrayDegradation` of that level's severity (``severity_ranges``; Good
stays clean): the same for every run and every training seed. Lesion boxes for pre-training come
from ``BBox_List_2017.csv`` and/or a detector's JSON (:func:`examples.common.boxes.read_boxes_json`
layout, ``boxes_json`` / ``boxes_split``); only images of the train list are used (the official box
list is mostly test images, which pre-training must not see). Healthy patches come from regions away
from the boxes and from ``No Finding`` training images (``healthy_images`` of them).

Images are grayscale; they are repeated to 3 channels for the encoder, whichever backbone family it
is (torchvision ResNet or timm model): both see the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from examples.chestxray.readers import (
    CHESTXRAY14_LABELS,
    assert_patient_disjoint,
    multi_hot,
    read_bbox_list,
    read_data_entry,
    read_split,
)
from examples.common.boxes import Box, read_boxes_json
from examples.common.config import ConfigError, check
from examples.common.finetune import GradingDataset
from examples.common.images import load_image
from examples.common.pipeline import PipelineData
from examples.common.protocol import label_groups, labelled_subset, unlabelled_label
from examples.common.synthetic_cache import (
    SyntheticSetsConfig,
    degraded_copies,
    render_train_test,
    to_uint8,
)
from examples.common.views import (
    CachedImages,
    EpochFourViewDataset,
    RealViewItem,
    RealViewRecords,
    SyntheticViewRecords,
)
from mlcl_losses.degrade import XrayDegradation, mix_seed
from mlcl_losses.views import FourViewDataset, FourViewSampler

__all__ = [
    "LABELS",
    "QUALITY_NAMES",
    "ChestXrayDataConfig",
    "RealChestXrayConfig",
    "SyntheticConfig",
    "build_data",
    "supcon_label",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
LABELS = CHESTXRAY14_LABELS
QUALITY_NAMES = ("Good", "Usable", "Reject")
#: SupCon needs one label per image: "any finding" (1) versus No Finding (0).
SUPCON_LABEL = "any_finding"


def supcon_label(target: Tensor) -> int:
    """The single label SupCon pre-training uses: 1 if ``target (14,)`` has any finding, else 0."""
    return int(bool(target.bool().any()))


@dataclass
class SyntheticConfig(SyntheticSetsConfig):
    """Synthetic chest X-ray sets (:class:`mlcl_losses.synthetic.SyntheticChestXray`).

    The settings both pipelines share are :class:`~examples.common.synthetic_cache.SyntheticSetsConfig`'s.
    """

    n_train: int = 384
    n_test: int = 384
    seed: int = 2000


@dataclass
class RealChestXrayConfig:
    """Paths of the real ChestX-ray14 files; relative paths are taken from ``root``."""

    root: str | None = None
    data_entry: str = "Data_Entry_2017.csv"
    bbox_list: str | None = "BBox_List_2017.csv"
    train_list: str = "train_val_list.txt"
    test_list: str = "test_list.txt"
    images: str = "images"
    boxes_json: str | None = None
    boxes_split: str = "train"
    healthy_images: int = 1000
    view_image_size: int = 512
    quality_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)
    severity_ranges: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0), (0.3, 0.55), (0.7, 1.0)])
    limit_train: int | None = None
    limit_test: int | None = None

    def validate(self, key: str) -> None:
        check(self.view_image_size >= 16, f"{key}.view_image_size", "an int >= 16", self.view_image_size)
        check(self.healthy_images >= 0, f"{key}.healthy_images", "an int >= 0", self.healthy_images)
        check(
            all(p >= 0 for p in self.quality_probs) and sum(self.quality_probs) > 0,
            f"{key}.quality_probs",
            "3 weights >= 0 with a positive sum",
            list(self.quality_probs),
        )
        check(len(self.severity_ranges) == 3, f"{key}.severity_ranges", "3 ranges [low, high]", self.severity_ranges)
        for i, (lo, hi) in enumerate(self.severity_ranges):
            check(0 <= lo <= hi <= 1, f"{key}.severity_ranges[{i}]", "[low, high] with 0 <= low <= high <= 1", [lo, hi])
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{key}.{name}", "null or an int >= 1", v)
        for name in ("data_entry", "train_list", "test_list", "images"):
            v = getattr(self, name)
            check(v.strip() != "", f"{key}.{name}", "a file or folder path", v)
        for name in ("bbox_list", "boxes_json"):
            v = getattr(self, name)
            check(v is None or v.strip() != "", f"{key}.{name}", "null or a file path", v)


@dataclass
class ChestXrayDataConfig:
    """Where the data comes from and the classifier's input size."""

    source: Literal["synthetic", "chestxray14"] = "synthetic"
    image_size: int = 64
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    chestxray14: RealChestXrayConfig = field(default_factory=RealChestXrayConfig)

    def validate(self, key: str) -> None:
        check(self.source in ("synthetic", "chestxray14"), f"{key}.source", "'synthetic' or 'chestxray14'", self.source)
        if self.source == "synthetic" and self.chestxray14.root is not None:
            raise ConfigError(
                f"{key}.source: is 'synthetic', but {key}.chestxray14.root is set ({self.chestxray14.root!r}); "
                f"set {key}.source=chestxray14 to train on the real ChestX-ray14 files, or drop {key}.chestxray14.root"
            )
        check(self.image_size >= 32, f"{key}.image_size", "an int >= 32", self.image_size)
        self.synthetic.validate(f"{key}.synthetic")
        self.chestxray14.validate(f"{key}.chestxray14")


def _rgb(gray: Tensor) -> Tensor:
    """``(1, H, W)`` -> ``(3, H, W)`` (every encoder, torchvision or timm, takes 3 channels)."""
    return gray.expand(3, -1, -1).contiguous()


def render_sample(
    n: int, size: int, seed: int, index: int, copies: int, severity: tuple[float, float]
) -> dict[str, Any]:
    """Sample ``index`` of ``SyntheticChestXray(n, size, seed)`` as uint8 tensors, with ``copies`` degraded copies."""
    from mlcl_losses.synthetic import SyntheticChestXray

    sample = SyntheticChestXray(n=n, size=size, seed=seed)[index]
    out = {
        "clean": to_uint8(sample.clean_image),
        "image": to_uint8(sample.image),
        "boxes": sample.boxes.clone().float().reshape(-1, 4),
        "labels": sample.labels.clone(),
        "quality": int(sample.quality),
    }
    if copies:
        degrade = XrayDegradation(severity=severity, kinds="random")
        out["view_degraded"] = degraded_copies(degrade, sample.clean_image, seed, index, copies)
    return out


def _synthetic(cfg: Any, seed: int) -> PipelineData:
    sc: SyntheticConfig = cfg.data.synthetic
    size, severity = cfg.data.image_size, tuple(cfg.pretrain.degradation_severity)
    train, test, _ = render_train_test(
        render_sample, "chest", CACHE_VERSION, "chest X-rays", "chestxray", sc, seed, size, severity
    )
    targets, qualities = list(train["labels"]), train["quality"].tolist()
    labelled = _labelled(cfg, targets, qualities, seed)
    # pre-training labels (read by SupCon only): "any finding" inside the labelled subset, a class of its own outside
    keep = set(labelled)
    supcon = [supcon_label(t) if i in keep else unlabelled_label(2, i) for i, t in enumerate(targets)]
    train = dict(train, pretrain_label=torch.tensor(supcon))
    sampler = FourViewSampler(patch_size=cfg.pretrain.patch_size, n_healthy=cfg.pretrain.n_healthy)
    views = EpochFourViewDataset(
        SyntheticViewRecords(train, cfg.pretrain.max_lesions, seed, "pretrain_label", int, _rgb),
        sampler,
        base_seed=seed,
    )
    train_ds = GradingDataset(
        CachedImages(train["image"], _rgb), targets, qualities, cfg.finetune.augment, seed
    ).subset(labelled)
    test_ds = GradingDataset(
        CachedImages(test["image"], _rgb), list(test["labels"]), test["quality"].tolist(), False, seed
    )
    return PipelineData(views, train_ds, test_ds, len(LABELS), QUALITY_NAMES)


def _stratum(target: Tensor) -> int:
    """Stratum of a multi-hot target for the labelled subset: its first finding, -1 for No Finding."""
    hits = target.nonzero().flatten().tolist()
    return int(hits[0]) if hits else -1


def _labelled(cfg: Any, targets: Sequence[Tensor], qualities: Sequence[int], seed: int) -> list[int]:
    """The labelled subset of the training images (stratified by first finding), the same for every method."""
    fine = cfg.finetune
    strata = [_stratum(t) for t in targets]
    return labelled_subset(strata, qualities, fine.label_fraction, label_groups(fine.label_qualities), seed)


# --------------------------------------------------------------------------------------------------
# real ChestX-ray14
# --------------------------------------------------------------------------------------------------


def _path(root: Path | None, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or root is None else root / p


def image_quality(name: str, data_seed: int, probs: Sequence[float]) -> int:
    """The simulated quality level (0 Good, 1 Usable, 2 Reject) of real image ``name``; fixed per data seed."""
    g = torch.Generator().manual_seed(mix_seed(data_seed, *name.encode()))
    return int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=g))


class _DegradedLoader:
    """``i -> (3, S, S)``: image ``i`` resized, degraded at its quality level (seeded by its name)."""

    def __init__(
        self,
        paths: Sequence[Path],
        qualities: Sequence[int],
        size: int,
        ranges: Sequence[tuple[float, float]],
        seed: int,
    ) -> None:
        self.paths, self.qualities, self.size, self.seed = list(paths), list(qualities), size, seed
        self.degrade = [XrayDegradation(severity=r, kinds="random") if r[1] > 0 else None for r in ranges]

    def __call__(self, i: int) -> Tensor:
        image = load_image(self.paths[i], "L", self.size)
        degrade = self.degrade[self.qualities[i]]
        if degrade is not None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 5, *self.paths[i].name.encode()))
            image = degrade(image, generator=g).clamp(0, 1)
        return _rgb(image)


class _GrayDegradation:
    """An :class:`XrayDegradation` for 3-channel copies of a grayscale image: ``(3, H, W) -> (3, H, W)``."""

    def __init__(self, degrade: XrayDegradation) -> None:
        self.degrade = degrade

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return _rgb(self.degrade(image[:1], generator=generator).clamp(0, 1))


def _lesion_boxes(rc: RealChestXrayConfig, root: Path | None) -> tuple[dict[str, list[Box]], dict[str, list[Box]]]:
    """``(lesion boxes, healthy boxes)`` by image name, ``x1, y1, x2, y2`` in the image's pixels."""
    if rc.bbox_list is None and rc.boxes_json is None:
        raise ConfigError(
            "data.chestxray14.bbox_list: the real-data pipeline needs lesion boxes "
            "(BBox_List_2017.csv and/or a detector's boxes_json)"
        )
    lesions: dict[str, list[Box]] = {}
    healthy: dict[str, list[Box]] = {}
    if rc.bbox_list is not None:
        for image, entries in read_bbox_list(_path(root, rc.bbox_list)).items():
            lesions.setdefault(image, []).extend((x, y, x + w, y + h) for _label, (x, y, w, h) in entries)
    if rc.boxes_json is not None:
        tree = read_boxes_json(_path(root, rc.boxes_json))
        if rc.boxes_split not in tree:
            raise ConfigError(
                f"data.chestxray14.boxes_split: split {rc.boxes_split!r} not in the box file (has {sorted(tree)})"
            )
        split = tree[rc.boxes_split]
        for key, boxes in split.unhealthy.items():
            lesions.setdefault(Path(key).name, []).extend(boxes)
        for key, boxes in split.healthy.items():
            healthy.setdefault(Path(key).name, []).extend(boxes)
    return lesions, healthy


def _real(cfg: Any, seed: int) -> PipelineData:
    rc: RealChestXrayConfig = cfg.data.chestxray14
    root = Path(rc.root).expanduser() if rc.root else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"data.chestxray14.root: directory {str(root)!r} does not exist")
    image_dir = _path(root, rc.images)
    if not image_dir.is_dir():
        raise ConfigError(f"data.chestxray14.images: directory {str(image_dir)!r} does not exist")
    records = {r.image: r for r in read_data_entry(_path(root, rc.data_entry))}
    train_names = read_split(_path(root, rc.train_list))
    test_names = read_split(_path(root, rc.test_list))
    assert_patient_disjoint(records.values(), train_names, test_names)
    train_names, test_names = train_names[: rc.limit_train], test_names[: rc.limit_test]
    for names, what in ((train_names, "train"), (test_names, "test")):
        missing = [n for n in names if not (image_dir / n).is_file()]
        if missing:
            raise ConfigError(
                f"data.chestxray14.images: {len(missing)} image(s) of the {what} list are not in {image_dir}, "
                f"e.g. {missing[0]!r}"
            )
    data_seed = cfg.data.synthetic.seed
    ranges = [(lo, hi) for lo, hi in rc.severity_ranges]  # [low, high] lists in YAML
    train_quality = [image_quality(n, data_seed, rc.quality_probs) for n in train_names]
    labelled = _labelled(cfg, [multi_hot(records[n].labels) for n in train_names], train_quality, seed)

    def grading(names: list[str], augment: bool) -> GradingDataset:
        quality = [image_quality(n, data_seed, rc.quality_probs) for n in names]
        loader = _DegradedLoader([image_dir / n for n in names], quality, cfg.data.image_size, ranges, data_seed)
        targets = [multi_hot(records[n].labels) for n in names]
        return GradingDataset(loader, targets, quality, augment, seed)

    train_ds, test_ds = grading(train_names, cfg.finetune.augment).subset(labelled), grading(test_names, False)
    if cfg.run.method == "ce":  # no pre-training: no lesion boxes needed (e.g. the grader of propose_boxes)
        return PipelineData([], train_ds, test_ds, len(LABELS), QUALITY_NAMES)
    lesions, healthy = _lesion_boxes(rc, root)
    train_set = set(train_names)
    not_train = sorted(k for k in lesions if k not in train_set)
    if not_train:
        logger.warning(
            "%d image(s) with lesion boxes are not in the train list and are not used for pre-training, e.g. %s",
            len(not_train),
            not_train[0],
        )
    keep = {train_names[i] for i in labelled}
    position = {n: i for i, n in enumerate(train_names)}

    def supcon(name: str, label: int) -> int:  # SupCon's label only inside the labelled subset
        return label if name in keep else unlabelled_label(2, position[name])

    items = [
        RealViewItem(image_dir / n, lesions[n], healthy.get(n) or None, supcon(n, 1))
        for n in train_names
        if lesions.get(n)
    ]
    if not items:
        raise ConfigError(
            f"data.chestxray14: no image of {rc.train_list} has a lesion box "
            "(the official BBox_List_2017.csv covers mostly test images: give a detector's boxes_json for train images)"
        )
    normal = [n for n in train_names if not records[n].labels and not lesions.get(n)][: rc.healthy_images]
    items += [RealViewItem(image_dir / n, [], healthy.get(n) or None, supcon(n, 0)) for n in normal]
    sampler = FourViewSampler(patch_size=cfg.pretrain.patch_size, n_healthy=cfg.pretrain.n_healthy)
    degradation = _GrayDegradation(XrayDegradation(severity=tuple(cfg.pretrain.degradation_severity), kinds="random"))
    views: FourViewDataset = EpochFourViewDataset(
        RealViewRecords(items, rc.view_image_size, cfg.pretrain.max_lesions, seed, "L", _rgb),
        sampler,
        degradation,
        base_seed=seed,
    )
    return PipelineData(views, train_ds, test_ds, len(LABELS), QUALITY_NAMES)


def build_data(cfg: Any, seed: int) -> PipelineData:
    """The datasets of the configured source, for training seed ``seed``."""
    if cfg.data.source == "synthetic":
        return _synthetic(cfg, seed)
    return _real(cfg, seed)
