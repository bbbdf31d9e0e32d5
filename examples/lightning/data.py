"""Synthetic four-view data as a ``LightningDataModule``: fundus images, lesion boxes, degraded copies.

Each image of :class:`mlcl_losses.synthetic.SyntheticFundus` is rendered once (in :meth:`setup`);
every epoch :class:`mlcl_losses.views.FourViewDataset` cuts its four views (V1a/V1b lesion,
V2 degraded lesion, V3 healthy, V4 degraded healthy) with a generator seeded from
``(seed, epoch, image)`` and a fresh :class:`~mlcl_losses.degrade.FundusDegradation`, so an epoch's
batches depend only on the seed and the epoch: a run resumed from a checkpoint sees the batches an
uninterrupted run would have seen.

Under DDP every process loads its own shard of each epoch's permutation (a
``DistributedSampler``, which Lightning then leaves as it is) and ``batch_images`` is the global
batch, split evenly over the processes. Source and image ids are dataset-wide, hence unique over
the processes, as the loss's distributed gather needs.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

import lightning as L
from mlcl_losses.degrade import FundusDegradation
from mlcl_losses.synthetic import SyntheticFundus
from mlcl_losses.views import FourViewDataset, FourViewRecord, FourViewSampler, collate_four_views

__all__ = ["FourViewEpochSampler", "SyntheticFourViewData"]


class FourViewEpochSampler(DistributedSampler):
    """A ``DistributedSampler`` whose :meth:`set_epoch` also sets the :class:`FourViewDataset`'s epoch.

    Lightning calls ``set_epoch`` before each epoch; the dataset's epoch enters the seeds of the
    views (patch positions, augmentations, degradations).
    """

    def __init__(
        self,
        dataset: FourViewDataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.views = dataset  # the sampler's `dataset`, typed: DistributedSampler holds it as a plain Dataset

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the permutation and of the views."""
        super().set_epoch(epoch)
        self.views.set_epoch(epoch)


class SyntheticFourViewData(L.LightningDataModule):
    """Four-view batches ``(views (B, 3, P, P), tags (B,))`` of synthetic fundus images.

    Args:
        n_images: training images.
        image_size: side of the rendered images in pixels (>= 32).
        patch_size: side of every view in pixels.
        max_lesions: lesion boxes used per image (each gives V1a, V1b, V2).
        n_healthy: random healthy patches per image (each gives V3, V4).
        batch_images: images per optimiser step over all processes (divisible by their number).
        severity: ``(low, high)`` severity range of the degraded copies.
        seed: seed of the images and of the per-epoch views and order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        n_images: int = 64,
        image_size: int = 96,
        patch_size: int = 32,
        max_lesions: int = 4,
        n_healthy: int = 2,
        batch_images: int = 16,
        severity: tuple[float, float] = (0.3, 1.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("n_images", n_images), ("max_lesions", max_lesions), ("batch_images", batch_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"Expected `image_size` to be an int >= 32, but got {image_size!r}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or not 1 <= patch_size <= image_size:
            raise ValueError(
                f"Expected `patch_size` to be an int in [1, `image_size` ({image_size})], but got {patch_size!r}"
            )
        if batch_images > n_images:
            raise ValueError(f"Expected `batch_images` <= `n_images` ({n_images}), but got {batch_images}")
        self.save_hyperparameters()
        self.n_images, self.image_size, self.max_lesions, self.seed = n_images, image_size, max_lesions, seed
        self.batch_images, self.num_workers = batch_images, num_workers
        self.sampler = FourViewSampler(patch_size=patch_size, n_healthy=n_healthy)
        self.degradation = FundusDegradation(severity=severity, kinds="random")
        self.dataset: FourViewDataset | None = None

    def setup(self, stage: str) -> None:
        """Render the images (once per process)."""
        if self.dataset is not None:
            return
        fundus = SyntheticFundus(n=self.n_images, size=self.image_size, seed=self.seed)
        records = []
        for i in range(len(fundus)):
            sample = fundus[i]
            records.append(
                FourViewRecord(image=sample.clean_image, boxes=sample.boxes[: self.max_lesions], label=sample.grade)
            )
        self.dataset = FourViewDataset(records, self.sampler, self.degradation, base_seed=self.seed)

    def train_dataloader(self) -> DataLoader[Any]:
        """This process's loader; the epoch is Lightning's current one (also right after a resume)."""
        if self.dataset is None:
            raise RuntimeError("call setup('fit') before train_dataloader() (the Trainer does)")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if self.batch_images % world:
            raise ValueError(
                f"`batch_images` ({self.batch_images}) must be divisible by the number of processes ({world})"
            )
        sampler = FourViewEpochSampler(
            self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_images // world,
            sampler=sampler,
            collate_fn=collate_four_views,
            num_workers=self.num_workers,
            drop_last=True,
        )
