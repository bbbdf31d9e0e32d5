"""EyeQ data for the pipeline: the built-in synthetic look-alike (default) or the real EyeQ files.

Synthetic (``data.source: synthetic``): :class:`mlcl_losses.synthetic.SyntheticFundus` train and
test sets, rendered once (in ``data.synthetic.workers`` processes) and cached as uint8 tensors under
``data.synthetic.cache_dir``. Each training image also gets ``n_view_copies`` degraded copies
(:class:`mlcl_losses.degrade.FundusDegradation`, severity ``pretrain.degradation_severity``, one of
the seven combinations drawn per copy) for the low-quality views V2 / V4; epoch ``e`` uses copy
``e % n_view_copies``. Fine-tuning and evaluation use each sample's own image, degraded according
to its EyeQ-style quality label (Good / Usable / Reject).

Real EyeQ (``data.source: eyeq``): ``Label_EyeQ_train.csv`` / ``Label_EyeQ_test.csv`` and their
image folders (read with :mod:`examples.eyeq.readers`); lesion boxes from a JSON file
(``data.eyeq.boxes_json``), or converted once from the CoMCL authors' pickle
(``data.eyeq.boxes_pickle``, only with ``--allow-pickle``). Pre-training uses the images of the
box file's ``boxes_split`` that are listed in the train CSV, resized to ``view_image_size`` with the
boxes scaled alike; their degraded copies are drawn on the fly. A ``ce`` run (no pre-training) needs
no boxes: it is the grader that ``python -m examples.common.propose_boxes`` proposes boxes with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from examples.common.boxes import SplitBoxes, convert_pickle_boxes, read_boxes_json
from examples.common.config import ConfigError, check
from examples.common.finetune import GradingDataset
from examples.common.images import load_image
from examples.common.pipeline import PipelineData
from examples.common.probes import probe_views
from examples.common.protocol import label_groups, labelled_subset, unlabelled_label
from examples.common.synthetic_cache import SyntheticSetsConfig, degraded_copies, render_train_test
from examples.common.views import (
    CachedImages,
    EpochFourViewDataset,
    RealViewItem,
    RealViewRecords,
    SyntheticViewRecords,
)
from examples.eyeq.readers import EYEQ_DR_GRADES, EYEQ_QUALITY_NAMES, read_eyeq_labels
from mlcl_losses.degrade import FundusDegradation
from mlcl_losses.views import FourViewSampler

__all__ = ["EyeQDataConfig", "RealEyeQConfig", "SyntheticConfig", "build_data"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: faster fundus renderer (two vessel width bins, lesion draws only for present kinds)
QUALITY_NAMES = EYEQ_QUALITY_NAMES  # Good, Usable, Reject
NUM_GRADES = EYEQ_DR_GRADES


@dataclass
class SyntheticConfig(SyntheticSetsConfig):
    """Synthetic fundus sets (:class:`mlcl_losses.synthetic.SyntheticFundus`).

    The settings both pipelines share are :class:`~examples.common.synthetic_cache.SyntheticSetsConfig`'s.

    ``boxes_json``: pre-train on these lesion boxes instead of the rendered (true) ones, to compare box
    sources (proposed, random): split ``train``, keys ``"<train data seed>/<image index>"``, boxes in
    pixels of the ``image_size`` images; a training image without a key has no lesion box.
    """

    n_train: int = 320
    n_test: int = 320
    seed: int = 1000
    boxes_json: str | None = None


@dataclass
class RealEyeQConfig:
    """Paths of the real EyeQ files; relative paths are taken from ``root``."""

    root: str | None = None
    train_csv: str = "Label_EyeQ_train.csv"
    test_csv: str = "Label_EyeQ_test.csv"
    train_images: str = "train"
    test_images: str = "test"
    boxes_json: str | None = None
    boxes_pickle: str | None = None
    boxes_split: str = "train"
    view_image_size: int = 512
    limit_train: int | None = None
    limit_test: int | None = None

    def validate(self, key: str) -> None:
        check(self.view_image_size >= 16, f"{key}.view_image_size", "an int >= 16", self.view_image_size)
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"{key}.{name}", "null or an int >= 1", v)
        for name in ("boxes_json", "boxes_pickle"):
            v = getattr(self, name)
            check(v is None or v.strip() != "", f"{key}.{name}", "null or a file path", v)


@dataclass
class EyeQDataConfig:
    """Where the data comes from and the classifier's input size."""

    source: Literal["synthetic", "eyeq"] = "synthetic"
    image_size: int = 96
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    eyeq: RealEyeQConfig = field(default_factory=RealEyeQConfig)

    def validate(self, key: str) -> None:
        check(self.source in ("synthetic", "eyeq"), f"{key}.source", "'synthetic' or 'eyeq'", self.source)
        if self.source == "synthetic" and self.eyeq.root is not None:
            raise ConfigError(
                f"{key}.source: is 'synthetic', but {key}.eyeq.root is set ({self.eyeq.root!r}); "
                f"set {key}.source=eyeq to train on the real EyeQ files, or drop {key}.eyeq.root"
            )
        check(self.image_size >= 32, f"{key}.image_size", "an int >= 32", self.image_size)
        self.synthetic.validate(f"{key}.synthetic")
        self.eyeq.validate(f"{key}.eyeq")


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


def render_sample(
    n: int, size: int, seed: int, index: int, copies: int, severity: tuple[float, float]
) -> dict[str, Any]:
    """Sample ``index`` of ``SyntheticFundus(n, size, seed)`` as uint8 tensors, with ``copies`` degraded copies."""
    from mlcl_losses.synthetic import SyntheticFundus

    sample = SyntheticFundus(n=n, size=size, seed=seed)[index]
    out = {
        "clean": (sample.clean_image * 255).round().to(torch.uint8),
        "image": (sample.image * 255).round().to(torch.uint8),
        "boxes": sample.boxes.clone(),
        "grade": sample.grade,
        "quality": sample.quality,
    }
    if copies:
        degrade = FundusDegradation(severity=severity, kinds="random", fov=sample.fov[0])
        out["view_degraded"] = degraded_copies(degrade, sample.clean_image, seed, index, copies)
    return out


def _synthetic(cfg: Any, seed: int) -> PipelineData:
    sc: SyntheticConfig = cfg.data.synthetic
    size = cfg.data.image_size
    severity = tuple(cfg.pretrain.degradation_severity)
    train, test, train_seed = render_train_test(
        render_sample, "fundus", CACHE_VERSION, "fundus images", "eyeq", sc, seed, size, severity
    )
    if sc.boxes_json is not None:
        train = dict(train, boxes=_boxes_from_json(Path(sc.boxes_json), train_seed, sc.n_train, size))
    grades, qualities = train["grade"].tolist(), train["quality"].tolist()
    labelled = _labelled(cfg, grades, qualities, seed)
    # pre-training labels (read by SupCon only): the grade inside the labelled subset, a class of its own outside
    train = dict(train, pretrain_label=torch.tensor(_pretrain_labels(grades, labelled)))
    sampler = FourViewSampler(patch_size=cfg.pretrain.patch_size, n_healthy=cfg.pretrain.n_healthy)
    views = EpochFourViewDataset(
        SyntheticViewRecords(train, cfg.pretrain.max_lesions, seed, "pretrain_label"), sampler, base_seed=seed
    )
    train_ds = GradingDataset(CachedImages(train["image"]), grades, qualities, cfg.finetune.augment, seed).subset(
        labelled
    )
    test_ds = GradingDataset(CachedImages(test["image"]), test["grade"].tolist(), test["quality"].tolist(), False, seed)
    pc = cfg.pretrain  # the probes' patches: the held-out test images, each with a degraded copy of its own
    degrade = FundusDegradation(severity=severity, kinds="random")
    probe = probe_views(test["clean"], test["boxes"], degrade, pc.patch_size, pc.n_healthy, pc.max_lesions, seed)
    return PipelineData(views, train_ds, test_ds, NUM_GRADES, QUALITY_NAMES, probe)


def _boxes_from_json(path: Path, train_seed: int, n: int, size: int) -> list[Tensor]:
    """The ``(K, 4)`` boxes of each synthetic training image from a box JSON (``SyntheticConfig.boxes_json``)."""
    tree = read_boxes_json(path)
    if "train" not in tree:
        raise ConfigError(f"data.synthetic.boxes_json: {path} has no split 'train' (has {sorted(tree)})")
    found = tree["train"].unhealthy
    mine = [f"{train_seed}/{i}" for i in range(n)]
    if found and not set(found) & set(mine):
        raise ConfigError(
            f"data.synthetic.boxes_json: no key of {path} names a training image of data seed {train_seed} "
            f"(expected keys like {mine[0]!r}, got e.g. {next(iter(found))!r})"
        )
    return [torch.tensor(found.get(key, []), dtype=torch.float32).reshape(-1, 4).clamp(0, size) for key in mine]


def _labelled(cfg: Any, grades: Sequence[int], qualities: Sequence[int], seed: int) -> list[int]:
    """The labelled subset of the training images (stratified by grade), the same for every method."""
    fine = cfg.finetune
    return labelled_subset(grades, qualities, fine.label_fraction, label_groups(fine.label_qualities), seed)


def _pretrain_labels(grades: Sequence[int], labelled: Sequence[int]) -> list[int]:
    keep = set(labelled)
    return [int(g) if i in keep else unlabelled_label(NUM_GRADES, i) for i, g in enumerate(grades)]


# --------------------------------------------------------------------------------------------------
# real EyeQ
# --------------------------------------------------------------------------------------------------


def _path(root: Path | None, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or root is None else root / p


def _existing_dir(p: Path, what: str) -> Path:
    if not p.is_dir():
        raise ConfigError(f"{what}: directory {str(p)!r} does not exist")
    return p


class _ImageLoader:
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __call__(self, i: int) -> Tensor:
        return load_image(self.paths[i], "RGB", self.size)


def load_boxes(cfg: RealEyeQConfig, root: Path | None, allow_pickle: bool) -> dict[str, SplitBoxes]:
    """The lesion boxes: from ``boxes_json``, or converted from ``boxes_pickle`` (needs ``allow_pickle``)."""
    json_path = None if cfg.boxes_json is None else _path(root, cfg.boxes_json)
    if cfg.boxes_pickle is not None and (json_path is None or not json_path.exists()):
        if not allow_pickle:
            raise ConfigError(
                f"data.eyeq.boxes_pickle: refusing to unpickle {cfg.boxes_pickle!r} (a pickle can run arbitrary code); "
                "pass --allow-pickle for a file from a source you trust, or give data.eyeq.boxes_json"
            )
        pkl = _path(root, cfg.boxes_pickle)
        json_path = json_path or pkl.with_suffix(".json")
        return convert_pickle_boxes(pkl, json_path, allow_pickle=True)
    if json_path is None:
        raise ConfigError(
            "data.eyeq.boxes_json: the real-data pipeline needs lesion boxes (a JSON file, or boxes_pickle)"
        )
    return read_boxes_json(json_path)


def _real(cfg: Any, seed: int, allow_pickle: bool) -> PipelineData:
    rc: RealEyeQConfig = cfg.data.eyeq
    root = Path(rc.root).expanduser() if rc.root else None
    if root is not None:
        _existing_dir(root, "data.eyeq.root")
    train_dir = _existing_dir(_path(root, rc.train_images), "data.eyeq.train_images")
    test_dir = _existing_dir(_path(root, rc.test_images), "data.eyeq.test_images")
    train_rows = read_eyeq_labels(_path(root, rc.train_csv))[: rc.limit_train]
    test_rows = read_eyeq_labels(_path(root, rc.test_csv))[: rc.limit_test]
    for rows, folder, name in ((train_rows, train_dir, "train"), (test_rows, test_dir, "test")):
        missing = [r.image for r in rows if not (folder / r.image).is_file()]
        if missing:
            raise ConfigError(
                f"data.eyeq.{name}_images: {len(missing)} image(s) of the {name} CSV are not in {folder}, "
                f"e.g. {missing[0]!r}"
            )
    labelled = _labelled(cfg, [r.dr_grade for r in train_rows], [r.quality for r in train_rows], seed)
    size = cfg.data.image_size
    train_ds = GradingDataset(
        _ImageLoader([train_dir / r.image for r in train_rows], size),
        [r.dr_grade for r in train_rows],
        [r.quality for r in train_rows],
        cfg.finetune.augment,
        seed,
    ).subset(labelled)
    test_ds = GradingDataset(
        _ImageLoader([test_dir / r.image for r in test_rows], size),
        [r.dr_grade for r in test_rows],
        [r.quality for r in test_rows],
        False,
        seed,
    )
    if cfg.run.method == "ce":  # no pre-training: no lesion boxes needed (e.g. the grader of propose_boxes)
        return PipelineData([], train_ds, test_ds, NUM_GRADES, QUALITY_NAMES)
    boxes = load_boxes(rc, root, allow_pickle)
    if rc.boxes_split not in boxes:
        raise ConfigError(f"data.eyeq.boxes_split: split {rc.boxes_split!r} not in the box file (has {sorted(boxes)})")
    split = boxes[rc.boxes_split]
    pretrain_label = dict(
        zip([r.image for r in train_rows], _pretrain_labels([r.dr_grade for r in train_rows], labelled), strict=True)
    )
    by_name = {r.image: r for r in train_rows}
    items: list[RealViewItem] = []
    skipped = 0
    for key in sorted(set(split.unhealthy) | set(split.healthy)):
        row = by_name.get(Path(key).name)
        if row is None:
            skipped += 1
            continue
        items.append(
            RealViewItem(
                train_dir / row.image,
                split.unhealthy.get(key, []),
                split.healthy.get(key) or None,
                pretrain_label[row.image],  # SupCon's label: the grade only inside the labelled subset
                row.quality,
            )
        )
    if skipped:
        logger.warning(
            "%d image(s) of the box file are not in the train CSV and are not used for pre-training", skipped
        )
    if not items:
        raise ConfigError(f"data.eyeq.boxes_json: no image of split {rc.boxes_split!r} is listed in {rc.train_csv}")
    sampler = FourViewSampler(patch_size=cfg.pretrain.patch_size, n_healthy=cfg.pretrain.n_healthy)
    degradation = FundusDegradation(severity=tuple(cfg.pretrain.degradation_severity), kinds="random")
    views = EpochFourViewDataset(
        RealViewRecords(items, rc.view_image_size, cfg.pretrain.max_lesions, seed), sampler, degradation, base_seed=seed
    )
    return PipelineData(views, train_ds, test_ds, NUM_GRADES, QUALITY_NAMES)


def build_data(cfg: Any, seed: int, allow_pickle: bool = False) -> PipelineData:
    """The datasets of the configured source, for training seed ``seed``."""
    if cfg.data.source == "synthetic":
        return _synthetic(cfg, seed)
    return _real(cfg, seed, allow_pickle)
