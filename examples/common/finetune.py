"""Supervised fine-tuning of the (pre-trained) encoder with a linear classifier on whole images."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from examples.common import ddp
from examples.common.config import FinetuneConfig
from examples.common.models import Classifier
from examples.common.pretrain import build_optimizer
from examples.common.runlog import progress
from mlcl_losses.degrade import mix_seed

__all__ = [
    "FinetuneState",
    "GradingDataset",
    "argmax_correct",
    "build_finetune",
    "cross_entropy_loss",
    "finetune_epoch",
]


class _SubsetLoader:
    """``i -> load(indices[i])`` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, load: Callable[[int], Tensor], indices: list[int]) -> None:
        self.load, self.indices = load, indices

    def __call__(self, i: int) -> Tensor:
        return self.load(self.indices[i])


class GradingDataset(Dataset[tuple[Tensor, int | Tensor, int]]):
    """Images with a target and a group (e.g. image quality) for fine-tuning and evaluation.

    Item ``i`` is ``(image (C, S, S) float in [0, 1], target, group)``. With ``augment`` each image is
    flipped and rotated by a multiple of 90 degrees, drawn from a generator seeded by
    ``(seed, epoch, i)``: the same whatever the number of DataLoader workers, and the same after
    resuming. Call :meth:`set_epoch` before each epoch.

    Args:
        load: ``i -> (C, S, S)`` float image.
        targets: per image its class (an int) or, multi-label, its ``(C,)`` multi-hot tensor.
        groups: group of each image.
        augment: random flips and 90-degree rotations.
        seed: base of the per-item seeds.
    """

    def __init__(
        self,
        load: Callable[[int], Tensor],
        targets: Sequence[int | Tensor],
        groups: Sequence[int],
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if len(targets) != len(groups):
            raise ValueError(f"`targets` and `groups` must have the same length, got {len(targets)} and {len(groups)}")
        self.load, self.targets, self.groups = load, list(targets), list(groups)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset(self, indices: Sequence[int]) -> GradingDataset:
        """The images ``indices`` (e.g. the labelled subset) as a dataset of their own, same settings."""
        n = len(self.targets)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"Expected `indices` in [0, {n}), but got {bad[:5]}")
        keep = list(indices)
        return GradingDataset(
            _SubsetLoader(self.load, keep),
            [self.targets[i] for i in keep],
            [self.groups[i] for i in keep],
            self.augment,
            self.seed,
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int | Tensor, int]:
        image = self.load(i)
        if self.augment:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
            r = torch.rand(3, generator=g).tolist()
            if r[0] < 0.5:
                image = image.flip(-1)
            if r[1] < 0.5:
                image = image.flip(-2)
            image = torch.rot90(image, int(r[2] * 4) % 4, dims=(-2, -1))
        return image.contiguous(), self.targets[i], self.groups[i]


@dataclass
class FinetuneState:
    """Everything fine-tuning changes (saved in checkpoints)."""

    model: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def build_finetune(model: Classifier, cfg: FinetuneConfig, steps_per_epoch: int) -> FinetuneState:
    """Optimiser and schedule for fine-tuning ``model``."""
    opt, sched = build_optimizer(model.parameters(), cfg.optim, steps_per_epoch, cfg.epochs)
    return FinetuneState(model, opt, sched)


def cross_entropy_loss(logits: Tensor, target: Tensor, cfg: FinetuneConfig) -> Tensor:
    """Cross-entropy of ``logits (B, C)`` against class indices ``target (B,)`` int64, label-smoothed by ``cfg``."""
    return F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)


def argmax_correct(logits: Tensor, target: Tensor) -> tuple[int, int]:
    """``(correct, scored)``: arg-max predictions of ``logits (B, C)`` equal to ``target (B,)``, and ``B``."""
    return int((logits.argmax(1) == target).sum()), int(target.numel())


def finetune_epoch(
    state: FinetuneState,
    loader: Any,
    cfg: FinetuneConfig,
    device: torch.device,
    epoch: int = 0,
    desc: str = "finetune",
    loss_fn: Callable[[Tensor, Tensor, FinetuneConfig], Tensor] = cross_entropy_loss,
    correct_fn: Callable[[Tensor, Tensor], tuple[int, int]] = argmax_correct,
    prepare_target: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, float]:
    """One epoch of supervised training; returns mean loss, accuracy and the last LR.

    The loss is ``loss_fn(logits, target, cfg)`` (cross-entropy unless a task passes another), the
    accuracy ``sum(correct) / sum(scored)`` of ``correct_fn(logits, target)``; ``prepare_target`` maps
    each batch's target (already on ``device``) before both. During the first ``cfg.freeze_epochs``
    epochs the encoder is frozen (eval mode, no gradient).
    """
    state.model.train()
    frozen = epoch < cfg.freeze_epochs
    if frozen:
        state.model.encoder.eval()
    total, correct, scored, count = 0.0, 0, 0, 0
    bar = progress(loader, desc)
    for images, target, _group in bar:
        images, target = images.to(device, non_blocking=True), prepare_target(target.to(device))
        if frozen:
            with torch.no_grad():
                features = state.model.encoder(images)
            logits = state.model.fc(features)
        else:
            logits = state.model(images)
        loss = loss_fn(logits, target, cfg)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ddp.average_gradients(state.model)
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        n = int(target.shape[0])
        total += float(loss.detach()) * n
        c, k = correct_fn(logits.detach(), target)
        correct, scored, count = correct + c, scored + k, count + n
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {
        "loss": total / count if count else math.nan,
        "accuracy": correct / max(1, scored),
        "lr": float(state.scheduler.get_last_lr()[0]),
    }
