r"""The multi-level contrastive loss as a pure function.

For a level :math:`\ell`, anchor :math:`i` with positives :math:`P(i)`, negatives
:math:`N(i)` (in-batch and bank) and similarities :math:`s = \cos / \tau`:

.. math::

    l_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
          \log \frac{e^{s_{ip}}}{e^{s_{ip}} + \sum_{n \in N(i)} w_{in} e^{s_{in}}}

and :math:`L = \sum_\ell \mathrm{weight}_\ell \cdot \operatorname{mean}_i l_i` over the
anchors of each level that have at least one positive and one negative (the others are
skipped and counted, never turned into NaN). With ``denominator="all"`` the
denominator also sums over all positives, :math:`\sum_{a \in P(i) \cup N(i)}`, as in
SupCon (Khosla et al., 2020, https://arxiv.org/abs/2004.11362).

Reductions (proved in the tests): one :meth:`~mlcl_losses.levels.Level.instance` level
with two views per source is NT-Xent (SimCLR, https://arxiv.org/abs/2002.05709; PML
``NTXentLoss``); :meth:`~mlcl_losses.levels.Level.supervised` with ``denominator="all"`` is
SupCon (PML ``SupConLoss``); bank negatives only is MoCo's InfoNCE
(https://arxiv.org/abs/1911.05722).

Two published negative estimators are options of the same loss (``denominator="pos_neg"``):
debiased negatives (Chuang et al., NeurIPS 2020, https://arxiv.org/abs/2007.00224,
``tau_plus``) and hardness-reweighted negatives (Robinson et al., ICLR 2021,
https://arxiv.org/abs/2010.04592, ``beta``). With :math:`|N(i)|` negatives,
:math:`\mathrm{imp}_{in} = e^{\beta s_{in}}` and :math:`\tau^+` the class prior,

.. math::

    N_g = \max\Big( \frac{-\tau^+ |N(i)| e^{s_{ip}} + |N(i)|
          \frac{\sum_n \mathrm{imp}_{in} w_{in} e^{s_{in}}}{\sum_n \mathrm{imp}_{in}}}{1 - \tau^+},
          \; |N(i)| e^{-1/\tau} \Big)

replaces :math:`\sum_n w_{in} e^{s_{in}}`. ``tau_plus=0, beta=0`` is the plain loss.

Type aliases of the signatures:

.. py:type:: Denominator
   :canonical: typing.Literal['pos_neg', 'all']

   The ``denominator`` option: ``"pos_neg"`` (InfoNCE) or ``"all"`` (SupCon).

.. py:type:: Impl
   :canonical: typing.Literal['auto', 'fused', 'reference']

   The ``impl`` option: the fused kernel, the reference implementation or ``"auto"``.

.. py:type:: FusedBackend
   :canonical: typing.Literal['auto', 'torch', 'triton']

   The ``backend`` option of the fused path: torch tiles, Triton kernels or ``"auto"``.

.. py:type:: Reduction
   :canonical: typing.Literal['mean', 'none']

   The ``reduction`` option: the mean loss or the per-anchor losses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor

from mlcl_losses import _fused, _triton
from mlcl_losses._core import (
    Denominator,
    FusedBackend,
    Impl,
    LevelStats,
    LossOptions,
    PathResult,
    Reduction,
    check_options,
    reduce_levels,
)
from mlcl_losses.levels import Level, bank_negative_mask, bank_positive_mask, level_masks, validate_levels
from mlcl_losses.tags import ViewTags

__all__ = [
    "LevelStats",
    "NegativeWeightFn",
    "multilevel_info_nce",
    "normalize_embeddings",
]

logger = logging.getLogger(__name__)

#: A negative weighting ``fn(hardness, mask) -> weights``, where ``hardness`` is the
#: ``(N, C)`` anchor–candidate cosine similarity (detached), ``mask`` the ``(N, C)``
#: bool negative mask of the level; the weights ``(N, C)`` multiply each negative's
#: exponential term. :class:`~mlcl_losses.self_paced.SelfPacedWeighting` is one.
NegativeWeightFn = Callable[[Tensor, Tensor], Tensor]
NegativeWeights = Tensor | NegativeWeightFn | None
AnchorWeightFn = Callable[[Tensor, Tensor], Tensor]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize_embeddings(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    """Validate and L2-normalise rows, in float32 (float64 stays float64).

    Args:
        embeddings: ``(N, D)`` floating point, finite, no all-zero row.
        name: argument name used in error messages.

    Returns:
        ``(N, D)`` unit rows. Rows are first divided by their largest absolute entry,
        so huge or tiny (but non-zero) inputs neither overflow nor underflow.

    Raises:
        TypeError: if not a floating-point tensor.
        ValueError: wrong rank, ``D = 0``, NaN/inf, or a zero row.
    """
    if not isinstance(embeddings, Tensor) or not embeddings.dtype.is_floating_point:
        got = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise TypeError(f"Expected `{name}` to be a floating-point tensor, but got {got}")
    if embeddings.dim() != 2:
        raise ValueError(f"Expected `{name}` of shape (N, D), but got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"Expected `{name}` of shape (N, D) with D >= 1, but got shape {tuple(embeddings.shape)}")
    if embeddings.numel() == 0:
        return embeddings.to(_compute_dtype(embeddings))
    x = embeddings.to(_compute_dtype(embeddings))
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"Expected finite `{name}`, but row {row} contains NaN or inf")
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    if bool((scale == 0).any()):
        row = int((scale[:, 0] == 0).nonzero()[0, 0])
        raise ValueError(f"Expected non-zero rows in `{name}` (cosine similarity is undefined), but row {row} is zero")
    x = x / scale
    return x / x.norm(dim=1, keepdim=True)


def _check_tags(tags: object, n: int, name: str) -> None:
    if not isinstance(tags, ViewTags):
        raise TypeError(f"Expected `{name}` to be a ViewTags, but got {type(tags).__name__}")
    if tags.kind.dim() != 1 or len(tags) != n:
        raise ValueError(f"`embeddings` and `{name}` must have the same length, got {n} and {tuple(tags.shape)}")


def _masked_lse(logits: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
    """Row-wise ``log sum_j mask_ij w_ij exp(logits_ij)`` ``(N,)``; ``-inf`` for a row with no contributing entry.

    Weights enter as ``log w`` and the shift is the maximum over the entries that contribute
    (``mask`` and ``w > 0``), so an excluded or zero-weighted entry far above the others can
    neither drop the row nor cost it precision; the gradient is finite everywhere.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    contributes = mask if weights is None else mask & (weights > 0)
    if weights is not None:
        logits = logits + torch.log(torch.where(contributes, weights, torch.ones_like(weights)))
    shifted = torch.where(contributes, logits, neg_inf)  # (N, C)
    if shifted.shape[1] == 0:
        return shifted.new_full((shifted.shape[0],), float("-inf"))
    row_max = shifted.amax(dim=1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = torch.exp(shifted - row_max).sum(dim=1)  # >= 1 where a row has a contributing entry
    tiny = torch.finfo(logits.dtype).tiny
    return torch.where(total > 0, row_max[:, 0] + torch.log(total.clamp_min(tiny)), neg_inf)


def _per_level(values: object, n_levels: int, name: str) -> list:
    """Broadcast a per-level option: one value for all levels, or a sequence of one per level."""
    if isinstance(values, (list, tuple)):
        if len(values) != n_levels:
            raise ValueError(f"Expected `{name}` to have one entry per level ({n_levels}), but got {len(values)}")
        return list(values)
    return [values] * n_levels


def _resolve_weights(spec: NegativeWeights, hardness: Tensor, mask: Tensor, level: Level) -> Tensor | None:
    if spec is None:
        return None
    if isinstance(spec, Tensor):
        weights = spec
    elif callable(spec):
        weights = spec(hardness.detach(), mask)
    else:
        raise TypeError(
            f"Expected `negative_weights` to be a tensor, a callable or None, but got {type(spec).__name__}"
        )
    if not isinstance(weights, Tensor) or weights.shape != hardness.shape:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"Expected `negative_weights` of level {level.name!r} to have shape {tuple(hardness.shape)} "
            f"(anchors, batch + bank candidates), but got {got}"
        )
    weights = weights.detach().to(hardness.dtype)  # constants: no gradient flows into the weights
    bad = mask & ~(torch.isfinite(weights) & (weights >= 0))
    if bool(bad.any()):
        raise ValueError(f"Expected finite `negative_weights` >= 0, but got {float(weights[bad][0])}")
    return torch.where(mask, weights, torch.zeros_like(weights))


def _bank_part(
    z: Tensor,
    tags: ViewTags,
    bank_z: Tensor | None,
    bank_tags: ViewTags | None,
    candidates: Tensor | None,
    level: Level,
) -> tuple[Tensor, Tensor]:
    """Cosine similarities ``(N, C_b)`` and negative mask of the bank columns of one level."""
    n = z.shape[0]
    if bank_z is None or bank_tags is None:
        empty = z.new_zeros(n, 0)
        return empty, empty.bool()
    if candidates is None:
        cos = z @ bank_z.T  # (N, M)
        return cos, bank_negative_mask(tags, bank_tags, level)
    valid = candidates >= 0  # (N, k)
    safe = candidates.clamp_min(0).long()
    cos = torch.einsum("nd,nkd->nk", z, bank_z[safe])  # (N, k)
    return cos, bank_negative_mask(tags, bank_tags[safe], level) & valid


def _check_candidates(candidates: list[Tensor | None], n: int, m: int) -> None:
    for cand in candidates:
        if cand is None:
            continue
        if not isinstance(cand, Tensor) or cand.dtype not in (torch.int64, torch.int32) or cand.dim() != 2:
            raise TypeError("Expected `candidates` to be an int64 tensor of shape (N, k)")
        if cand.shape[0] != n:
            raise ValueError(f"Expected `candidates` with {n} rows (one per embedding), but got {cand.shape[0]}")
        if cand.numel() and (int(cand.min()) < -1 or int(cand.max()) >= m):
            raise ValueError(f"Expected `candidates` in [-1, {m - 1}], but got values outside")


def _check_pair_mask(pair_mask: object, n: int, bank_z: Tensor | None, candidates: list[Tensor | None]) -> None:
    if not (isinstance(pair_mask, (tuple, list)) and len(pair_mask) == 2):
        raise TypeError("Expected `pair_mask` to be a tuple (positives, negatives) of bool tensors or None")
    m = 0 if bank_z is None else bank_z.shape[0]
    whole_bank = all(c is None for c in candidates)
    n_cols = n + (m if whole_bank else max(c.shape[1] for c in candidates if c is not None))
    pos, neg = pair_mask
    allowed_pos = [(n, n), (n, n + m)] if bank_z is not None and whole_bank else [(n, n)]
    for name, mask, shapes in (("positives", pos, allowed_pos), ("negatives", neg, [(n, n_cols)])):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) not in shapes:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"Expected `pair_mask` {name} a bool tensor of shape {' or '.join(map(str, shapes))}, but got {got}"
            )


def _prepare_bank(
    raw: object, bank_tags: object, candidates: list[Tensor | None], z: Tensor
) -> tuple[Tensor, ViewTags, list[Tensor | None]]:
    """Validated, normalised bank on ``z``'s device, and the candidates that index it.

    With candidates for every level only the rows they use are read: the bank becomes the
    ``(U, D)`` unique hits and the candidates are renumbered into it, so the cost is
    ``O(N k D)``, never ``O(M)`` (an index's ring buffer may hold millions of slots, unfilled
    ones zero, which no search returns). Otherwise the whole bank is normalised.
    """
    n, d = z.shape
    if not isinstance(raw, Tensor) or raw.dim() != 2:
        raise ValueError(f"Expected bank embeddings of shape (M, D), but got {getattr(raw, 'shape', type(raw))}")
    if raw.shape[1] != d:
        raise ValueError(f"Expected bank embeddings of dimension {d} (as `embeddings`), but got {raw.shape[1]}")
    _check_tags(bank_tags, raw.shape[0], "bank tags")
    tags_m = cast(ViewTags, bank_tags)
    _check_candidates(candidates, n, raw.shape[0])
    if any(cand is None for cand in candidates):
        return normalize_embeddings(raw.to(z.device), "bank embeddings").to(z.dtype), tags_m.to(z.device), candidates
    distinct = {id(cand): cand for cand in candidates if cand is not None}  # levels may share one tensor
    flat = torch.cat([cand.reshape(-1).to(z.device, torch.int64) for cand in distinct.values()])
    used = torch.unique(flat[flat >= 0])  # (U,) sorted
    renumbered: dict[int, Tensor] = {}
    for key, cand in distinct.items():
        cand = cand.to(z.device, torch.int64)
        renumbered[key] = torch.where(cand >= 0, torch.searchsorted(used, cand.clamp_min(0)), -1)
    out: list[Tensor | None] = [None if cand is None else renumbered[id(cand)] for cand in candidates]
    if used.numel() == 0:  # only padding: a placeholder row that no candidate names
        zero = torch.zeros(1, dtype=torch.int64, device=z.device)
        optional = {name: zero if getattr(tags_m, name) is not None else None for name in ("label", "image")}
        return z.new_zeros(1, d), ViewTags(zero, zero, zero, **optional, validate=False), out
    rows = normalize_embeddings(raw[used.to(raw.device)].to(z.device), "bank embeddings").to(z.dtype)
    return rows, tags_m[used.to(tags_m.device)].to(z.device), out


def multilevel_info_nce(
    embeddings: Tensor,
    tags: ViewTags,
    levels: Sequence[Level] | Level,
    temperature: float = 0.1,
    denominator: Denominator = "pos_neg",
    bank: tuple[Tensor, ViewTags] | None = None,
    candidates: Tensor | Sequence[Tensor | None] | None = None,
    negative_weights: NegativeWeights | Sequence[NegativeWeights] = None,
    anchor_weights: Tensor | AnchorWeightFn | None = None,
    tau_plus: float = 0.0,
    beta: float = 0.0,
    pair_mask: tuple[Tensor | None, Tensor | None] | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    *,
    backend: FusedBackend = "auto",
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor, dict[str, LevelStats]]:
    r"""Multi-level InfoNCE over tagged embeddings (see the module docstring for the equation).

    Args:
        embeddings: ``(N, D)`` float; L2-normalised inside (cosine similarity).
        tags: ``(N,)`` :class:`~mlcl_losses.tags.ViewTags` of the embeddings.
        levels: the levels (:func:`~mlcl_losses.levels.comcl_levels`, ``[Level.instance()]``, ...);
            names must be unique.
        temperature: :math:`\tau > 0`.
        denominator: ``"pos_neg"`` (the positive and the negatives, NT-Xent/InfoNCE) or
            ``"all"`` (all positives and negatives, SupCon).
        bank: extra negatives ``(bank_embeddings (M, D), bank_tags (M,))``, e.g. momentum keys;
            filtered by each level's negative selector and the never-negative rules.
        candidates: per-anchor mined bank entries, ``(N, k)`` int64 indices into ``bank``
            (``-1`` = padding), for all levels or a sequence of one per level (``None`` = whole bank).
            With candidates for every level only the bank rows they name are read (memory
            ``O(N k D)``, whatever ``M``); the bank is brought to the embeddings' device.
        negative_weights: multiplies each negative's exponential term: a ``(N, N + C_b)``
            tensor (columns: batch, then bank or candidates), a callable
            :data:`NegativeWeightFn`, ``None``, or a sequence of these, one per level.
            Weights are treated as constants (no gradient flows into them).
        anchor_weights: per-anchor weights ``(N,)`` or a callable ``fn(losses (N,), valid (N,)) -> (N,)``
            applied to each level's detached per-anchor losses; the level loss becomes
            :math:`\sum_i v_i l_i / |\text{valid}|`.
        tau_plus: class prior of the debiased estimator, in ``[0, 1)``; 0 disables it.
        beta: concentration of hardness reweighting (HCL), >= 0; 0 disables it.
        pair_mask: optional ``(positives (N, N) or (N, N + M) bool | None, negatives (N, N + C_b)
            bool | None)`` further restricting the pairs of every level (used by the PML adapter).
            Positives of width ``N + M`` (whole bank, no ``candidates``) also admit bank entries
            as positives where the mask is True and the level relates them to the anchor
            (:func:`~mlcl_losses.levels.bank_positive_mask`): the bank is then a reference set.
        reduction: ``"mean"`` (the loss above) or ``"none"``: a ``(L, N)`` tensor of per-anchor
            losses times the level weight (``anchor_weights`` applied, 0 where an anchor did not
            contribute; ``stats[name].valid`` says which did).
        impl: ``"reference"`` (dense, for tests), ``"fused"`` (tiled, memory-lean; an error
            where it cannot compute the options) or ``"auto"`` (fused where available). Every
            option is fused but a negative-weight callable that is neither elementwise nor a
            streaming pace (see :doc:`/fused_loss`); ``stats[name].path`` says which ran.
        backend: the fused backend: ``"torch"`` (tiles), ``"triton"`` (CUDA kernels, or Triton's
            CPU interpreter under ``TRITON_INTERPRET=1``; an error where they do not apply) or
            ``"auto"`` (Triton on CUDA where it applies, else the torch tiles).
        block_rows: anchors per row tile of the torch tiles (default 256).
        block_cols: candidates per column tile of the torch tiles (default 4096).

    Returns:
        ``(loss, stats)``: the 0-dim total loss (float32, or float64 for float64 input) and
        a dict level name -> :class:`LevelStats`.

    Raises:
        ValueError, TypeError: on invalid input, naming the argument and the value.

    Examples:
        >>> import torch
        >>> from mlcl_losses import ViewTags, Level
        >>> z = torch.randn(4, 8)
        >>> tags = ViewTags(kind=[1, 1, 1, 1], quality=[0, 0, 0, 0], source=[0, 0, 1, 1])
        >>> loss, stats = multilevel_info_nce(z, tags, [Level.instance()], temperature=0.5)
        >>> int(stats["instance"].anchors)
        4
    """
    options = check_options(temperature, denominator, tau_plus, beta, reduction, impl, backend, block_rows, block_cols)
    return _loss_with_options(
        embeddings,
        tags,
        levels,
        options,
        bank=bank,
        candidates=candidates,
        negative_weights=negative_weights,
        anchor_weights=anchor_weights,
        pair_mask=pair_mask,
    )


class _PathLog:
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


def _loss_with_options(
    embeddings: Tensor,
    tags: ViewTags,
    levels: Sequence[Level] | Level,
    options: LossOptions,
    bank: tuple[Tensor, ViewTags] | None = None,
    candidates: Tensor | Sequence[Tensor | None] | None = None,
    negative_weights: NegativeWeights | Sequence[NegativeWeights] = None,
    anchor_weights: Tensor | AnchorWeightFn | None = None,
    pair_mask: tuple[Tensor | None, Tensor | None] | None = None,
    path_log: _PathLog | None = None,
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
    _check_tags(tags, n, "tags")
    if tags.device != z.device:
        raise ValueError(f"`embeddings` and `tags` must be on one device, got {z.device} and {tags.device}")

    per_level_candidates = _per_level(candidates, len(levels), "candidates")
    bank_z: Tensor | None = None
    bank_tags: ViewTags | None = None
    if bank is not None:
        if not (isinstance(bank, (tuple, list)) and len(bank) == 2):
            raise TypeError("Expected `bank` to be a tuple (bank_embeddings (M, D), bank_tags (M,))")
        bank_z, bank_tags, per_level_candidates = _prepare_bank(bank[0], bank[1], per_level_candidates, z)
    elif any(cand is not None for cand in per_level_candidates):
        raise ValueError("`candidates` index into `bank`, but `bank` is None")
    per_level_weights = _per_level(negative_weights, len(levels), "negative_weights")
    if pair_mask is not None:
        _check_pair_mask(pair_mask, n, bank_z, per_level_candidates)
    path, why = _choose_path(options, z, tags, levels, bank_z, per_level_candidates, per_level_weights, pair_mask)
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
        result = _reference(
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


def _choose_path(
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


def _reference(
    z: Tensor,
    tags: ViewTags,
    levels: list[Level],
    temperature: float,
    denominator: str,
    bank_z: Tensor | None,
    bank_tags: ViewTags | None,
    candidates: list[Tensor | None],
    weights_spec: list[NegativeWeights],
    tau_plus: float,
    beta: float,
    pair_mask: tuple[Tensor | None, Tensor | None] | None,
) -> PathResult:
    """Dense reference: one ``(N, N + C_b)`` logit matrix per level, computed exactly; per-anchor losses."""
    n = z.shape[0]
    with torch.autocast(device_type=z.device.type, enabled=False):
        cos_batch = z @ z.T  # (N, N)
        masks = level_masks(tags, levels)
        rows: list[Tensor] = []
        valids: list[Tensor] = []
        sims: list[tuple[Tensor, Tensor]] = []
        for level, lm, cand, wspec in zip(levels, masks, candidates, weights_spec, strict=True):
            cos_bank, neg_bank = _bank_part(z, tags, bank_z, bank_tags, cand, level)
            cos = torch.cat([cos_batch, cos_bank], dim=1)  # (N, N + C_b)
            pos = torch.cat([lm.positives, torch.zeros_like(neg_bank)], dim=1)
            neg = torch.cat([lm.negatives, neg_bank], dim=1)
            if pair_mask is not None:
                pos_mask = pair_mask[0]
                if pos_mask is not None:
                    if pos_mask.shape[1] > n and bank_tags is not None:  # the bank is a reference set
                        pos[:, n:] = bank_positive_mask(tags, bank_tags, level)
                    pos[:, : pos_mask.shape[1]] &= pos_mask
                if pair_mask[1] is not None:
                    neg &= pair_mask[1]
            logits = cos / temperature
            w = _resolve_weights(wspec, cos, neg, level)
            valid = lm.anchors & pos.any(dim=1) & neg.any(dim=1)
            n_pos = pos.sum(dim=1).clamp_min(1).to(z.dtype)
            if tau_plus > 0 or beta > 0:
                per_pair = _debiased_pair_terms(logits, pos, neg, w, temperature, tau_plus, beta)
                per_anchor = torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum(dim=1) / n_pos
            else:
                neg_lse = _masked_lse(logits, neg, w)  # (N,)
                if denominator == "pos_neg":
                    per_pair = torch.logaddexp(logits, neg_lse[:, None]) - logits
                    per_anchor = torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum(dim=1) / n_pos
                else:
                    denom = torch.logaddexp(_masked_lse(logits, pos, None), neg_lse)
                    mean_pos = torch.where(pos, logits, torch.zeros_like(logits)).sum(dim=1) / n_pos
                    per_anchor = denom - mean_pos
            rows.append(torch.where(valid, per_anchor, torch.zeros_like(per_anchor)))
            valids.append(valid)
            sims.append(_mean_sims(valid, pos, neg, cos))
    return PathResult(
        torch.stack(rows),
        torch.stack(valids),
        torch.stack([lm.anchors for lm in masks]),
        torch.stack([p for p, _ in sims]),
        torch.stack([q for _, q in sims]),
        "reference",
    )


def _debiased_pair_terms(
    logits: Tensor, pos: Tensor, neg: Tensor, w: Tensor | None, temperature: float, tau_plus: float, beta: float
) -> Tensor:
    r"""``(N, C)`` pair terms ``-log(e^{s_ip} / (e^{s_ip} + N_g))`` of Chuang et al. / Robinson et al.

    Computed in log space: :math:`\log N_g` from masked log-sum-exps, the debiasing subtraction as
    :math:`\log R + \log(1 - e^{\log a - \log R})` and the floor :math:`|N(i)| e^{-1/\tau}` as a
    log-domain maximum, so neither the positive term nor the floor underflows at small ``temperature``.
    Entries outside ``pos`` hold finite values with a zero gradient (the caller masks them).
    """
    count = neg.sum(dim=1, keepdim=True).clamp_min(1).to(logits.dtype)  # |N(i)| (N, 1)
    log_count = torch.log(count)
    if beta > 0:  # log(|N| sum_n imp w e^s / sum_n imp), imp = e^{beta s}
        log_r = (
            log_count
            + _masked_lse((1.0 + beta) * logits, neg, w)[:, None]
            - _masked_lse(beta * logits, neg, None)[:, None]
        )
        log_r = torch.where(neg.any(dim=1, keepdim=True), log_r, float("-inf"))  # no negative: not NaN
    else:
        log_r = _masked_lse(logits, neg, w)[:, None]  # (N, 1), -inf where no negative has weight > 0
    log_floor = log_count - 1.0 / temperature  # (N, 1)
    if tau_plus > 0:
        # numerator R - a with a = tau_plus |N| e^{s_ip}; where a >= R it is <= 0 and the floor wins
        x = math.log(tau_plus) + log_count + logits - log_r  # (N, C), log(a / R)
        below = x < 0
        safe_x = torch.where(below, x, torch.full_like(x, -1.0))
        safe_r = torch.where(below, log_r.expand_as(x), torch.zeros_like(x))
        log_num = safe_r + torch.log(-torch.expm1(safe_x)) - math.log1p(-tau_plus)
        log_ng = torch.where(below, torch.maximum(log_num, log_floor), log_floor.expand_as(x))
    else:
        log_ng = torch.maximum(log_r, log_floor)  # (N, 1)
    return torch.logaddexp(logits, log_ng) - logits


def _mean_sims(valid: Tensor, pos: Tensor, neg: Tensor, cos: Tensor) -> tuple[Tensor, Tensor]:
    """Mean positive and negative cosine over the valid anchors' pairs (0 if none)."""
    with torch.no_grad():
        vpos = pos & valid[:, None]
        vneg = neg & valid[:, None]
        zero = cos.new_zeros(())
        pos_sim = (cos * vpos).sum() / vpos.sum() if bool(vpos.any()) else zero
        neg_sim = (cos * vneg).sum() / vneg.sum() if bool(vneg.any()) else zero
        return pos_sim, neg_sim
