"""Evaluation of a grading classifier with torchmetrics, overall and per image-quality group.

Metrics (multi-class, ``C`` classes): accuracy, quadratic-weighted Cohen's kappa, macro-F1 and macro
one-vs-rest AUC. Per group (e.g. EyeQ's Good / Usable / Reject) the same figures on that group's
images. The AUC averages over the classes present in the evaluated set (a one-vs-rest AUC is
undefined for a class with no positive); a figure that is undefined (e.g. kappa on a set with one
class only) is NaN in Python and ``null`` in JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_cohen_kappa,
    multiclass_f1_score,
)
from tqdm.auto import tqdm

__all__ = ["METRICS", "classification_metrics", "grouped_metrics", "predict"]

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


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor]], device: torch.device, desc: str = "eval"
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax probabilities, targets and groups over ``(images, target, group)`` batches."""
    model.eval()
    probs, targets, groups = [], [], []
    for images, target, group in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
        probs.append(torch.softmax(model(images.to(device)).float(), 1).cpu())
        targets.append(target)
        groups.append(group)
    return torch.cat(probs), torch.cat(targets), torch.cat(groups)
