"""Probes of the mechanism on a frozen pre-trained encoder: what the encoder learned, before fine-tuning.

Fine-tuning scores mix the pre-training's effect with the fine-tuning budget. CoMCL claims something
narrower, testable on the frozen encoder (Hou et al., MICCAI 2024, arXiv 2404.04887): lesion features
that do not move with image quality, and low-quality artefacts (spots, halos) that do not read as
lesions. Three probes, each a number per (method, repeat):

* **Linear probe** (:func:`linear_probe`): scikit-learn's ``LogisticRegression`` on standardised
  frozen features of the labelled training images, scored on the test images overall and per
  quality group with the pipelines' own metrics (torchmetrics: accuracy, quadratic kappa, ...).
* **Lesion-versus-artefact retrieval** (:func:`artefact_retrieval`): each degraded healthy patch
  (V4) queries a bank of high-quality patches (lesions V1 and healthy V3, other images only) in
  :class:`~mlcl_losses.index.HardNegativeIndex`; the AUROC of "healthy" over the cosine similarity,
  per query and averaged (0.5: artefacts read as lesions as often as not; 1: every healthy
  neighbour is nearer than every lesion), and the share of healthy patches among the ``k`` nearest.
* **Quality invariance** (:func:`quality_invariance`): each low-quality lesion patch (V2) against
  the high-quality lesion patches (V1): the AUROC of "the same lesion" over the cosine, per query
  and averaged, the share of queries whose nearest V1 is their own (recall@1), and the margin
  ``cos(V2_i, V1_i) - mean_j cos(V2_i, V1_j)`` over the other lesions ``j``.

The patch probes use :func:`probe_views`: four views of held-out images (the repeat's test images,
never seen in pre-training), without augmentation, with a degraded copy drawn per image.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.functional.retrieval import retrieval_auroc, retrieval_precision

from examples.common.evaluate import classification_metrics
from examples.common.views import CachedImages, RecordSequence, cap_boxes
from mlcl_losses.index import Backend, HardNegativeIndex
from mlcl_losses.levels import Select
from mlcl_losses.tags import Kind, Quality, ViewTags
from mlcl_losses.views import FourViewDataset, FourViewRecord, FourViews, FourViewSampler, collate_four_views

__all__ = [
    "PROBE_KEYS",
    "artefact_retrieval",
    "encode",
    "encode_views",
    "linear_probe",
    "probe_views",
    "quality_invariance",
]

#: The scalar of each probe compared between methods (higher is better for every one).
PROBE_KEYS = ("linear_kappa", "artefact_auroc", "artefact_precision_at_k", "invariance_auroc", "invariance_margin")


@torch.no_grad()
def encode(encoder: nn.Module, dataset: Any, device: torch.device | str = "cpu", batch_size: int = 64) -> Tensor:
    """Frozen features ``(N, F)`` float32 (CPU) of the images of ``dataset`` (items ``(image, ...)`` or images).

    The encoder is put in eval mode (BatchNorm running statistics, no gradient).
    """
    encoder.eval()
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = batch[0] if isinstance(batch, list | tuple) else batch
        out.append(encoder(images.to(device)).float().cpu())
    if not out:
        raise ValueError("`dataset` is empty: there is nothing to encode")
    return torch.cat(out)


@torch.no_grad()
def encode_views(
    encoder: nn.Module, views: Any, device: torch.device | str = "cpu", batch_size: int = 16
) -> tuple[Tensor, ViewTags]:
    """Frozen features ``(V, F)`` float32 and tags of every view of a four-view dataset (e.g. :func:`probe_views`)."""
    encoder.eval()
    feats, tags = [], []
    loader = DataLoader(views, batch_size=batch_size, shuffle=False, collate_fn=collate_four_views)
    for batch in loader:
        if isinstance(batch, FourViews) and batch.views.shape[0]:
            feats.append(encoder(batch.views.to(device)).float().cpu())
            tags.append(batch.tags)
    if not feats:
        raise ValueError("`views` holds no patch: there is nothing to encode")
    return torch.cat(feats), ViewTags.cat(tags)


class _ProbeRecords(RecordSequence):
    """Records of held-out images: the clean image, at most ``max_lesions`` boxes (seeded), no degraded copy."""

    def __init__(self, clean: Tensor, boxes: Sequence[Tensor], max_lesions: int, seed: int) -> None:
        self.images, self.boxes, self.max_lesions, self.seed = CachedImages(clean), boxes, max_lesions, seed

    def __len__(self) -> int:
        return len(self.boxes)

    def record(self, i: int) -> FourViewRecord:
        """Record ``i``: the clean image and its capped boxes."""
        return FourViewRecord(self.images(i), cap_boxes(self.boxes[i], self.max_lesions, self.seed, 0, i), image_id=i)


def probe_views(
    clean: Tensor,
    boxes: Sequence[Tensor],
    degradation: Callable[..., Tensor],
    patch_size: int,
    n_healthy: int,
    max_lesions: int,
    seed: int,
) -> FourViewDataset:
    """Four views (no augmentation: V1a == V1b) of held-out images, for :func:`encode_views`.

    Args:
        clean: ``(N, C, S, S)`` uint8 high-quality images (e.g. the test set's clean renders).
        boxes: ``N`` lesion boxes ``(K_i, 4)`` float, ``x1, y1, x2, y2`` in pixels.
        degradation: ``(image, generator=...) -> image`` making each image's low-quality copy.
        patch_size, n_healthy, max_lesions: as in pre-training.
        seed: seeds the degraded copies, healthy patches and box subsets.
    """
    if clean.ndim != 4 or clean.dtype != torch.uint8:
        raise ValueError(f"Expected `clean` (N, C, S, S) uint8, but got {tuple(clean.shape)} {clean.dtype}")
    if len(boxes) != clean.shape[0]:
        raise ValueError(f"`clean` and `boxes` must have the same length, got {clean.shape[0]} and {len(boxes)}")
    sampler = FourViewSampler(patch_size=patch_size, n_healthy=n_healthy, augment=None)
    return FourViewDataset(_ProbeRecords(clean, boxes, max_lesions, seed), sampler, degradation, base_seed=seed)


def _probabilities(model: Any, features: Tensor, num_classes: int) -> Tensor:
    """``(N, num_classes)`` class probabilities of a fitted scikit-learn model (absent classes get 0)."""
    probs = torch.zeros(features.shape[0], num_classes, dtype=torch.float32)
    probs[:, torch.as_tensor(model.classes_, dtype=torch.long)] = torch.as_tensor(
        model.predict_proba(features.double().numpy()), dtype=torch.float32
    )
    return probs


def linear_probe(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    test_groups: Tensor,
    group_names: Sequence[str],
    num_classes: int,
    c: float = 1.0,
    max_iter: int = 2000,
) -> dict[str, Any]:
    """Logistic regression on frozen features, scored overall and per group of the test images.

    Args:
        train_features: ``(N, F)`` float features of the labelled training images.
        train_targets: ``(N,)`` int64 classes in ``[0, num_classes)``.
        test_features: ``(M, F)`` float; ``test_targets`` ``(M,)`` int64; ``test_groups`` ``(M,)`` int64
            in ``[0, len(group_names))``.
        group_names: names of the groups (``per_quality`` keys, lower-cased).
        num_classes: number of classes ``C``.
        c: inverse L2 regularisation strength of ``LogisticRegression`` (features standardised first).
        max_iter: L-BFGS iterations.

    Returns:
        :func:`~examples.common.evaluate.classification_metrics` of the test images (accuracy,
        quadratic kappa, macro-F1, AUC, n) plus ``per_quality``; with one class in the training
        targets every prediction is that class.

    Raises:
        ValueError: mismatched lengths or feature widths, targets outside ``[0, num_classes)``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for name, f, t in (("train", train_features, train_targets), ("test", test_features, test_targets)):
        if f.ndim != 2 or t.ndim != 1 or f.shape[0] != t.shape[0] or f.shape[0] == 0:
            raise ValueError(
                f"Expected `{name}_features` (N, F) and `{name}_targets` (N,) with N >= 1, "
                f"got {tuple(f.shape)} and {tuple(t.shape)}"
            )
        if bool(((t < 0) | (t >= num_classes)).any()):
            raise ValueError(f"Expected `{name}_targets` in [0, {num_classes}), got values {t.unique().tolist()}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"`train_features` and `test_features` must have the same width, got {train_features.shape[1]} "
            f"and {test_features.shape[1]}"
        )
    if test_groups.shape != test_targets.shape:
        raise ValueError(f"Expected `test_groups` of shape {tuple(test_targets.shape)}, got {tuple(test_groups.shape)}")
    classes = train_targets.unique()
    if classes.numel() == 1:
        probs = torch.zeros(test_features.shape[0], num_classes)
        probs[:, int(classes)] = 1.0
    else:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a convergence warning on a tiny set is reported by the score, not here
            model.fit(train_features.double().numpy(), train_targets.numpy())
        probs = _probabilities(model, test_features, num_classes)
    out: dict[str, Any] = classification_metrics(probs, test_targets, num_classes)
    out["per_quality"] = {
        name.lower(): classification_metrics(probs[test_groups == g], test_targets[test_groups == g], num_classes)
        for g, name in enumerate(group_names)
    }
    return out


def _ranked(
    queries: Tensor,
    bank: Tensor,
    bank_tags: ViewTags,
    exclude_source: Tensor | None,
    exclude_image: Tensor | None,
    backend: Backend,
) -> tuple[Tensor, Tensor]:
    """Every bank entry ranked for each query by cosine in a :class:`HardNegativeIndex`: ``(Q, B)`` sims and slots."""
    index = HardNegativeIndex(dim=bank.shape[1], capacity=bank.shape[0], backend=backend)
    index.add(bank, bank_tags)
    hits = index.search(queries, k=bank.shape[0], exclude_source=exclude_source, exclude_image=exclude_image)
    return hits.similarities, hits.indices


def _per_query(sims: Tensor, slots: Tensor, relevant: Tensor, k: int) -> tuple[float, float, int]:
    """Mean AUROC and precision@k over queries with relevant and irrelevant hits; the number of such queries."""
    aurocs, precisions = [], []
    for s, i in zip(sims, slots, strict=True):
        valid = i >= 0
        target = relevant[i[valid]]
        if 0 < int(target.sum()) < int(target.numel()):  # AUROC needs both kinds among the hits
            aurocs.append(float(retrieval_auroc(s[valid], target)))
            precisions.append(float(retrieval_precision(s[valid], target, top_k=min(k, int(valid.sum())))))
    n = len(aurocs)
    return (sum(aurocs) / n if n else math.nan), (sum(precisions) / n if n else math.nan), n


def _pick(features: Tensor, tags: ViewTags, select: Select, once: bool = False) -> tuple[Tensor, ViewTags]:
    """The views ``select`` accepts; with ``once`` only the first of each source (V1a, not V1b)."""
    keep = select(tags)
    if once:
        seen: set[int] = set()
        for j in keep.nonzero().flatten().tolist():
            s = int(tags.source[j])
            keep[j] = s not in seen
            seen.add(s)
    return features[keep], tags[keep]


def _check(features: Tensor, tags: ViewTags) -> None:
    if features.ndim != 2 or features.shape[0] != len(tags):
        raise ValueError(
            f"Expected `features` (V, F) with one row per tag, got {tuple(features.shape)} and {len(tags)} tags"
        )


def artefact_retrieval(features: Tensor, tags: ViewTags, k: int = 10, backend: Backend = "torch") -> dict[str, Any]:
    """Do degraded healthy patches (V4) find healthy (V3) or lesion (V1) patches as nearest high-quality neighbours?

    Queries: every healthy low-quality view (V4). Bank: every high-quality patch once (lesions V1a,
    healthy V3), without the query's own image (so neither its own clean copy nor its image's
    context answers). Ranked by cosine in a :class:`~mlcl_losses.index.HardNegativeIndex`.

    Args:
        features: ``(V, F)`` float features of the views.
        tags: their :class:`~mlcl_losses.tags.ViewTags` (``image`` tags required).
        k: neighbours of the precision.
        backend: the index backend.

    Returns:
        ``{"auroc", "precision_at_k", "k", "n_queries", "n_bank"}``: ``auroc`` is the mean over queries
        of the AUROC of "healthy" over the similarity (0.5 chance, 1 every healthy neighbour first),
        ``precision_at_k`` the mean share of healthy patches among the ``k`` nearest (its chance level
        is the healthy share of the bank, ``healthy_share``). NaN when no query has both kinds.
    """
    _check(features, tags)
    if tags.image is None:
        raise ValueError("`tags` must carry `image` ids (the query's own image is left out of the bank)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Expected `k` to be an int >= 1, but got {k!r}")
    queries, q_tags = _pick(features, tags, Select(kind=int(Kind.HEALTHY), quality=int(Quality.LOW)))
    bank, b_tags = _pick(features, tags, Select(quality=int(Quality.HIGH)), once=True)
    out: dict[str, Any] = {"k": k, "n_queries": 0, "n_bank": int(bank.shape[0])}
    healthy = b_tags.kind == int(Kind.HEALTHY)
    out["healthy_share"] = float(healthy.float().mean()) if bank.shape[0] else math.nan
    if queries.shape[0] == 0 or bank.shape[0] == 0:
        return out | {"auroc": math.nan, "precision_at_k": math.nan}
    sims, slots = _ranked(queries, bank, b_tags, None, q_tags.image, backend)
    auroc, precision, n = _per_query(sims, slots, healthy, k)
    return out | {"auroc": auroc, "precision_at_k": precision, "n_queries": n}


def quality_invariance(features: Tensor, tags: ViewTags, backend: Backend = "torch") -> dict[str, Any]:
    """Is a low-quality lesion patch (V2) nearest to its own high-quality patch (V1) among all lesions?

    Queries: every lesion low-quality view (V2). Bank: the high-quality lesion views (V1), one per
    source (the first, V1a). Ranked by cosine in a :class:`~mlcl_losses.index.HardNegativeIndex`.

    Returns:
        ``{"auroc", "recall_at_1", "margin", "n_queries", "n_bank"}``: ``auroc`` is the mean over queries
        of the AUROC of "same lesion" over the similarity (0.5 chance, 1 its own V1 first),
        ``recall_at_1`` the share of queries whose nearest V1 is their own, ``margin`` the mean of
        ``cos(V2_i, V1_i) - mean_j cos(V2_i, V1_j)`` over the other lesions ``j`` (in [-2, 2]).
        NaN with fewer than two lesions.
    """
    _check(features, tags)
    queries, q_tags = _pick(features, tags, Select(kind=int(Kind.LESION), quality=int(Quality.LOW)))
    bank, b_tags = _pick(features, tags, Select(kind=int(Kind.LESION), quality=int(Quality.HIGH)), once=True)
    nan = {"auroc": math.nan, "recall_at_1": math.nan, "margin": math.nan}
    out: dict[str, Any] = {"n_queries": 0, "n_bank": int(bank.shape[0])}
    if queries.shape[0] == 0 or bank.shape[0] < 2:
        return out | nan
    sims, slots = _ranked(queries, bank, b_tags, None, None, backend)
    aurocs, top1, margins = [], [], []
    for q in range(queries.shape[0]):
        own = b_tags.source[slots[q]] == q_tags.source[q]
        if int(own.sum()) != 1:  # its own V1 is not in the bank
            continue
        aurocs.append(float(retrieval_auroc(sims[q], own)))
        top1.append(float(own[0]))
        margins.append(float(sims[q][own].mean() - sims[q][~own].mean()))
    n = len(aurocs)
    if n == 0:
        return out | nan
    return out | {"auroc": sum(aurocs) / n, "recall_at_1": sum(top1) / n, "margin": sum(margins) / n, "n_queries": n}
