"""Multi-label adapter of the shared pipeline: BCE fine-tuning, sigmoid prediction, per-label AUC.

:func:`examples.common.pipeline.run_pipeline` is written for a multi-class task (cross-entropy,
softmax, accuracy / kappa / F1 / AUC). Until it takes the task as an argument, :func:`multilabel_task`
swaps its three task hooks (``finetune_epoch``, ``predict``, ``grouped_metrics``) for the duration of
a ``with`` block and puts them back afterwards; everything else (pre-training, checkpoints, resume,
logging) is the shared code, unchanged.

Metrics (torchmetrics ``multilabel_auroc(average=None)``): the AUC of each of the 14 labels and their
mean, overall and per image-quality group. A label with no positive (or no negative) image in the
evaluated set has no AUC: it is ``null`` in ``per_label_auc`` and left out of that set's ``mean_auc``;
``labels_scored`` counts the labels averaged and ``labels_skipped`` names the others.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multilabel_auroc
from tqdm.auto import tqdm

from examples.common import pipeline
from examples.common.config import FinetuneConfig
from examples.common.finetune import FinetuneState

__all__ = [
    "MultilabelMetrics",
    "grouped_multilabel_metrics",
    "make_bce_finetune_epoch",
    "multilabel_metrics",
    "multilabel_task",
    "pos_weight_from_targets",
    "predict_sigmoid",
]


class MultilabelMetrics(dict):
    """The metrics dict; the shared pipeline logs ``auc`` (here the mean AUC) and multi-class keys (NaN)."""

    def __missing__(self, key: str) -> float:
        if key == "auc":
            return self.get("mean_auc", math.nan)
        return math.nan


def multilabel_metrics(probs: Tensor, target: Tensor, label_names: Sequence[str]) -> dict[str, Any]:
    """Per-label and mean AUC of ``probs (N, L)`` float against ``target (N, L)`` multi-hot (0/1).

    Returns:
        ``{"mean_auc", "per_label_auc": {name: auc or NaN}, "labels_scored", "labels_skipped", "n"}``;
        ``mean_auc`` averages the labels with both classes present (NaN when none has).
    """
    if probs.shape != target.shape or probs.ndim != 2 or probs.shape[1] != len(label_names):
        raise ValueError(
            f"`probs` and `target` must both be (N, {len(label_names)}), "
            f"got {tuple(probs.shape)} and {tuple(target.shape)}"
        )
    n = int(target.shape[0])
    target = target.round().long()
    positives = target.sum(0)
    scorable = (positives > 0) & (positives < n)
    per_label = torch.full((len(label_names),), math.nan)
    if bool(scorable.any()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics warns about labels without positives; masked below
            auc = multilabel_auroc(probs.float(), target, len(label_names), average=None)
        per_label[scorable] = auc[scorable].float()
    return {
        "mean_auc": float(per_label[scorable].mean()) if bool(scorable.any()) else math.nan,
        "per_label_auc": {name: float(per_label[i]) for i, name in enumerate(label_names)},
        "labels_scored": int(scorable.sum()),
        "labels_skipped": [name for i, name in enumerate(label_names) if not bool(scorable[i])],
        "n": n,
    }


def grouped_multilabel_metrics(
    probs: Tensor, target: Tensor, groups: Tensor, group_names: Sequence[str], label_names: Sequence[str]
) -> MultilabelMetrics:
    """Overall metrics plus ``per_quality``: ``{group_name.lower(): metrics of that group's images}``."""
    out = MultilabelMetrics(multilabel_metrics(probs, target, label_names))
    out["per_quality"] = {
        name.lower(): multilabel_metrics(probs[groups == g], target[groups == g], label_names)
        for g, name in enumerate(group_names)
    }
    return out


@torch.no_grad()
def predict_sigmoid(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor]], device: torch.device, desc: str = "eval"
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid probabilities ``(N, L)``, multi-hot targets ``(N, L)`` and groups ``(N,)``."""
    model.eval()
    probs, targets, groups = [], [], []
    for images, target, group in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
        probs.append(torch.sigmoid(model(images.to(device)).float()).cpu())
        targets.append(target)
        groups.append(group)
    return torch.cat(probs), torch.cat(targets), torch.cat(groups)


def pos_weight_from_targets(targets: Sequence[Tensor], max_weight: float) -> Tensor:
    """``BCEWithLogitsLoss`` ``pos_weight (L,)``: negatives / positives per label, clipped to ``[1, max_weight]``."""
    t = torch.stack(list(targets)).float()
    pos = t.sum(0)
    return ((t.shape[0] - pos) / pos.clamp_min(1)).clamp(1.0, max_weight)


def make_bce_finetune_epoch(pos_weight: Tensor | None = None) -> Any:
    """A drop-in for :func:`examples.common.finetune.finetune_epoch` with BCE-with-logits over multi-hot targets.

    Returns mean loss, label-wise accuracy at threshold 0.5 (reported as ``accuracy``) and the last LR.
    """

    def finetune_epoch(
        state: FinetuneState,
        loader: Any,
        cfg: FinetuneConfig,
        device: torch.device,
        epoch: int = 0,
        desc: str = "finetune",
    ) -> dict[str, float]:
        state.model.train()
        frozen = epoch < cfg.freeze_epochs
        if frozen:
            state.model.encoder.eval()
        pw = None if pos_weight is None else pos_weight.to(device)
        total, correct, count, labels = 0.0, 0, 0, 0
        bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
        for images, target, _group in bar:
            images, target = images.to(device, non_blocking=True), target.to(device).float()
            if cfg.label_smoothing:
                target_s = target * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            else:
                target_s = target
            if frozen:
                with torch.no_grad():
                    features = state.model.encoder(images)
                logits = state.model.fc(features)
            else:
                logits = state.model(images)
            loss = F.binary_cross_entropy_with_logits(logits, target_s, pos_weight=pw)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            n = int(target.shape[0])
            total += float(loss.detach()) * n
            correct += int(((logits.detach() > 0) == target.bool()).sum())
            labels += int(target.numel())
            count += n
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        return {
            "loss": total / count if count else math.nan,
            "accuracy": correct / max(1, labels),
            "lr": state.scheduler.get_last_lr()[0],
        }

    return finetune_epoch


@contextlib.contextmanager
def multilabel_task(label_names: Sequence[str], pos_weight: Tensor | None = None) -> Iterator[None]:
    """Within the block, :func:`~examples.common.pipeline.run_pipeline` trains and evaluates multi-label.

    Args:
        label_names: the ``L`` label names (``data.num_classes`` must be ``L``).
        pos_weight: optional ``(L,)`` positive weights of the BCE loss.
    """
    names = list(label_names)

    def metrics(probs: Tensor, target: Tensor, groups: Tensor, group_names: Sequence[str], _num: int) -> Any:
        return grouped_multilabel_metrics(probs, target, groups, group_names, names)

    hooks = {
        "finetune_epoch": make_bce_finetune_epoch(pos_weight),
        "predict": predict_sigmoid,
        "grouped_metrics": metrics,
    }
    saved = {name: getattr(pipeline, name) for name in hooks}
    for name, hook in hooks.items():
        setattr(pipeline, name, hook)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(pipeline, name, original)
