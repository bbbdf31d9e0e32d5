"""The dense reference path of the loss: one ``(N, N + C_b)`` logit matrix and two masks per level.

Exact (float64 when the embeddings are float64) and the oracle every other path is tested
against; :mod:`mlcl_losses._dispatch` runs it where the fused path cannot compute the options
or where ``impl="reference"`` asks for it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlcl_losses._core import NegativeWeights, PathResult
from mlcl_losses.levels import Level, bank_negative_mask, bank_positive_mask, level_masks
from mlcl_losses.tags import ViewTags

__all__ = ["bank_part", "debiased_pair_terms", "masked_lse", "mean_sims", "reference", "resolve_weights"]


def masked_lse(logits: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
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


def resolve_weights(spec: NegativeWeights, hardness: Tensor, mask: Tensor, level: Level) -> Tensor | None:
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


def bank_part(
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


def reference(
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
            cos_bank, neg_bank = bank_part(z, tags, bank_z, bank_tags, cand, level)
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
            w = resolve_weights(wspec, cos, neg, level)
            valid = lm.anchors & pos.any(dim=1) & neg.any(dim=1)
            n_pos = pos.sum(dim=1).clamp_min(1).to(z.dtype)
            if tau_plus > 0 or beta > 0:
                per_pair = debiased_pair_terms(logits, pos, neg, w, temperature, tau_plus, beta)
                per_anchor = torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum(dim=1) / n_pos
            else:
                neg_lse = masked_lse(logits, neg, w)  # (N,)
                if denominator == "pos_neg":
                    per_pair = torch.logaddexp(logits, neg_lse[:, None]) - logits
                    per_anchor = torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum(dim=1) / n_pos
                else:
                    denom = torch.logaddexp(masked_lse(logits, pos, None), neg_lse)
                    mean_pos = torch.where(pos, logits, torch.zeros_like(logits)).sum(dim=1) / n_pos
                    per_anchor = denom - mean_pos
            rows.append(torch.where(valid, per_anchor, torch.zeros_like(per_anchor)))
            valids.append(valid)
            sims.append(mean_sims(valid, pos, neg, cos))
    return PathResult(
        torch.stack(rows),
        torch.stack(valids),
        torch.stack([lm.anchors for lm in masks]),
        torch.stack([p for p, _ in sims]),
        torch.stack([q for _, q in sims]),
        "reference",
    )


def debiased_pair_terms(
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
            + masked_lse((1.0 + beta) * logits, neg, w)[:, None]
            - masked_lse(beta * logits, neg, None)[:, None]
        )
        log_r = torch.where(neg.any(dim=1, keepdim=True), log_r, float("-inf"))  # no negative: not NaN
    else:
        log_r = masked_lse(logits, neg, w)[:, None]  # (N, 1), -inf where no negative has weight > 0
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


def mean_sims(valid: Tensor, pos: Tensor, neg: Tensor, cos: Tensor) -> tuple[Tensor, Tensor]:
    """Mean positive and negative cosine over the valid anchors' pairs (0 if none)."""
    with torch.no_grad():
        vpos = pos & valid[:, None]
        vneg = neg & valid[:, None]
        zero = cos.new_zeros(())
        pos_sim = (cos * vpos).sum() / vpos.sum() if bool(vpos.any()) else zero
        neg_sim = (cos * vneg).sum() / vneg.sum() if bool(vneg.any()) else zero
        return pos_sim, neg_sim
