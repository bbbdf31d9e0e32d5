"""Data helpers both pipelines use: lesion-box capping, epoch-aware four-view dataset, rendering cache."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from examples.common.checkpoint import write_durably
from examples.common.runlog import progress, show_progress
from mlcl_losses.degrade import mix_seed
from mlcl_losses.views import FourViewDataset, FourViewRecord

__all__ = ["CachedImages", "EpochFourViewDataset", "SyntheticViewRecords", "cap_boxes", "render_cached"]

logger = logging.getLogger(__name__)


def cap_boxes(boxes: Tensor, max_lesions: int, seed: int, epoch: int, index: int) -> Tensor:
    """At most ``max_lesions`` of ``boxes (K, 4)``, a random subset drawn per ``(seed, epoch, index)``."""
    if boxes.shape[0] <= max_lesions:
        return boxes
    g = torch.Generator().manual_seed(mix_seed(seed, 31, epoch, index))
    keep = torch.randperm(boxes.shape[0], generator=g)[:max_lesions].sort().values
    return boxes[keep]


class EpochFourViewDataset(FourViewDataset):
    """A :class:`FourViewDataset` whose records also see the epoch (lesion subsets, degraded copies)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.records, "epoch"):
            self.records.epoch = epoch  # type: ignore[attr-defined]


def _same(image: Tensor) -> Tensor:
    return image


class CachedImages:
    """``i -> to_rgb(images[i] / 255)``: float images in [0, 1] of uint8 ``images (N, C, S, S)``."""

    def __init__(self, images: Tensor, to_rgb: Callable[[Tensor], Tensor] = _same) -> None:
        self.images, self.to_rgb = images, to_rgb

    def __call__(self, i: int) -> Tensor:
        return self.to_rgb(self.images[i].float() / 255.0)


class SyntheticViewRecords(Sequence[FourViewRecord]):
    """Four-view records over a rendered synthetic set; epoch-dependent lesion subset and degraded copy.

    Args:
        data: output of :func:`render_cached` with ``clean``, ``boxes``, ``view_degraded``, ``quality``
            and ``label_key``.
        max_lesions: boxes kept per image and epoch (:func:`cap_boxes`).
        seed: base of the box subsets.
        label_key: key of the targets in ``data``.
        label: target -> the int label of pre-training (e.g. ``int``).
        to_rgb: float image -> the 3-channel image of the encoder.
    """

    def __init__(
        self,
        data: dict[str, Any],
        max_lesions: int,
        seed: int,
        label_key: str,
        label: Callable[[Any], int] = int,
        to_rgb: Callable[[Tensor], Tensor] = _same,
    ) -> None:
        self.data, self.max_lesions, self.seed, self.epoch = data, max_lesions, seed, 0
        self.label_key, self.label, self.to_rgb = label_key, label, to_rgb

    def __len__(self) -> int:
        return int(self.data["clean"].shape[0])

    def __getitem__(self, i: int) -> FourViewRecord:  # type: ignore[override]
        copies = self.data["view_degraded"]
        return FourViewRecord(
            image=self.to_rgb(self.data["clean"][i].float() / 255.0),
            boxes=cap_boxes(self.data["boxes"][i], self.max_lesions, self.seed, self.epoch, i),
            degraded=self.to_rgb(copies[self.epoch % copies.shape[0], i].float() / 255.0),
            label=self.label(self.data[self.label_key][i]),
            quality=int(self.data["quality"][i]),
            image_id=i,
        )


def to_uint8(image: Tensor) -> Tensor:
    """Float image in [0, 1] -> uint8 (0..255), as the synthetic caches store it."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def degraded_copies(degrade: Callable[..., Tensor], clean: Tensor, seed: int, index: int, copies: int) -> Tensor:
    """``copies`` degraded versions of ``clean`` as uint8 ``(copies, C, H, W)``, seeded by ``(seed, copy, index)``."""
    views = []
    for c in range(copies):
        g = torch.Generator().manual_seed(mix_seed(seed, 77, c, index))
        views.append(to_uint8(degrade(clean, generator=g)))
    return torch.stack(views)


def synthetic_cache_path(
    cache_dir: Path, prefix: str, n: int, size: int, seed: int, copies: int, severity: tuple[float, float], version: int
) -> Path:
    """The cache file of one synthetic set: every setting that changes its content is in the name."""
    sev = f"{severity[0]:g}-{severity[1]:g}" if copies else "none"
    return cache_dir / f"{prefix}_v{version}_n{n}_s{size}_seed{seed}_c{copies}_sev{sev}.pt"


def render_cached(
    path: Path,
    render_one: Callable[[Any], dict[str, Any]],
    jobs: Sequence[Any],
    workers: int,
    desc: str,
    listed: Sequence[str] = ("boxes",),
) -> dict[str, Any]:
    """Read ``path`` (a ``torch.save`` file), or render ``render_one(job)`` for every job and cache it there.

    Items are dicts with the same keys. Tensors are stacked along a new first dimension (``view_degraded``,
    ``(copies, ...)`` per item, along dimension 1: ``(copies, N, ...)``), numbers become a tensor and the
    keys in ``listed`` (e.g. a variable number of boxes) stay lists. With ``workers > 1`` the items are
    rendered in a process pool. The file is written atomically and synced to disk (as a checkpoint
    is); an unreadable one is rendered again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # a corrupt cache file is re-rendered
            logger.warning("re-rendering unreadable cache %s (%s)", path, err)
    n = len(jobs)
    if not show_progress():  # a redirected log gets one line instead of a bar
        print(f"{desc} ...", flush=True)
    if workers > 1:
        # not fork: a process forked after torch's OpenMP pool has run (rendering a repeat's data after the
        # previous repeat trained) can hang on a lock held at the fork. A fork server is a clean process
        # (started once, with the renderer's module imported) that forks the workers quickly.
        ctx = multiprocessing.get_context("forkserver" if hasattr(os, "fork") else "spawn")
        if hasattr(os, "fork"):
            ctx.set_forkserver_preload([render_one.__module__])
        with ctx.Pool(workers) as pool:
            items = list(progress(pool.imap(render_one, jobs, chunksize=4), desc, total=n, leave=True))
    else:
        items = [render_one(j) for j in progress(jobs, desc, leave=True)]
    data: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key in listed:
            data[key] = values
        elif key == "view_degraded":
            data[key] = torch.stack(values, 1)  # (copies, N, C, S, S)
        elif isinstance(values[0], Tensor):
            data[key] = torch.stack(values)
        else:
            data[key] = torch.tensor(values)
    write_durably(path, lambda f: torch.save(data, f))  # as durable as a checkpoint
    return data
