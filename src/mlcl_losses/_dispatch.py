"""The dispatcher of the loss: checks the tensors, chooses the path, runs it, reduces the levels.

:func:`loss_with_options` is :func:`~mlcl_losses.functional.multilevel_info_nce` with the
scalar options already checked; :class:`~mlcl_losses.loss.MultiLevelContrastiveLoss` and the
PML adapter call it with the options they checked at construction, and log the path they run
with a :class:`PathLog`. It logs as ``mlcl_losses.functional``, the public module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from mlcl_losses import _fused, _triton
from mlcl_losses._core import AnchorWeightFn, LevelStats, LossOptions, NegativeWeights, reduce_levels
from mlcl_losses._inputs import check_pair_mask, check_tags, normalize_embeddings, per_level, prepare_bank
from mlcl_losses._reference import reference
from mlcl_losses.levels import Level, validate_levels
from mlcl_losses.tags import ViewTags

__all__ = ["PathLog", "choose_path", "loss_with_options"]

logger = logging.getLogger("mlcl_losses.functional")


class PathLog:
    """Logs, at INFO, which path a loss module runs: once, and again only when it changes.

    Args:
        owner: the name in the message (e.g. the module's class name).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.last: str | None = None

    def __call__(self, path: str, why: str) -> None:
        """Record the path of one call."""
        if path != self.last and not torch.compiler.is_compiling():
            logger.info("%s runs the %s path (%s)", self.owner, path, why)
        self.last = path


def loss_with_options(
    embeddings: Tensor,
    tags: ViewTags,
    levels: Sequence[Level] | Level,
    options: LossOptions,
    bank: tuple[Tensor, ViewTags] | None = None,
    candidates: Tensor | Sequence[Tensor | None] | None = None,
    negative_weights: NegativeWeights | Sequence[NegativeWeights] = None,
    anchor_weights: Tensor | AnchorWeightFn | None = None,
    pair_mask: tuple[Tensor | None, Tensor | None] | None = None,
    path_log: PathLog | None = None,
) -> tuple[Tensor, dict[str, LevelStats]]:
    """:func:`multilevel_info_nce` with options already checked (``mlcl_losses._core.check_options``).

    What :class:`~mlcl_losses.loss.MultiLevelContrastiveLoss` and the PML adapter call: they
    validate their options once, at construction. Validates the tensors, chooses the path (the
    dispatcher: reference, torch tiles or Triton), and reduces the per-anchor losses the same
    way for every path. ``path_log`` logs the chosen path (else it is logged at DEBUG).
    """
    levels = validate_levels(levels, tags if isinstance(tags, ViewTags) else None)
    names = [level.name for level in levels]
    if len(set(names)) != len(names):
        raise ValueError(f"Expected unique level names, but got {names}")
    z = normalize_embeddings(embeddings)
    n, d = z.shape
    check_tags(tags, n, "tags")
    if tags.device != z.device:
        raise ValueError(f"`embeddings` and `tags` must be on one device, got {z.device} and {tags.device}")

    per_level_candidates = per_level(candidates, len(levels), "candidates")
    bank_z: Tensor | None = None
    bank_tags: ViewTags | None = None
    if bank is not None:
        if not (isinstance(bank, (tuple, list)) and len(bank) == 2):
            raise TypeError("Expected `bank` to be a tuple (bank_embeddings (M, D), bank_tags (M,))")
        bank_z, bank_tags, per_level_candidates = prepare_bank(bank[0], bank[1], per_level_candidates, z)
    elif any(cand is not None for cand in per_level_candidates):
        raise ValueError("`candidates` index into `bank`, but `bank` is None")
    per_level_weights = per_level(negative_weights, len(levels), "negative_weights")
    if pair_mask is not None:
        check_pair_mask(pair_mask, n, bank_z, per_level_candidates)
    path, why = choose_path(options, z, tags, levels, bank_z, per_level_candidates, per_level_weights, pair_mask)
    if path_log is not None:
        path_log(path, why)
    elif not torch.compiler.is_compiling():  # a logger call would break a compiled graph
        logger.debug("multilevel_info_nce: %s path (%s), N=%d, levels=%d", path, why, n, len(levels))
    if path == "fused-triton":
        result = _triton.multilevel_info_nce_triton(z, tags, levels, options.temperature, options.denominator)
    elif path == "fused-torch":
        result = _fused.multilevel_info_nce_fused(
            z, tags, levels, options, bank_z, bank_tags, per_level_candidates, per_level_weights, pair_mask
        )
    else:
        result = reference(
            z,
            tags,
            levels,
            options.temperature,
            options.denominator,
            bank_z,
            bank_tags,
            per_level_candidates,
            per_level_weights,
            options.tau_plus,
            options.beta,
            pair_mask,
        )
    return reduce_levels(result, levels, anchor_weights, options.reduction)


def choose_path(
    options: LossOptions,
    z: Tensor,
    tags: ViewTags,
    levels: list[Level],
    bank_z: Tensor | None,
    candidates: list[Tensor | None],
    weights: list[NegativeWeights],
    pair_mask: tuple[Tensor | None, Tensor | None] | None,
) -> tuple[str, str]:
    """The dispatcher: ``("reference" | "fused-torch" | "fused-triton", why)``."""
    if options.impl == "reference":
        return "reference", "impl='reference'"
    reason = _fused.unsupported_reason(weights)
    if reason is None and pair_mask is not None and pair_mask[0] is not None and pair_mask[0].shape[1] > z.shape[0]:
        reason = "pair_mask positives span the bank (a reference set: bank positives are dense-path only)"
    if reason is not None:
        if options.impl == "fused":
            raise ValueError(f"impl='fused' cannot compute these options ({reason}); use impl='auto' or 'reference'")
        return "reference", f"impl='auto', fused path unavailable: {reason}"
    if options.backend != "torch" and (z.is_cuda or options.backend == "triton"):
        ok = _triton.supports(z, tags, levels, bank_z, candidates, weights, options.tau_plus, options.beta, pair_mask)
        if ok:
            return "fused-triton", f"impl={options.impl!r}, backend={options.backend!r}"
        if options.backend == "triton":
            raise ValueError(
                "backend='triton' cannot compute these inputs (it needs CUDA or TRITON_INTERPRET=1, "
                "source levels, no bank, candidates, negative weights, tau_plus, beta or pair_mask); "
                "use backend='auto' or 'torch'"
            )
    return "fused-torch", f"impl={options.impl!r}, backend={options.backend!r}"
