"""The label-scarce, quality-shifted benchmark protocol: data draws per repeat and the labelled subset.

Two axes, as in the field's semi-supervised protocol (SimCLR, MoCo: pre-train on every image, then
fine-tune on 1 % / 10 % of the labels): the fraction of training images whose labels fine-tuning uses
(``finetune.label_fraction``) and the image qualities those labelled images may have
(``finetune.label_qualities``). Pre-training always sees every training image and no class label
(SupCon, the supervised baseline, sees the labels of the labelled subset only).

Every repeat (training seed ``s``) draws new synthetic data: training set ``base + 2 s``, test set
``base + 2 s + 1`` (:func:`data_draw_seeds`). A synthetic image is a function of ``(data seed,
index)``, and training seeds are even offsets, test seeds odd ones, so no image is a training image
in one repeat and a test image in any repeat.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from examples.common.config import QUALITY_KEYS
from mlcl_losses.degrade import mix_seed
from mlcl_losses.tags import MAX_LABEL, ViewTags

__all__ = [
    "OWN_LABEL_BASE",
    "batch_own_labels",
    "data_draw_seeds",
    "label_groups",
    "labelled_subset",
    "machine_description",
    "pretrain_folder",
    "pretrain_identity",
    "unlabelled_label",
]


def data_draw_seeds(base: int, seed: int, per_seed: bool = True) -> tuple[int, int]:
    """``(train data seed, test data seed)`` of training seed ``seed``.

    Args:
        base: the configured data seed (``data.synthetic.seed``).
        seed: the training seed of the repeat (``>= 0`` when ``per_seed``).
        per_seed: a new draw per training seed (``base + 2 seed``, ``base + 2 seed + 1``); ``False``
            keeps one draw (``base``, ``base + 1``) for every seed.

    Raises:
        ValueError: ``seed < 0`` with ``per_seed`` (its draw would be another seed's test set).

    Examples:
        >>> data_draw_seeds(1000, 0), data_draw_seeds(1000, 1), data_draw_seeds(1000, 1, per_seed=False)
        ((1000, 1001), (1002, 1003), (1000, 1001))
    """
    if not per_seed:
        return base, base + 1
    if seed < 0:
        raise ValueError(f"Expected the training `seed` >= 0 with a data draw per seed, but got {seed}")
    return base + 2 * seed, base + 2 * seed + 1


def labelled_subset(
    strata: Sequence[Hashable],
    groups: Sequence[int],
    fraction: float,
    allowed_groups: Sequence[int] | None,
    seed: int,
) -> list[int]:
    """Indices (sorted) of the training images whose labels fine-tuning may use.

    Among the images whose group is in ``allowed_groups`` (all when ``None``), ``round(fraction * n)``
    are drawn, allocated to the strata (e.g. disease grades) in proportion to their sizes (largest
    remainders), at least one image per allowed stratum when the total allows; the draw within each
    stratum is a random permutation seeded by ``seed`` alone, so every method of a repeat gets the same
    subset, and a smaller fraction's subset is never drawn from outside a larger one's pool.

    Args:
        strata: stratum of each training image (hashable, e.g. the grade), length ``N``.
        groups: group (quality level) of each training image, length ``N``.
        fraction: share of the allowed images to label, in ``(0, 1]``.
        allowed_groups: groups whose images may be labelled; ``None`` for all.
        seed: the repeat's training seed.

    Raises:
        ValueError: lengths differ, ``fraction`` outside ``(0, 1]``, or no image is allowed.

    Examples:
        >>> labelled_subset([0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 2], 1.0, [0], seed=0)
        [0, 2, 3, 4]
        >>> len(labelled_subset([0] * 50 + [1] * 50, [0] * 100, 0.1, None, seed=3))
        10
    """
    if len(strata) != len(groups):
        raise ValueError(f"`strata` and `groups` must have the same length, got {len(strata)} and {len(groups)}")
    if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ValueError(f"Expected `fraction` in (0, 1], but got {fraction!r}")
    allowed = None if allowed_groups is None else set(allowed_groups)
    pool = [i for i, g in enumerate(groups) if allowed is None or int(g) in allowed]
    if not pool:
        raise ValueError(
            f"no training image has a group in `allowed_groups` {sorted(allowed or [])} (groups present: "
            f"{sorted(set(int(g) for g in groups))})"
        )
    by_stratum: dict[Hashable, list[int]] = {}
    for i in pool:
        by_stratum.setdefault(strata[i], []).append(i)
    keys = sorted(by_stratum, key=repr)  # a fixed order, whatever the hash seed
    total = max(1, round(fraction * len(pool)))
    exact = [fraction * len(by_stratum[k]) for k in keys]
    take = [math.floor(x) for x in exact]
    if total >= len(keys):  # every stratum gets at least one image
        take = [max(1, t) for t in take]
    left = total - sum(take)
    g = torch.Generator().manual_seed(mix_seed(seed, 31))
    tie = torch.rand(len(keys), generator=g).tolist()
    order = sorted(range(len(keys)), key=lambda j: (-(exact[j] - math.floor(exact[j])), tie[j]))
    for j in order:  # largest remainders first
        if left <= 0:
            break
        if take[j] < len(by_stratum[keys[j]]):
            take[j] += 1
            left -= 1
    while left < 0:  # the minimum of one per stratum overshot: take back from the largest strata
        j = max(range(len(keys)), key=lambda j: (take[j], -j))
        take[j] -= 1
        left += 1
    chosen: list[int] = []
    for j, k in enumerate(keys):
        members = by_stratum[k]
        perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(mix_seed(seed, 32, j)))
        chosen += [members[p] for p in perm[: take[j]].tolist()]
    return sorted(chosen)


def label_groups(qualities: Sequence[str] | None) -> list[int] | None:
    """Group ids (0 Good, 1 Usable, 2 Reject) of ``finetune.label_qualities`` names; ``None`` stays ``None``.

    Examples:
        >>> label_groups(["good"]), label_groups(None)
        ([0], None)
    """
    if qualities is None:
        return None
    bad = [q for q in qualities if q not in QUALITY_KEYS]
    if bad:
        raise ValueError(f"Expected quality names from {QUALITY_KEYS}, but got {bad}")
    return sorted(QUALITY_KEYS.index(q) for q in qualities)


#: SupCon labels from here up mean "a class of its own" (images outside the labelled subset); the
#: classes of the labelled images (grades, findings) lie below.
OWN_LABEL_BASE = 16


def unlabelled_label(num_classes: int, index: int) -> int:
    """The pre-training label of an image outside the labelled subset: a class of its own.

    SupCon then treats such an image as an instance (its own views are its only positives), so its
    grade never reaches pre-training. The label is ``OWN_LABEL_BASE + index`` while that fits in the
    view tags (:data:`mlcl_losses.tags.MAX_LABEL`, 8190) and wraps beyond, so in a set of more than
    8,175 images two unlabelled images may share one: :func:`batch_own_labels`, applied to every
    SupCon batch, gives each image of a batch its own label again.

    Raises:
        ValueError: ``num_classes`` above :data:`OWN_LABEL_BASE`.
    """
    if not 0 < num_classes <= OWN_LABEL_BASE:
        raise ValueError(f"Expected `num_classes` in 1..{OWN_LABEL_BASE}, but got {num_classes}")
    return OWN_LABEL_BASE + index % (MAX_LABEL + 1 - OWN_LABEL_BASE)


def batch_own_labels(tags: ViewTags, rank: int = 0, world_size: int = 1) -> ViewTags:
    """Own-class labels (``>= OWN_LABEL_BASE``) made unique per image within a batch of every process.

    Views keep their label when it is a class (below :data:`OWN_LABEL_BASE`); views of an image
    outside the labelled subset get ``OWN_LABEL_BASE + rank * cap + j``, ``j`` the image's position
    among this batch's distinct ``image`` tags and ``cap = (MAX_LABEL + 1 - OWN_LABEL_BASE) //
    world_size``, so no two images share a label in the batch gathered over processes (as SupCon's
    loss sees it under DDP), however large the data set.

    Args:
        tags: ``(N,)`` view tags with ``label`` and ``image``.
        rank: this process's rank; ``world_size``: the number of processes.

    Returns:
        The tags with the new labels (the input is not changed).

    Raises:
        ValueError: tags without ``label`` or ``image``, a bad ``rank``/``world_size``, or more
            unlabelled images in the batch than ``cap``.
    """
    if tags.label is None or tags.image is None:
        raise ValueError("Expected `tags` with `label` and `image` (SupCon's own-class labels are per image)")
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= `rank` < `world_size`, but got rank {rank} and world_size {world_size}")
    own = tags.label >= OWN_LABEL_BASE
    if not bool(own.any()):
        return tags
    cap = (MAX_LABEL + 1 - OWN_LABEL_BASE) // world_size
    images, position = torch.unique(tags.image[own], return_inverse=True)
    if len(images) > cap:
        raise ValueError(
            f"Expected at most {cap} images outside the labelled subset per batch and process "
            f"({world_size} processes), but got {len(images)}"
        )
    label = tags.label.clone()
    label[own] = OWN_LABEL_BASE + rank * cap + position
    return ViewTags(tags.kind, tags.quality, tags.source, label=label, image=tags.image)


def pretrain_identity(identity: dict[str, Any], method: str) -> dict[str, Any]:
    """What a pre-trained encoder depends on: the configuration without fine-tuning settings.

    SupCon's encoder also depends on which labels it saw (``finetune.label_fraction`` and
    ``finetune.label_qualities``); every other method's is shared by every fine-tuning cell.
    """
    out = {k: v for k, v in identity.items() if k != "finetune"}
    if method == "supcon":
        fine = identity.get("finetune", {})
        out["labels"] = {k: fine.get(k) for k in ("label_fraction", "label_qualities")}
    return out


def pretrain_folder(method: str, finetune: Any) -> str:
    """Folder name of ``method``'s encoders: the method, and for SupCon the labels it saw.

    Examples:
        >>> from examples.common.config import FinetuneConfig
        >>> pretrain_folder("comcl", FinetuneConfig(label_fraction=0.1, label_qualities=["good"]))
        'comcl'
        >>> pretrain_folder("supcon", FinetuneConfig(label_fraction=0.1, label_qualities=["good"]))
        'supcon_labels0.1_good'
    """
    if method != "supcon":
        return method
    qualities = "-".join(finetune.label_qualities) if finetune.label_qualities else "all"
    return f"supcon_labels{finetune.label_fraction:g}_{qualities}"


def machine_description() -> str:
    """The CPU (model and logical cores), the accelerator if any, and torch's version, in one line."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}"
