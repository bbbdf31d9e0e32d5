r"""Fused (tiled) path of :func:`mlcl_losses.functional.multilevel_info_nce`: per-anchor losses in linear memory.

The tiles (which anchors meet which candidates, with which masks and weights) are planned by
:class:`mlcl_losses._tiles.Plan`. Each level keeps streaming (online) log-sum-exps per anchor
over its negatives, accumulated in float32 (float64 for float64 input); the logits are
``(z / \tau) z^T``. A custom :class:`torch.autograd.Function` returns the ``(L, N)`` per-anchor
losses :math:`l_i` and saves only the normalised embeddings and ``O(N)`` per-level row
statistics; its backward recomputes the tiles (FlashAttention style,
https://arxiv.org/abs/2205.14135). Anchor weights, level weights and the reduction are then
ordinary autograd on the ``(L, N)`` losses (:func:`mlcl_losses._core.reduce_levels`).
Memory is ``O(N D + P + block_rows * block_cols)``, ``P`` the same-source positive pairs.

**Self-paced paces are frozen at forward.** A negative weighting that is not elementwise but
implements the streaming-pace protocol (``pace_rank(count)``, ``clamp(hardness)``,
``frozen(kth)``, as :class:`~mlcl_losses.self_paced.SelfPacedWeighting` does) gets its pace
here, before the forward: with a quantile pace, the ``k``-th smallest clamped hardness over all
of the level's negative pairs (batch, bank and candidates, as the dense path selects it) is
found exactly by :class:`~mlcl_losses._select.RadixSelect` in two extra passes over the tiles
(each a matmul per tile plus a 65,536-bin histogram; no ``N x N`` matrix; one pass when the
weighting's optional ``pace_hints`` dict holds last call's value near this one), and the weighting is
replaced by its :class:`~mlcl_losses.self_paced.FrozenWeighting`. Forward and backward call that
frozen function, so stepping the pace in between leaves the gradients of the forward unchanged.

Per-pair terms (``denominator="pos_neg"``), with :math:`X_i` a per-anchor statistic:

* plain: :math:`X_i = L_i = \log \sum_n w_{in} e^{s_{in}}`, :math:`f(s, X) = \operatorname{softplus}(X - s)`;
* debiased / hardness-reweighted (``tau_plus``, ``beta``; Chuang et al. 2020, Robinson et al.
  2021), in log space: :math:`X_i = \log R_i = \log|N_i| + \log \sum_n w_{in} e^{(1+\beta)s_{in}}
  - \log \sum_n e^{\beta s_{in}}`, :math:`\log N_g = \max(X + \log(1 - \tau^+ |N| e^{s - X})
  - \log(1 - \tau^+), \log|N| - 1/\tau)` and :math:`f = \operatorname{logaddexp}(s, \log N_g) - s`.

:math:`l_i = \frac{1}{|P(i)|}\sum_p f(s_{ip}, X_i)`; the forward also keeps
:math:`c_i = \frac{1}{|P(i)|}\sum_p \partial f / \partial X_i`, so that the backward of a
negative is :math:`g_i c_i \, \partial X_i / \partial s_{in}` and of a positive
:math:`\frac{g_i}{|P(i)|} \partial f / \partial s_{ip}`. ``denominator="all"``: with
:math:`T_i` the log-sum-exp over positives and weighted negatives,
:math:`l_i = T_i - \frac{1}{|P(i)|}\sum_p s_{ip}` and
:math:`\partial l_i / \partial s_{ij} = w_{ij} e^{s_{ij} - T_i} - [j \in P(i)] / |P(i)|`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mlcl_losses._core import LossOptions, PathResult
from mlcl_losses._select import RadixSelect
from mlcl_losses._tiles import Plan
from mlcl_losses.levels import Level
from mlcl_losses.tags import ViewTags

__all__ = ["multilevel_info_nce_fused", "unsupported_reason"]


def is_elementwise(spec: object) -> bool:
    """A negative-weight callable the tiles may call directly (``is_elementwise = True``)."""
    return callable(spec) and not isinstance(spec, Tensor) and getattr(spec, "is_elementwise", False) is True


def is_streaming_pace(spec: object) -> bool:
    """A weighting that implements the streaming-pace protocol (``pace_rank``, ``clamp``, ``frozen``)."""
    return all(callable(getattr(spec, name, None)) for name in ("pace_rank", "clamp", "frozen"))


def unsupported_reason(weights: list[Any]) -> str | None:
    """Why the fused path cannot compute these negative weights, or ``None`` when it can.

    Everything is fused but a negative-weight callable that is neither elementwise
    (``is_elementwise = True``) nor a streaming pace: it may need the whole ``(N, N + C_b)``
    hardness matrix at once, which is what the fused path never builds.
    """
    for spec in weights:
        if spec is None or isinstance(spec, Tensor) or is_elementwise(spec) or is_streaming_pace(spec):
            continue
        return (
            f"negative weight callable {getattr(spec, '__name__', type(spec).__name__)!r} is neither elementwise "
            "(is_elementwise = True) nor a streaming pace (pace_rank/clamp/frozen)"
        )
    return None


def _freeze_weights(plan: Plan, zs: Tensor, z: Tensor, bank_z: Tensor | None) -> None:
    """Replace each streaming-pace weighting of ``plan`` by its frozen, elementwise form (see the module doc)."""
    selections: dict[int, RadixSelect] = {}
    for li, spec in enumerate(plan.weights):
        if is_elementwise(spec) or not is_streaming_pace(spec):
            continue
        rank = spec.pace_rank(1)
        if rank is None:  # not a quantile pace (or a fraction of 1): no hardness needed
            plan.weights[li] = spec.frozen(None)
        else:
            hints = getattr(spec, "pace_hints", None)  # optional: the previous call's k-th value per level
            hint = hints.get(plan.levels[li].name) if isinstance(hints, dict) else None
            selections[li] = RadixSelect(spec.pace_rank, zs.dtype, zs.device, hint)
    while any(not sel.done for sel in selections.values()):
        levels = [li for li, sel in selections.items() if not sel.done]
        for li in levels:
            selections[li].begin()
        with torch.no_grad():
            for group in plan.anchor_groups():
                wanted = [li for li in group.levels if li in levels]
                if not wanted:
                    continue
                for tile in plan.tiles(zs, z, bank_z, group, wanted, (), None, with_weights=False):
                    cos = plan.hardness(tile.logits)
                    for li, q in tile.neg.items():
                        selections[li].feed(plan.weights[li].clamp(cos), q)
        for li in levels:
            selections[li].end()
    for li, sel in selections.items():
        hints = getattr(plan.weights[li], "pace_hints", None)
        if isinstance(hints, dict) and sel.result is not None:
            hints[plan.levels[li].name] = float(sel.result)
        plan.weights[li] = plan.weights[li].frozen(sel.result)


def _masked(logits: Tensor, mask: Tensor | None, logw: Tensor | None, copy: bool) -> Tensor:
    """``logits + log w`` where ``mask``, ``-inf`` elsewhere; the logits themselves (no copy) if unmasked."""
    if logw is not None:
        return logits + logw  # logw is -inf outside the mask
    if mask is None:
        return logits.clone() if copy else logits
    return logits.masked_fill(~mask, float("-inf"))


def _shift(m: Tensor) -> Tensor:
    """A running maximum as a finite shift (0 where no term was seen)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _fold(m: Tensor, s: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Streaming log-sum-exp: fold the rows of tile ``x`` ``(R, C)`` (overwritten) into running max and sum ``(R,)``."""
    m_new = torch.maximum(m, x.amax(dim=1))
    shift = _shift(m_new)
    return m_new, s * torch.exp(m - shift) + x.sub_(shift[:, None]).exp_().sum(dim=1)


def _merge(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two running (max, sum) pairs of a streaming log-sum-exp."""
    m = torch.maximum(m1, m2)
    shift = _shift(m)
    return m, s1 * torch.exp(m1 - shift) + s2 * torch.exp(m2 - shift)


def _online_result(m: Tensor, s: Tensor) -> Tensor:
    tiny = torch.finfo(s.dtype).tiny
    return torch.where(s > 0, _shift(m) + torch.log(s.clamp_min(tiny)), torch.full_like(s, float("-inf")))


def _pair_logits(zs: Tensor, z: Tensor, a: Tensor, p: Tensor, chunk: int) -> Tensor:
    """``(P,)`` logits ``zs[a] . z[p]`` of listed pairs, in chunks of ``chunk`` pairs."""
    parts = [(zs[a[i : i + chunk]] * z[p[i : i + chunk]]).sum(dim=1) for i in range(0, a.shape[0], chunk)]
    return torch.cat(parts) if parts else zs.new_zeros(0)


def _pair_chunk(plan: Plan, d: int) -> int:
    """Pairs scored at once: about one tile's worth of memory."""
    return max(1, (plan.block_rows * plan.block_cols) // max(1, d))


def _terms(plan: Plan, s: Tensor, x: Tensor, log_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair ``(f, df/dX, df/ds)`` of ``denominator="pos_neg"`` (module docstring); any broadcastable shapes."""
    if plan.tau_plus == 0 and plan.beta == 0:
        d = torch.sigmoid(x - s)
        return torch.logaddexp(s, x) - s, d, -d
    log_1m = math.log1p(-plan.tau_plus)
    c = math.log(plan.tau_plus) + log_n if plan.tau_plus > 0 else torch.full_like(log_n, -math.inf)
    u = c + s - x  # log(tau+ |N| e^s / R)
    below = u < 0
    cand = x + torch.log(-torch.expm1(torch.where(below, u, torch.full_like(u, -1.0)))) - log_1m
    floor = log_n - 1.0 / plan.temperature
    wins = below & (cand > floor)
    log_ng = torch.where(wins, cand, floor)
    big_d = torch.logaddexp(s, log_ng)
    zero = torch.zeros_like(big_d)
    d_x = torch.where(wins, torch.exp(x - log_1m - big_d), zero)
    d_s = torch.exp(s - big_d) - 1.0 - torch.where(wins, torch.exp(c + s - log_1m - big_d), zero)
    return big_d - s, d_x, d_s


class _FusedInfoNCE(torch.autograd.Function):
    """``(z, bank_z, plan) -> per_anchor (L, N), valid (L, N), sims (L, 2)``; backward recomputes tiles."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
        """Forward pass; see :func:`multilevel_info_nce_fused`."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return _forward(ctx, z, bank_z, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, *unused: Any) -> tuple[Tensor | None, Tensor | None, None]:
        """Recompute the tiles and accumulate ``dL/dz`` (and ``dL/dbank`` when the bank needs it)."""
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return _backward(ctx, grad)


def _forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor, Tensor]:
    n, n_levels = plan.n, len(plan.levels)
    tau, dt, dev = plan.temperature, z.dtype, z.device
    all_denominator = plan.denominator == "all"
    beta = plan.beta
    zs = z / tau  # (N, D): logits = zs @ z.T
    neg_inf = float("-inf")
    neg_m = z.new_full((n_levels, n), neg_inf)  # running max of the negatives' (1 + beta) s + log w
    neg_s = z.new_zeros(n_levels, n)  # running sum
    imp_m = z.new_full((n_levels, n), neg_inf)  # beta > 0: log-sum-exp of beta s (importance normaliser)
    imp_s = z.new_zeros(n_levels, n)
    n_neg = torch.zeros(n_levels, n, dtype=torch.long, device=dev)
    neg_logit = z.new_zeros(n_levels, n)  # sum of the negatives' logits

    # Pass 1: the negatives' log-sum-exps of every level.
    cache: dict[Any, Tensor] = {}
    groups = plan.anchor_groups()
    for group in groups:
        rows, r = group.rows, group.rows.shape[0]
        m = {li: z.new_full((r,), neg_inf) for li in group.levels}
        s = {li: z.new_zeros(r) for li in group.levels}
        im = {li: z.new_full((r,), neg_inf) for li in group.levels}
        is_ = {li: z.new_zeros(r) for li in group.levels}
        cnt = {li: torch.zeros(r, dtype=torch.long, device=dev) for li in group.levels}
        total = {li: z.new_zeros(r) for li in group.levels}
        for tile in plan.tiles(zs, z, bank_z, group, group.levels, (), cache):
            logits = tile.logits
            shared = len(tile.neg) > 1
            for li, q in tile.neg.items():
                if q is None:
                    cnt[li] += logits.shape[1]
                    total[li] += logits.sum(dim=1)
                else:
                    cnt[li] += q.sum(dim=1)
                    total[li] += torch.where(q, logits, torch.zeros_like(logits)).sum(dim=1)
                if beta > 0:
                    m[li], s[li] = _fold(m[li], s[li], _masked(logits * (1 + beta), q, tile.logw[li], copy=False))
                    im[li], is_[li] = _fold(im[li], is_[li], _masked(logits * beta, q, None, copy=False))
                else:
                    m[li], s[li] = _fold(m[li], s[li], _masked(logits, q, tile.logw[li], copy=shared))
        for li in group.levels:
            neg_m[li, rows], neg_s[li, rows] = m[li], s[li]
            imp_m[li, rows], imp_s[li, rows] = im[li], is_[li]
            n_neg[li, rows], neg_logit[li, rows] = cnt[li], total[li]
    big_a = _online_result(neg_m, neg_s)  # (L, N); -inf: no negative (or all weights 0)
    big_b = _online_result(imp_m, imp_s)
    log_n = torch.log(n_neg.to(dt))  # -inf: no negative
    x_stat = big_a + torch.where(n_neg > 0, log_n - big_b, torch.zeros_like(log_n)) if beta > 0 else big_a

    # Pass 2: the positives, given X.
    n_pos = torch.zeros(n_levels, n, dtype=torch.long, device=dev)
    pos_logit = z.new_zeros(n_levels, n)  # sum of the positives' logits
    term = z.new_zeros(n_levels, n)  # pos_neg: sum_p f(s_p, X)
    coef = z.new_zeros(n_levels, n)  # pos_neg: sum_p df/dX
    pos_m = z.new_full((n_levels, n), neg_inf)  # all: log-sum-exp of the positives
    pos_s = z.new_zeros(n_levels, n)
    for li in range(n_levels):
        if plan.dense[li]:
            continue
        a, p = plan.pairs(li)
        sp = _pair_logits(zs, z, a, p, _pair_chunk(plan, z.shape[1]))  # (P,)
        n_pos[li] = torch.bincount(a, minlength=n)
        pos_logit[li] = z.new_zeros(n).index_add(0, a, sp)
        if all_denominator:
            pos_m[li] = z.new_full((n,), neg_inf).scatter_reduce(0, a, sp, "amax")
            pos_s[li] = z.new_zeros(n).index_add(0, a, torch.exp(sp - _shift(pos_m[li])[a]))
        else:
            f, d_x, _ = _terms(plan, sp, x_stat[li, a], log_n[li, a])
            term[li] = z.new_zeros(n).index_add(0, a, f)
            coef[li] = z.new_zeros(n).index_add(0, a, d_x)
    for group in groups:
        dense = [li for li in group.levels if plan.dense[li]]
        if not dense:
            continue
        rows = group.rows
        for tile in plan.tiles(zs, z, None, group, (), dense, cache):
            x = tile.logits
            zero = torch.zeros_like(x)
            for li, pm in tile.pos.items():
                n_pos[li, rows] += pm.sum(dim=1)
                pos_logit[li, rows] += torch.where(pm, x, zero).sum(dim=1)
                if all_denominator:
                    m_r, s_r = _fold(pos_m[li, rows], pos_s[li, rows], x.masked_fill(~pm, neg_inf))
                    pos_m[li, rows], pos_s[li, rows] = m_r, s_r
                else:
                    f, d_x, _ = _terms(plan, x, x_stat[li, rows][:, None], log_n[li, rows][:, None])
                    term[li, rows] += torch.where(pm, f, zero).sum(dim=1)
                    coef[li, rows] += torch.where(pm, d_x, zero).sum(dim=1)

    anchors = torch.stack(plan.anchors) if n_levels else torch.zeros(0, n, dtype=torch.bool, device=dev)
    valid = anchors & (n_pos > 0) & (n_neg > 0)
    npos = n_pos.clamp_min(1).to(dt)
    if all_denominator:
        x_stat = _online_result(*_merge(neg_m, neg_s, pos_m, pos_s))  # T
        per_anchor = x_stat - pos_logit / npos
    else:
        per_anchor = term / npos
        coef = coef / npos
    per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
    with torch.no_grad():
        vp = torch.where(valid, n_pos, torch.zeros_like(n_pos)).sum(dim=1)
        vn = torch.where(valid, n_neg, torch.zeros_like(n_neg)).sum(dim=1)
        sp_sum = torch.where(valid, pos_logit, torch.zeros_like(pos_logit)).sum(dim=1) * tau  # cosines
        sn_sum = torch.where(valid, neg_logit, torch.zeros_like(neg_logit)).sum(dim=1) * tau
        sims = torch.stack([sp_sum / vp.clamp_min(1), sn_sum / vn.clamp_min(1)], dim=1)  # (L, 2)
        sims = torch.where(torch.stack([vp, vn], dim=1) > 0, sims, torch.zeros_like(sims))
    ctx.plan = plan
    ctx.has_bank = bank_z is not None
    saved = [z, torch.stack([x_stat, big_a, big_b, coef, log_n]), n_pos, valid]
    if bank_z is not None:
        saved.append(bank_z)
    ctx.save_for_backward(*saved)
    ctx.mark_non_differentiable(valid, sims)
    return per_anchor, valid, sims


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    plan: Plan = ctx.plan
    z, row_stats, n_pos, valid, *rest = ctx.saved_tensors
    x_stat, big_a, big_b, coef, log_n = row_stats.unbind(0)
    bank_z = rest[0] if ctx.has_bank else None
    tau, dt, beta = plan.temperature, z.dtype, plan.beta
    all_denominator = plan.denominator == "all"
    zs = z / tau
    grad_z = torch.zeros_like(z)
    grad_bank = torch.zeros_like(bank_z) if bank_z is not None and ctx.needs_input_grad[1] else None
    g = torch.where(valid, grad.to(dt), torch.zeros_like(x_stat))  # (L, N) dLoss/dl_i
    inv_pos = 1.0 / n_pos.clamp_min(1).to(dt)  # (L, N)
    x_shift, a_shift, b_shift = _shift(x_stat), _shift(big_a), _shift(big_b)
    # d loss / d X_i (all: d loss / d T_i), divided by tau: d / d cos of the negatives' exponents
    neg_factor = (g if all_denominator else g * coef) / tau  # (L, N)
    pos_factor = g * inv_pos / tau  # (L, N)

    cache: dict[Any, Tensor] = {}
    for group in plan.anchor_groups():  # the forward's row tiles: the same logits
        rows = group.rows
        if not bool(valid[group.levels][:, rows].any()):
            continue
        zr = z[rows]
        grad_r = torch.zeros_like(zr)
        pos_levels = [li for li in group.levels if plan.dense[li]]
        for tile in plan.tiles(zs, z, bank_z, group, group.levels, pos_levels, cache):
            logits = tile.logits
            shared = len(tile.neg) + len(tile.pos) > 1
            d: Tensor | None = None  # d loss / d cos
            for li, q in tile.neg.items():
                nf = neg_factor[li, rows][:, None]
                if beta > 0:
                    e = _masked(logits * (1 + beta), q, tile.logw[li], copy=False)
                    e = e.sub_(a_shift[li, rows][:, None]).exp_().mul_(nf * (1 + beta))
                    e2 = _masked(logits * beta, q, None, copy=False)
                    e.sub_(e2.sub_(b_shift[li, rows][:, None]).exp_().mul_(nf * beta))
                else:
                    e = _masked(logits, q, tile.logw[li], copy=shared)
                    e = e.sub_(x_shift[li, rows][:, None]).exp_().mul_(nf)
                d = e if d is None else d.add_(e)
            for li, pm in tile.pos.items():
                pf = pos_factor[li, rows][:, None]
                if all_denominator:
                    gp = neg_factor[li, rows][:, None] * torch.exp(logits - x_shift[li, rows][:, None]) - pf
                else:
                    gp = pf * _terms(plan, logits, x_stat[li, rows][:, None], log_n[li, rows][:, None])[2]
                gp = torch.where(pm, gp, torch.zeros_like(gp))
                d = gp if d is None else d.add_(gp)
            if d is None:
                continue
            if tile.kind == "batch" and tile.zc is not None and isinstance(tile.cols, Tensor):
                grad_r += d @ tile.zc
                grad_z.index_add_(0, tile.cols, d.T @ zr)
            elif tile.kind == "bank" and tile.zc is not None:
                grad_r += d @ tile.zc
                if grad_bank is not None:
                    grad_bank[tile.cols] += d.T @ zr
            elif bank_z is not None and tile.safe is not None:
                grad_r += torch.einsum("rc,rcd->rd", d, bank_z[tile.safe])
                if grad_bank is not None:
                    contrib = d[:, :, None] * zr[:, None, :]  # (R, C, D)
                    grad_bank.index_add_(0, tile.safe.reshape(-1), contrib.reshape(-1, z.shape[1]))
        grad_z.index_add_(0, rows, grad_r)

    # Same-source positives, pair by pair.
    chunk = _pair_chunk(plan, z.shape[1])
    for li in range(len(plan.levels)):
        if plan.dense[li]:
            continue
        a, p = plan.pairs(li)
        keep = valid[li][a]
        a, p = a[keep], p[keep]
        if a.numel() == 0:
            continue
        sp = _pair_logits(zs, z, a, p, chunk)
        if all_denominator:
            gp = neg_factor[li, a] * torch.exp(sp - x_shift[li, a]) - pos_factor[li, a]
        else:
            gp = pos_factor[li, a] * _terms(plan, sp, x_stat[li, a], log_n[li, a])[2]
        for i in range(0, a.shape[0], chunk):
            ai, pi, gi = a[i : i + chunk], p[i : i + chunk], gp[i : i + chunk, None]
            grad_z.index_add_(0, ai, gi * z[pi])
            grad_z.index_add_(0, pi, gi * z[ai])
    return grad_z, grad_bank, None


def multilevel_info_nce_fused(
    z: Tensor,
    tags: ViewTags,
    levels: list[Level],
    options: LossOptions,
    bank_z: Tensor | None,
    bank_tags: ViewTags | None,
    candidates: list[Tensor | None],
    weights: list[Any],
    pair_mask: tuple[Tensor | None, Tensor | None] | None = None,
) -> PathResult:
    r"""Tiled multi-level InfoNCE: the per-anchor losses of the reference path, in linear memory.

    Called by :func:`mlcl_losses.functional.multilevel_info_nce` after validation, for inputs
    :func:`unsupported_reason` accepts.

    Args:
        z: ``(N, D)`` L2-normalised embeddings, float32 or float64.
        tags: ``(N,)`` tags.
        levels: the levels.
        options: the validated options (temperature, denominator, ``tau_plus``, ``beta``, tile sizes).
        bank_z: ``(M, D)`` normalised bank embeddings (dtype of ``z``) or ``None``.
        bank_tags: ``(M,)`` bank tags or ``None``.
        candidates: one ``(N, k)`` int tensor (``-1`` = padding) or ``None`` per level.
        weights: one spec per level: ``None``, a ``(N, N + C_b)`` tensor, an elementwise callable
            (``fn(hardness (R, C), mask (R, C)) -> (R, C)``, called on tiles) or a streaming pace.
        pair_mask: ``(positives (N, N) | None, negatives (N, N + C_b) | None)`` or ``None``.

    Returns:
        The :class:`~mlcl_losses._core.PathResult` (``path="fused-torch"``).

    Raises:
        ValueError: negative weights of the wrong shape, negative or not finite.
    """
    n = z.shape[0]
    for level, cand, spec in zip(levels, candidates, weights, strict=True):
        if isinstance(spec, Tensor):
            c_b = 0 if bank_z is None else (bank_z.shape[0] if cand is None else cand.shape[1])
            if spec.shape != (n, n + c_b):
                raise ValueError(
                    f"Expected `negative_weights` of level {level.name!r} to have shape {(n, n + c_b)} "
                    f"(anchors, batch + bank candidates), but got {tuple(spec.shape)}"
                )
    plan = Plan(
        tags,
        levels,
        options.temperature,
        options.denominator,
        bank_tags if bank_z is not None else None,
        0 if bank_z is None else bank_z.shape[0],
        candidates,
        list(weights),
        options.block_rows,
        options.block_cols,
        pair_mask,
        options.tau_plus,
        options.beta,
    )
    with torch.autocast(device_type=z.device.type, enabled=False):
        _freeze_weights(
            plan, (z / options.temperature).detach(), z.detach(), None if bank_z is None else bank_z.detach()
        )
    per_anchor, valid, sims = _FusedInfoNCE.apply(z, bank_z, plan)
    anchors = torch.stack(plan.anchors) if levels else valid
    return PathResult(per_anchor, valid, anchors, sims[:, 0], sims[:, 1], "fused-torch")
