"""What a pipeline learns and reports: the fine-tuning loss, prediction, metrics and their presentation.

:func:`examples.common.pipeline.run_pipeline` and :func:`examples.common.compare.run_comparison` take a
:class:`Task`; everything else (pre-training, checkpoints, resume, logging) does not depend on it.

* :class:`SingleLabelTask` (EyeQ grading): cross-entropy, softmax; accuracy, quadratic kappa, macro-F1
  and macro AUC; the headline is kappa, the per-group gap ``kappa_drop``.
* :class:`MultiLabelTask` (ChestX-ray14): BCE-with-logits over multi-hot targets, sigmoid; the AUC of
  each label and their mean; the headline is ``mean_auc``, the per-group gap ``auc_drop``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.common.config import FinetuneConfig
from examples.common.evaluate import METRICS, grouped_metrics, grouped_multilabel_metrics, predict
from examples.common.finetune import FinetuneState, argmax_correct, cross_entropy_loss, finetune_epoch

__all__ = ["METHOD_LABELS", "MultiLabelTask", "PlotSettings", "SingleLabelTask", "Task", "pos_weight_from_targets"]

METHOD_LABELS = {
    "ce": "cross-entropy only",
    "simclr": "SimCLR pre-training",
    "supcon": "SupCon pre-training",
    "comcl_no_spl": "CoMCL w/o self-paced",
    "comcl_no_quality": "CoMCL w/o quality level",
    "comcl": "CoMCL (full)",
}


@dataclass(frozen=True)
class PlotSettings:
    """The comparison plot: the headline metric per group (x) per method (bars).

    Attributes:
        filename: written under the comparison's output directory.
        ylabel: y-axis label.
        title: default title.
        ylim: fixed y-range; ``None``: from 0 (or just below the lowest bar) to 1.3.
        zero_line: draw a horizontal line at 0.
    """

    filename: str
    ylabel: str
    title: str
    ylim: tuple[float, float] | None = None
    zero_line: bool = False


def _fmt(x: Any) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


class Task:
    """Hooks of one kind of supervised task; subclasses override the loss and the metric pieces.

    Attributes:
        metrics: scalar metrics of ``metrics.json`` aggregated over seeds (and logged as ``test`` scalars).
        metric_titles: column title of each of ``metrics`` in the comparison table.
        group_metrics: metrics aggregated per group (``per_quality``).
        headline: the metric compared per group (table columns, plot, gap).
        headline_title: its short name in per-group column titles.
        gap: key of the headline's drop from the first to the last group.
        gap_title: column title of the gap (followed by ``first→last``).
        label_key: key of a per-label metric dict aggregated over seeds (``None``: none).
        label_names: the labels of ``label_key``.
        method_labels: method -> name in tables and legends.
        plot: the comparison plot.
    """

    metrics: tuple[str, ...] = ()
    metric_titles: dict[str, str] = {}  # noqa: RUF012 - class-level defaults, overridden per task
    group_metrics: tuple[str, ...] = ()
    headline: str = ""
    headline_title: str = ""
    gap: str = ""
    gap_title: str = ""
    label_key: str | None = None
    label_names: tuple[str, ...] = ()
    method_labels: dict[str, str] = METHOD_LABELS
    plot: PlotSettings = PlotSettings("compare.png", "", "")

    def loss(self, logits: Tensor, target: Tensor, cfg: FinetuneConfig) -> Tensor:
        """Training loss of ``logits (B, C)`` against the prepared ``target``."""
        raise NotImplementedError

    def prepare_target(self, target: Tensor) -> Tensor:
        """A batch's target (on the device) as the loss takes it."""
        return target

    def correct(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        """``(correct, scored)`` predictions of a batch (the training ``accuracy``)."""
        raise NotImplementedError

    def activation(self, logits: Tensor) -> Tensor:
        """Probabilities of ``logits (N, C)``."""
        raise NotImplementedError

    def compute_metrics(
        self, probs: Tensor, target: Tensor, groups: Tensor, group_names: Sequence[str], num_classes: int
    ) -> dict[str, Any]:
        """``metrics.json`` content: overall figures and ``per_quality``."""
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any], groups: Sequence[str]) -> str:
        """Lines printed after a run."""
        raise NotImplementedError

    def finetune_epoch(
        self,
        state: FinetuneState,
        loader: Any,
        cfg: FinetuneConfig,
        device: torch.device,
        epoch: int = 0,
        desc: str = "finetune",
    ) -> dict[str, float]:
        """One fine-tuning epoch with this task's loss; mean loss, accuracy and the last LR."""
        return finetune_epoch(
            state, loader, cfg, device, epoch, desc, self.loss, self.correct, prepare_target=self.prepare_target
        )

    def predict(
        self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor]], device: torch.device, desc: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Probabilities, targets and groups over the evaluation batches."""
        return predict(model, batches, device, desc, activation=self.activation)


class SingleLabelTask(Task):
    """One class per image (``C`` classes): cross-entropy; accuracy, quadratic kappa, macro-F1, macro AUC."""

    metrics = METRICS
    metric_titles = {"accuracy": "accuracy", "kappa": "kappa", "macro_f1": "macro-F1", "auc": "AUC"}  # noqa: RUF012
    group_metrics = METRICS
    headline = "kappa"
    headline_title = "kappa"
    gap = "kappa_drop"
    gap_title = "kappa drop"
    plot = PlotSettings("compare_kappa.png", "quadratic-weighted kappa", "kappa per image quality", None, True)

    def loss(self, logits: Tensor, target: Tensor, cfg: FinetuneConfig) -> Tensor:
        return cross_entropy_loss(logits, target, cfg)

    def correct(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        return argmax_correct(logits, target)

    def activation(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, 1)

    def compute_metrics(
        self, probs: Tensor, target: Tensor, groups: Tensor, group_names: Sequence[str], num_classes: int
    ) -> dict[str, Any]:
        return grouped_metrics(probs, target, groups, group_names, num_classes)

    def summary(self, metrics: dict[str, Any], groups: Sequence[str]) -> str:
        m = metrics
        lines = [
            f"accuracy {_fmt(m['accuracy'])}  kappa {_fmt(m['kappa'])}  "
            f"macro-F1 {_fmt(m['macro_f1'])}  AUC {_fmt(m['auc'])}"
        ]
        for g in groups:
            q = m["per_quality"][g]
            lines.append(f"  {g:7s} kappa {_fmt(q['kappa'])}  accuracy {_fmt(q['accuracy'])}  AUC {_fmt(q['auc'])}")
        return "\n".join(lines)


def pos_weight_from_targets(targets: Sequence[Tensor], max_weight: float) -> Tensor:
    """``BCEWithLogitsLoss`` ``pos_weight (L,)``: negatives / positives per label, clipped to ``[1, max_weight]``."""
    t = torch.stack(list(targets)).float()
    pos = t.sum(0)
    return ((t.shape[0] - pos) / pos.clamp_min(1)).clamp(1.0, max_weight)


@dataclass
class MultiLabelTask(Task):
    """``L`` independent labels per image: BCE-with-logits; per-label and mean AUC.

    Args:
        label_names: the ``L`` label names (``data.num_classes`` must be ``L``).
        pos_weight: optional ``(L,)`` positive weights of the BCE loss.
        labels_title: how the y-axis of the plot names the labels.

    The training ``accuracy`` is label-wise at threshold 0.5; label smoothing moves targets towards 0.5.
    """

    label_names: tuple[str, ...] = ()
    pos_weight: Tensor | None = None
    labels_title: str = ""
    method_labels: dict[str, str] = field(
        default_factory=lambda: METHOD_LABELS | {"ce": "BCE only", "supcon": "SupCon pre-training (any finding)"}
    )

    metrics = ("mean_auc",)
    metric_titles = {"mean_auc": "mean AUC"}  # noqa: RUF012
    group_metrics = ("mean_auc",)
    headline = "mean_auc"
    headline_title = "AUC"
    gap = "auc_drop"
    gap_title = "drop"
    label_key = "per_label_auc"

    def __post_init__(self) -> None:
        self.label_names = tuple(self.label_names)
        if not self.label_names:
            raise ValueError("Expected at least one name in `label_names`, but got none")
        if self.pos_weight is not None and tuple(self.pos_weight.shape) != (len(self.label_names),):
            raise ValueError(
                f"`pos_weight` must have shape ({len(self.label_names)},), got {tuple(self.pos_weight.shape)}"
            )
        title = self.labels_title or f"the {len(self.label_names)} labels"
        self.plot = PlotSettings("compare_auc.png", f"mean AUC over {title}", "mean AUC per image quality", (0.4, 1.15))

    def prepare_target(self, target: Tensor) -> Tensor:
        return target.float()

    def loss(self, logits: Tensor, target: Tensor, cfg: FinetuneConfig) -> Tensor:
        if cfg.label_smoothing:
            target = target * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)

    def correct(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        return int(((logits > 0) == target.bool()).sum()), int(target.numel())

    def activation(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def compute_metrics(
        self, probs: Tensor, target: Tensor, groups: Tensor, group_names: Sequence[str], num_classes: int
    ) -> dict[str, Any]:
        return grouped_multilabel_metrics(probs, target, groups, group_names, self.label_names)

    def summary(self, metrics: dict[str, Any], groups: Sequence[str]) -> str:
        lines = [f"mean AUC {_fmt(metrics['mean_auc'])}"]
        for g in groups:
            q = metrics["per_quality"][g]
            skipped = q.get("labels_skipped") or []
            note = f"  (skipped, no positive or no negative: {', '.join(skipped)})" if skipped else ""
            lines.append(f"  {g:7s} mean AUC {_fmt(q['mean_auc'])}{note}")
        return "\n".join(lines)
