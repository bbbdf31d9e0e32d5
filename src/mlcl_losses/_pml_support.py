"""Checks and pair masks of the PML adapters: ``indices_tuple``, reducers, level pairs against a reference set."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from pytorch_metric_learning.reducers import ClassWeightedReducer, DivisorReducer, MultipleReducers, PerAnchorReducer
from torch import Tensor

from mlcl_losses.levels import Level, bank_negative_mask, bank_positive_mask, level_masks
from mlcl_losses.tags import ViewTags

Pairs = tuple[Tensor, Tensor, Tensor, Tensor]


def _check_index(name: str, index: object, size: int, of: str) -> Tensor:
    """An integer index tensor with values in ``[0, size)``, else an error naming ``indices_tuple``."""
    if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        got = f"a {index.dtype} tensor" if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"Expected `indices_tuple` {name} to be an integer tensor, but got {got}")
    if index.dim() != 1:
        raise ValueError(f"Expected `indices_tuple` {name} of shape (P,), but got shape {tuple(index.shape)}")
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            raise ValueError(
                f"Expected `indices_tuple` {name} in [0, {size - 1}] (rows of {of}), but got {low if low < 0 else high}"
            )
    return index.long()


def check_indices_tuple(indices_tuple: object, n: int, n_ref: int | None) -> Pairs:
    """Validated ``(a1, p, a2, n)``; a triplet tuple ``(a, p, n)`` becomes pairs."""
    if not isinstance(indices_tuple, (tuple, list)):
        got = type(indices_tuple).__name__
        raise TypeError(f"Expected `indices_tuple` to be a tuple of index tensors, but got {got}")
    if len(indices_tuple) not in (3, 4):
        got = f"length {len(indices_tuple)}"
        raise ValueError(f"Expected `indices_tuple` of length 3 (a, p, n) or 4 (a1, p, a2, n), but got {got}")
    names = ("anchors a", "positives p", "negatives n") if len(indices_tuple) == 3 else ("a1", "p", "a2", "n")
    rows = (n, "`embeddings`")
    cols = rows if n_ref is None else (n_ref, "`ref_emb`")
    checked = [
        _check_index(name, index, *(rows if name.startswith("a") else cols))
        for name, index in zip(names, indices_tuple, strict=True)
    ]
    groups = {"a, p, n": checked} if len(checked) == 3 else {"a1, p": checked[:2], "a2, n": checked[2:]}
    for which, group in groups.items():
        lengths = [len(index) for index in group]
        if len(set(lengths)) > 1:
            raise ValueError(f"Expected `indices_tuple` {which} of one length, but got lengths {lengths}")
    if len(checked) == 3:
        return checked[0], checked[1], checked[0], checked[2]
    return checked[0], checked[1], checked[2], checked[3]


def pairs_to_mask(rows: Tensor, cols: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    """``shape`` bool mask, True at ``(rows[i], cols[i])``."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[rows.to(device), cols.to(device)] = True
    return mask


def unpack_labels(labels: Tensor, name: str) -> ViewTags:
    """Packed tags of ``labels`` (an error names the argument)."""
    try:
        return ViewTags.unpack(labels)
    except (TypeError, ValueError) as err:
        raise type(err)(f"`{name}`: {err}") from err


def warn_class_labels(labels: Tensor, ref_labels: Tensor | None) -> None:
    """Warn (:class:`UserWarning`) when ``labels`` look like plain class labels, not packed tags.

    Small labels decode as valid packed tags: every value in ``[0, 3]`` is source 0 with no label
    and no image tag. A batch (and reference set) of one source and no label has no negative at any
    level (negatives never share the anchor's source), so its loss is 0 whatever the embeddings.
    That is what class labels passed by mistake give, but also a legitimate batch of one patch's
    views (a last, short batch), so it is a warning, not an error.
    """
    values = labels if ref_labels is None else torch.cat([labels.reshape(-1), ref_labels.reshape(-1).to(labels)])
    if values.numel() and bool((values < 4).all()):
        seen = sorted(int(v) for v in torch.unique(values)[:8])
        warnings.warn(
            "Expected `labels` to be packed ViewTags (`ViewTags(kind, quality, source, ...).pack()`), but every "
            f"value is in [0, 3] (got {seen}): plain class labels? Decoded as packed tags they put every view in "
            "source 0 with no label, so no anchor has a negative and the loss is 0 (as for any batch of one source)",
            UserWarning,
            stacklevel=3,
        )


def reference_tags(
    embeddings: Tensor, tags: ViewTags, ref_emb: object, ref_labels: object, levels: Sequence[Level]
) -> tuple[ViewTags, ViewTags]:
    """Checked tags of the batch and of the reference set, with the same optional tags."""
    if ref_labels is None:
        raise ValueError("`ref_emb` needs `ref_labels` (packed ViewTags), but got None")
    if not isinstance(ref_emb, Tensor) or ref_emb.dim() != 2 or ref_emb.shape[1:] != embeddings.shape[1:]:
        got = tuple(ref_emb.shape) if isinstance(ref_emb, Tensor) else type(ref_emb).__name__
        raise ValueError(f"Expected `ref_emb` of shape (M, {embeddings.shape[1]}) (as `embeddings`), but got {got}")
    ref_tags = unpack_labels(ref_labels, "ref_labels").to(embeddings.device)  # type: ignore[arg-type]
    if len(ref_tags) != ref_emb.shape[0]:
        raise ValueError(
            f"`ref_emb` and `ref_labels` must have the same length, got {ref_emb.shape[0]} and {len(ref_tags)}"
        )
    return common_optional_tags(tags, ref_tags, levels)


def common_optional_tags(tags: ViewTags, ref: ViewTags, levels: Sequence[Level]) -> tuple[ViewTags, ViewTags]:
    """Batch and reference tags with the same optional tags, so they can be put side by side.

    ``image`` given on one side only is dropped (it only keeps pairs from being negatives, and a
    bank without image tags is treated the same way); a missing ``label`` is an error when a level
    uses labels, and otherwise dropped too.
    """
    if any(level.needs_label for level in levels):
        for name, t in (("labels", tags), ("ref_labels", ref)):
            if t.label is None:
                raise ValueError(f"A level pairs or excludes by label, but the packed tags in `{name}` carry no label")
    keep = {name: getattr(tags, name) is not None and getattr(ref, name) is not None for name in ("label", "image")}
    return tuple(  # type: ignore[return-value]
        ViewTags(
            kind=t.kind,
            quality=t.quality,
            source=t.source,
            label=t.label if keep["label"] else None,
            image=t.image if keep["image"] else None,
            validate=False,
        )
        for t in (tags, ref)
    )


def level_pair_masks(tags: ViewTags, ref: ViewTags | None, level: Level) -> tuple[Tensor, Tensor]:
    """``(N, N)`` (or ``(N, M)`` against a reference set) bool positives and negatives of one level.

    Against a reference set, an entry is a positive when related to the anchor (same source or
    label) and passing the positive selector, a negative under the bank rules.
    """
    if ref is None:
        masks = level_masks(tags, [level])[0]
        return masks.positives, masks.negatives
    pos = bank_positive_mask(tags, ref, level)
    return pos, bank_negative_mask(tags, ref, level)


def check_reducer(reducer: object) -> None:
    """Refuse PML reducers that need what this loss cannot give: classes, or a divisor."""
    inner = [reducer]
    if isinstance(reducer, MultipleReducers):
        inner = [*reducer.reducers.values(), reducer.default_reducer]
    for r in inner:
        r = r.reducer if isinstance(r, PerAnchorReducer) else r
        if isinstance(r, ClassWeightedReducer):
            raise ValueError(
                "Expected a `reducer` that does not weight by class: ClassWeightedReducer indexes its weights "
                "with the labels, which here are packed ViewTags, not classes"
            )
        if isinstance(r, DivisorReducer):
            raise ValueError("Expected a `reducer` without a divisor: DivisorReducer needs a loss that gives one")


def check_memory_inputs(
    embeddings: object, labels: object, enqueue_mask: object, embedding_size: int, memory_size: int
) -> None:
    """The inputs of a cross-batch memory's forward: shapes, dtypes, and no more entries to enqueue than it holds."""
    if not isinstance(embeddings, Tensor) or not embeddings.dtype.is_floating_point:
        got = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise TypeError(f"Expected `embeddings` to be a floating-point tensor, but got {got}")
    if embeddings.dim() != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"Expected `embeddings` of shape (N, {embedding_size}) (the memory's `embedding_size`), "
            f"but got {tuple(embeddings.shape)}"
        )
    n = embeddings.shape[0]
    if not isinstance(labels, Tensor) or labels.shape != (n,):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Expected `labels` of shape ({n},) (one per embedding), but got {shape}")
    queued = n
    if enqueue_mask is not None:
        if not isinstance(enqueue_mask, Tensor) or enqueue_mask.dtype != torch.bool:
            got = enqueue_mask.dtype if isinstance(enqueue_mask, Tensor) else type(enqueue_mask).__name__
            raise TypeError(f"Expected `enqueue_mask` to be a bool tensor, but got {got}")
        if enqueue_mask.shape != (n,):
            raise ValueError(f"Expected `enqueue_mask` of shape ({n},), but got {tuple(enqueue_mask.shape)}")
        queued = int(enqueue_mask.sum())
    if queued > memory_size:
        raise ValueError(
            f"Expected at most `memory_size` ({memory_size}) entries to enqueue per call, but got {queued}: "
            "raise `memory_size` or split the batch"
        )
