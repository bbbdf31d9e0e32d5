"""Evaluation of a grading classifier with torchmetrics, overall and per image-quality group.

Metrics (multi-class, ``C`` classes): accuracy, quadratic-weighted Cohen's kappa, macro-F1 and macro
one-vs-rest AUC. Per group (e.g. EyeQ's Good / Usable / Reject) the same figures on that group's
images. The AUC averages over the classes present in the evaluated set (a one-vs-rest AUC is
undefined for a class with no positive); a figure that is undefined (e.g. kappa on a set with one
class only) is NaN in Python and ``null`` in JSON.

Multi-label (``L`` labels, multi-hot targets): the AUC of each label and their mean
(:func:`multilabel_metrics`), overall and per group. A label with no positive (or no negative) image
in the evaluated set has no AUC: it is ``null`` in ``per_label_auc`` and left out of that set's
``mean_auc``; ``labels_scored`` counts the labels averaged and ``labels_skipped`` names the others.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_cohen_kappa,
    multiclass_f1_score,
    multilabel_auroc,
)

from examples.common.runlog import progress

__all__ = [
    "METRICS",
    "classification_metrics",
    "grouped_metrics",
    "grouped_multilabel_metrics",
    "multilabel_metrics",
    "predict",
]

METRICS = ("accuracy", "kappa", "macro_f1", "auc")


def classification_metrics(probs: Tensor, target: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, quadratic kappa, macro-F1, macro OvR AUC of ``probs (N, C)`` against ``target (N,)`` int64."""
    n = int(target.numel())
    if n == 0:
        return dict.fromkeys(METRICS, math.nan) | {"n": 0}
    preds = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about absent classes; handled below
        out = {
            "accuracy": float(multiclass_accuracy(preds, target, num_classes, average="micro")),
            "kappa": float(multiclass_cohen_kappa(preds, target, num_classes, weights="quadratic")),
            "macro_f1": float(multiclass_f1_score(preds, target, num_classes, average="macro")),
        }
        present = torch.bincount(target, minlength=num_classes)
        scorable = (present > 0) & (present < n)
        if bool(scorable.any()):
            per_class = multiclass_auroc(probs, target, num_classes, average=None)
            out["auc"] = float(per_class[scorable].mean())
        else:
            out["auc"] = math.nan
    out["n"] = n
    return out


def grouped_metrics(
    probs: Tensor, target: Tensor, groups: Tensor, group_names: Sequence[str], num_classes: int
) -> dict[str, object]:
    """Overall metrics plus ``per_quality`` (or any grouping): ``{name.lower(): metrics}``."""
    out: dict[str, object] = dict(classification_metrics(probs, target, num_classes))
    out["per_quality"] = {
        name.lower(): classification_metrics(probs[groups == g], target[groups == g], num_classes)
        for g, name in enumerate(group_names)
    }
    return out


def _softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits, 1)


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    device: torch.device,
    desc: str = "eval",
    activation: Callable[[Tensor], Tensor] = _softmax,
) -> tuple[Tensor, Tensor, Tensor]:
    """Probabilities ``activation(logits)`` (softmax unless given), targets and groups over ``(images, target, group)``.

    Returns:
        ``probs (N, C)`` float, ``targets`` (``(N,)`` int64 or ``(N, L)`` multi-hot) and ``groups (N,)``.
    """
    model.eval()
    probs, targets, groups = [], [], []
    for images, target, group in progress(batches, desc):
        probs.append(activation(model(images.to(device)).float()).cpu())
        targets.append(target)
        groups.append(group)
    return torch.cat(probs), torch.cat(targets), torch.cat(groups)


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
) -> dict[str, Any]:
    """Overall metrics plus ``per_quality``: ``{group_name.lower(): metrics of that group's images}``."""
    out = multilabel_metrics(probs, target, label_names)
    out["per_quality"] = {
        name.lower(): multilabel_metrics(probs[groups == g], target[groups == g], label_names)
        for g, name in enumerate(group_names)
    }
    return out
