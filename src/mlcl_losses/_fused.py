r"""Fused (tiled) path of :func:`mlcl_losses.functional.multilevel_info_nce`.

The dense reference builds one ``(N, N + C_b)`` logit matrix and two boolean masks per
level. This path never does: it walks over **row tiles** of ``block_rows`` anchors and,
inside each, over **column tiles** of ``block_cols`` candidates (batch, then bank, then
mined bank candidates). Each similarity tile is computed once and shared by all levels;
the levels' positive and negative masks are derived inside the tile from the tag vectors
of the row tile and the column tile, and each level keeps a streaming (online)
log-sum-exp per anchor, accumulated in float32 (float64 for float64 input).

A custom :class:`torch.autograd.Function` saves only the normalised embeddings and
``O(N)`` per-level row statistics (the log-sum-exp, the positive count, a coefficient and
the valid flag); its backward recomputes the tiles (FlashAttention style,
https://arxiv.org/abs/2205.14135). Memory is ``O(N D + block_rows * block_cols)``.

Gradients per level (for valid anchor :math:`i`, logits :math:`s`, negative log-weights
:math:`\log w`, :math:`L_i = \log \sum_n w_{in} e^{s_{in}}`):

* ``denominator="pos_neg"``: :math:`\partial l_i / \partial s_{ip} = -\sigma(L_i - s_{ip}) / |P(i)|`,
  :math:`\partial l_i / \partial s_{in} = A_i\, w_{in} e^{s_{in} - L_i}` with
  :math:`A_i = \sum_p \sigma(L_i - s_{ip}) / |P(i)|`;
* ``denominator="all"``: with :math:`T_i` the log-sum-exp over positives and weighted
  negatives, :math:`\partial l_i / \partial s_{ij} = w_{ij} e^{s_{ij} - T_i} - [j \in P(i)] / |P(i)|`.

Supported: everything but ``anchor_weights``, ``tau_plus``/``beta`` debiasing,
``pair_mask`` and negative-weight callables without ``is_elementwise = True``
(:func:`supports` says so and ``impl="auto"`` falls back to the reference path).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mlcl_losses.levels import Level
from mlcl_losses.tags import ViewTags

__all__ = ["BLOCK_COLS", "BLOCK_ROWS", "multilevel_info_nce_fused", "supports"]

logger = logging.getLogger(__name__)

#: Anchors per row tile. Read at call time, so tests may lower it.
BLOCK_ROWS: int = 256
#: Candidates per column tile. Read at call time, so tests may lower it.
BLOCK_COLS: int = 4096


def _is_elementwise(spec: object) -> bool:
    return callable(spec) and not isinstance(spec, Tensor) and getattr(spec, "is_elementwise", False) is True


def supports(
    z: Tensor,
    tags: ViewTags,
    levels: Sequence[Level],
    bank_z: Tensor | None,
    candidates: Sequence[Tensor | None],
    weights: Sequence[Any],
    anchor_weights: Any,
    tau_plus: float,
    beta: float,
    pair_mask: Any,
) -> bool:
    """Whether the fused path computes these inputs (else the reference path does).

    Args:
        z: ``(N, D)`` normalised embeddings.
        tags: ``(N,)`` tags.
        levels: the levels.
        bank_z: ``(M, D)`` normalised bank or ``None``.
        candidates: one ``(N, k)`` int tensor or ``None`` per level.
        weights: one negative-weight spec per level: ``None``, a tensor, or a callable.
        anchor_weights: must be ``None``.
        tau_plus: must be 0.
        beta: must be 0.
        pair_mask: must be ``None``.

    Returns:
        ``True`` unless an option needs the dense reference: ``anchor_weights``,
        debiasing (``tau_plus``/``beta``), ``pair_mask``, or a negative-weight callable
        without the attribute ``is_elementwise = True`` (it may need the whole matrix).
    """
    if anchor_weights is not None or tau_plus != 0 or beta != 0 or pair_mask is not None:
        return False
    return all(spec is None or isinstance(spec, Tensor) or _is_elementwise(spec) for spec in weights)


@dataclass
class _Tile:
    """One similarity tile of a row block: columns of the batch, the bank or mined candidates."""

    kind: str  # "batch" | "bank" | "cand"
    c0: int  # first column (batch/bank index; candidate slot for "cand")
    c1: int
    cos: Tensor  # (R, C) cosine similarities
    pos: list[Tensor | None]  # per level, (R, C) bool or None (no positive in this tile)
    neg: list[Tensor | None]  # per level, (R, C) bool or None
    logw: list[Tensor | None]  # per level, (R, C) log negative weight or None (weight 1)
    safe: Tensor | None = None  # (R, C) bank index of candidate tiles


class _Plan:
    """Everything of one call that is not a differentiable tensor: tags, levels, options, tiles."""

    def __init__(
        self,
        tags: ViewTags,
        levels: list[Level],
        temperature: float,
        denominator: str,
        bank_tags: ViewTags | None,
        bank_size: int,
        candidates: list[Tensor | None],
        weights: list[Any],
        block_rows: int,
        block_cols: int,
    ) -> None:
        self.tags = tags
        self.levels = levels
        self.temperature = temperature
        self.denominator = denominator
        self.bank_tags = bank_tags
        self.bank_size = bank_size if bank_tags is not None else 0
        self.candidates = candidates
        self.weights = weights
        self.block_rows = block_rows
        self.block_cols = block_cols
        self.n = len(tags)
        # O(N) per-level selector vectors.
        self.anchors = [level.anchors(tags) for level in levels]
        self.possel = [level.positives(tags) for level in levels]
        self.negsel = [level.negatives(tags) for level in levels]
        self.bank_negsel = [level.negatives(bank_tags) for level in levels] if bank_tags is not None else []
        # Distinct candidate tensors (levels may share one) and the levels reading the whole bank.
        self.cand_groups: list[tuple[Tensor, list[int]]] = []
        for li, cand in enumerate(candidates):
            if cand is None or bank_tags is None:
                continue
            for group_cand, members in self.cand_groups:
                if group_cand is cand:
                    members.append(li)
                    break
            else:
                self.cand_groups.append((cand, [li]))
        self.full_bank_levels = [
            li for li, cand in enumerate(candidates) if cand is None and bank_tags is not None and levels[li].bank_negatives
        ]

    # ------------------------------------------------------------------ masks
    def _rows_tags(self, r0: int, r1: int) -> ViewTags:
        return self.tags[r0:r1]

    def _weight_tile(self, li: int, cos: Tensor, neg: Tensor, rows: slice, cols: slice | Tensor) -> Tensor | None:
        """``log w`` of one tile (``-inf`` outside ``neg``), or ``None`` for unit weights."""
        spec = self.weights[li]
        if spec is None:
            return None
        if isinstance(spec, Tensor):
            w = spec[rows, cols] if isinstance(cols, slice) else spec[rows][:, cols]
        else:
            w = spec(cos.detach(), neg)
            if not isinstance(w, Tensor) or w.shape != cos.shape:
                got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(
                    f"Expected the elementwise `negative_weights` of level {self.levels[li].name!r} to return "
                    f"a tile of shape {tuple(cos.shape)} (as its hardness tile), but got {got}"
                )
        w = w.to(device=cos.device, dtype=cos.dtype)
        ok = torch.isfinite(w) & (w >= 0)
        bad = neg & ~ok
        if bool(bad.any()):
            raise ValueError(f"Expected finite `negative_weights` >= 0, but got {float(w[bad][0])}")
        neg_inf = torch.full_like(w, float("-inf"))
        return torch.where(neg & (w > 0), torch.log(torch.where(ok, w, torch.ones_like(w))), neg_inf)

    def tiles(
        self, z: Tensor, bank_z: Tensor | None, r0: int, r1: int, row_levels: list[bool], batch_only: bool = False
    ) -> Iterator[_Tile]:
        """Yield the similarity tiles of rows ``r0:r1`` with each active level's masks.

        Args:
            z: ``(N, D)`` normalised embeddings.
            bank_z: ``(M, D)`` normalised bank or ``None``.
            r0: first row.
            r1: one past the last row.
            row_levels: which levels are computed for these rows (``rows`` of the level's
                row mask are the anchors, or the valid anchors in backward).
            batch_only: only the batch columns (positives live there).
        """
        levels, n, bc = self.levels, self.n, self.block_cols
        zr = z[r0:r1]  # (R, D)
        tr = self.tags[r0:r1]
        rows = torch.arange(r0, r1, device=z.device)
        row_masks = [self.anchors[li][r0:r1] for li in range(len(levels))]
        active = [li for li in range(len(levels)) if row_levels[li]]

        for c0 in range(0, n, bc):
            c1 = min(n, c0 + bc)
            cos = zr @ z[c0:c1].T  # (R, C)
            tc = self.tags[c0:c1]
            same_source = tr.source[:, None] == tc.source[None, :]
            forbid = same_source
            if tr.image is not None and tc.image is not None:
                forbid = forbid | (tr.image[:, None] == tc.image[None, :])
            same_label = None if tr.label is None or tc.label is None else tr.label[:, None] == tc.label[None, :]
            not_self = None
            if c0 < r1 and r0 < c1:  # the tile crosses the diagonal
                not_self = rows[:, None] != torch.arange(c0, c1, device=z.device)[None, :]
            pos: list[Tensor | None] = [None] * len(levels)
            neg: list[Tensor | None] = [None] * len(levels)
            logw: list[Tensor | None] = [None] * len(levels)
            for li in active:
                level, a = levels[li], row_masks[li]
                related = same_source if level.relation == "source" else same_label
                if related is not None:
                    p = a[:, None] & related & self.possel[li][c0:c1][None, :]
                    pos[li] = p if not_self is None else p & not_self
                if level.in_batch_negatives and not batch_only:
                    f = forbid if not (level.needs_label and same_label is not None) else forbid | same_label
                    q = a[:, None] & self.negsel[li][c0:c1][None, :] & ~f
                    neg[li] = q if not_self is None else q & not_self
                    logw[li] = self._weight_tile(li, cos, neg[li], slice(r0, r1), slice(c0, c1))
            yield _Tile("batch", c0, c1, cos, pos, neg, logw)
        if batch_only or bank_z is None or self.bank_tags is None:
            return

        bank_levels = [li for li in self.full_bank_levels if row_levels[li]]
        if bank_levels:
            for c0 in range(0, self.bank_size, bc):
                c1 = min(self.bank_size, c0 + bc)
                cos = zr @ bank_z[c0:c1].T  # (R, C)
                tc = self.bank_tags[c0:c1]
                neg = [None] * len(levels)
                logw = [None] * len(levels)
                for li in bank_levels:
                    level, a = levels[li], row_masks[li]
                    f = _forbid(tr, tc, level)
                    sel = self.bank_negsel[li][c0:c1]  # (C,)
                    neg[li] = a[:, None] & sel[None, :] & ~f
                    logw[li] = self._weight_tile(li, cos, neg[li], slice(r0, r1), slice(n + c0, n + c1))
                yield _Tile("bank", c0, c1, cos, [None] * len(levels), neg, logw)

        for cand, members in self.cand_groups:
            group = [li for li in members if row_levels[li] and levels[li].bank_negatives]
            if not group:
                continue
            k = cand.shape[1]
            for c0 in range(0, k, bc):
                c1 = min(k, c0 + bc)
                idx = cand[r0:r1, c0:c1].to(z.device)  # (R, C)
                valid = idx >= 0
                safe = idx.clamp_min(0).long()
                cos = torch.einsum("rd,rcd->rc", zr, bank_z[safe])  # (R, C)
                tc = self.bank_tags[safe]  # (R, C) tags
                neg = [None] * len(levels)
                logw = [None] * len(levels)
                for li in group:
                    level, a = levels[li], row_masks[li]
                    f = _forbid(tr, tc, level)
                    sel = self.negatives_of(li, tc)
                    neg[li] = a[:, None] & sel & valid & ~f
                    logw[li] = self._weight_tile(li, cos, neg[li], slice(r0, r1), slice(n + c0, n + c1))
                yield _Tile("cand", c0, c1, cos, [None] * len(levels), neg, logw, safe)

    def negatives_of(self, li: int, tags: ViewTags) -> Tensor:
        """The level's negative selector on (gathered) tags of any shape."""
        return self.levels[li].negatives(tags)


def _forbid(tr: ViewTags, tc: ViewTags, level: Level) -> Tensor:
    """``(R, C)`` pairs that may never be negatives; ``tc`` is ``(C,)`` or ``(R, C)``."""

    def pair(q: Tensor, k: Tensor) -> Tensor:
        return q[:, None] == (k[None, :] if k.dim() == 1 else k)

    forbid = pair(tr.source, tc.source)
    if tr.image is not None and tc.image is not None:
        forbid = forbid | pair(tr.image, tc.image)
    if level.needs_label and tr.label is not None and tc.label is not None:
        forbid = forbid | pair(tr.label, tc.label)
    return forbid


def _masked(values: Tensor, mask: Tensor, logw: Tensor | None) -> Tensor:
    """``values + log w`` where ``mask``, ``-inf`` elsewhere."""
    x = values if logw is None else values + logw
    return torch.where(mask, x, torch.full_like(values, float("-inf")))


def _online_update(m: Tensor, s: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Streaming log-sum-exp: fold the ``(R, C)`` tile ``x`` into running max ``m`` and sum ``s`` (``(R,)``)."""
    m_new = torch.maximum(m, x.amax(dim=1))
    shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    s = s * torch.exp(m - shift) + torch.exp(x - shift[:, None]).sum(dim=1)
    return m_new, s


def _online_result(m: Tensor, s: Tensor) -> Tensor:
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    tiny = torch.finfo(s.dtype).tiny
    return torch.where(s > 0, shift + torch.log(s.clamp_min(tiny)), torch.full_like(s, float("-inf")))


def _row_levels(plan: _Plan, rows_mask: list[Tensor], r0: int, r1: int) -> list[bool]:
    return [bool(mask[r0:r1].any()) for mask in rows_mask]


class _FusedInfoNCE(torch.autograd.Function):
    """Per-level mean anchor losses ``(L,)`` and ``O(N)`` statistics; backward recomputes tiles."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: _Plan) -> tuple[Tensor, ...]:  # type: ignore[override]
        """Forward pass; see :func:`multilevel_info_nce_fused`."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return _forward(ctx, z, bank_z, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: Tensor, *unused: Any) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        """Recompute the tiles and accumulate ``dL/dz`` (and ``dL/dbank`` when the bank needs it)."""
        with torch.autocast(device_type=grad_losses.device.type, enabled=False):
            return _backward(ctx, grad_losses)


def _forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: _Plan) -> tuple[Tensor, ...]:
    n, n_levels = plan.n, len(plan.levels)
    tau = plan.temperature
    dt = z.dtype
    neg_inf = float("-inf")
    lse = [z.new_full((n,), neg_inf) for _ in range(n_levels)]  # L (pos_neg) or T (all)
    coef = [z.new_zeros(n) for _ in range(n_levels)]  # A_i (pos_neg); 1 (all)
    n_pos = [torch.zeros(n, dtype=torch.long, device=z.device) for _ in range(n_levels)]
    n_neg = [torch.zeros(n, dtype=torch.long, device=z.device) for _ in range(n_levels)]
    per_anchor = [z.new_zeros(n) for _ in range(n_levels)]
    pos_cos = [z.new_zeros(n) for _ in range(n_levels)]
    neg_cos = [z.new_zeros(n) for _ in range(n_levels)]
    all_denominator = plan.denominator == "all"

    for r0 in range(0, n, plan.block_rows):
        r1 = min(n, r0 + plan.block_rows)
        row_levels = _row_levels(plan, plan.anchors, r0, r1)
        if not any(row_levels):
            continue
        rr = r1 - r0
        m = [z.new_full((rr,), neg_inf) for _ in range(n_levels)]
        s = [z.new_zeros(rr) for _ in range(n_levels)]
        pos_logit_sum = [z.new_zeros(rr) for _ in range(n_levels)]
        cached: list[_Tile] = []
        single_batch_tile = n <= plan.block_cols
        for tile in plan.tiles(z, bank_z, r0, r1, row_levels):
            logits = tile.cos / tau
            for li in range(n_levels):
                p, q = tile.pos[li], tile.neg[li]
                if q is not None:
                    n_neg[li][r0:r1] += q.sum(dim=1)
                    neg_cos[li][r0:r1] += torch.where(q, tile.cos, torch.zeros_like(tile.cos)).sum(dim=1)
                    m[li], s[li] = _online_update(m[li], s[li], _masked(logits, q, tile.logw[li]))
                if p is not None:
                    n_pos[li][r0:r1] += p.sum(dim=1)
                    pos_cos[li][r0:r1] += torch.where(p, tile.cos, torch.zeros_like(tile.cos)).sum(dim=1)
                    if all_denominator:
                        pos_logit_sum[li] += torch.where(p, logits, torch.zeros_like(logits)).sum(dim=1)
                        m[li], s[li] = _online_update(m[li], s[li], _masked(logits, p, None))
            if tile.kind == "batch" and single_batch_tile and not all_denominator:
                cached.append(tile)
        for li in range(n_levels):
            lse[li][r0:r1] = _online_result(m[li], s[li])
        npos = [c[r0:r1].clamp_min(1).to(dt) for c in n_pos]
        if all_denominator:
            for li in range(n_levels):
                per_anchor[li][r0:r1] = lse[li][r0:r1] - pos_logit_sum[li] / npos[li]
                coef[li][r0:r1] = 1.0
            continue
        # pos_neg: a second pass over the batch columns (positives are never in the bank).
        tiles = cached if cached else plan.tiles(z, bank_z, r0, r1, row_levels, batch_only=True)
        for tile in tiles:
            logits = tile.cos / tau
            for li in range(n_levels):
                p = tile.pos[li]
                if p is None:
                    continue
                big_l = lse[li][r0:r1, None]
                per_pair = torch.logaddexp(logits, big_l.expand_as(logits)) - logits
                zero = torch.zeros_like(logits)
                per_anchor[li][r0:r1] += torch.where(p, per_pair, zero).sum(dim=1)
                coef[li][r0:r1] += torch.where(p, torch.sigmoid(big_l - logits), zero).sum(dim=1)
        for li in range(n_levels):
            per_anchor[li][r0:r1] /= npos[li]
            coef[li][r0:r1] /= npos[li]

    level_losses = []
    valid_list: list[Tensor] = []
    n_valid_list: list[Tensor] = []
    stats_rows: list[Tensor] = []
    count_rows: list[Tensor] = []
    for li in range(n_levels):
        valid = plan.anchors[li] & (n_pos[li] > 0) & (n_neg[li] > 0)
        n_valid = valid.sum()
        loss_rows = torch.where(valid, per_anchor[li], torch.zeros_like(per_anchor[li]))
        level_losses.append(loss_rows.sum() / n_valid.clamp_min(1).to(dt))
        valid_list.append(valid)
        n_valid_list.append(n_valid)
        vp = torch.where(valid, n_pos[li], torch.zeros_like(n_pos[li])).sum()
        vn = torch.where(valid, n_neg[li], torch.zeros_like(n_neg[li])).sum()
        sp = torch.where(valid, pos_cos[li], torch.zeros_like(pos_cos[li])).sum()
        sn = torch.where(valid, neg_cos[li], torch.zeros_like(neg_cos[li])).sum()
        zero = z.new_zeros(())
        count_rows.append(torch.stack([n_valid, (plan.anchors[li] & ~valid).sum()]))
        stats_rows.append(
            torch.stack(
                [torch.where(vp > 0, sp / vp.clamp_min(1).to(dt), zero), torch.where(vn > 0, sn / vn.clamp_min(1).to(dt), zero)]
            )
        )
    losses = torch.stack(level_losses) if level_losses else z.new_zeros(0)
    sims = torch.stack(stats_rows)  # (L, 2) float: pos_sim, neg_sim
    counts = torch.stack(count_rows)  # (L, 2) int64: anchors, skipped
    ctx.plan = plan
    ctx.has_bank = bank_z is not None
    saved = [z, *lse, *coef, *n_pos, *valid_list, torch.stack(n_valid_list)]
    if bank_z is not None:
        saved.append(bank_z)
    ctx.save_for_backward(*saved)
    valid_rows = torch.stack(valid_list) if valid_list else torch.zeros(0, n, dtype=torch.bool, device=z.device)
    ctx.mark_non_differentiable(sims, counts, valid_rows)
    return losses, sims, counts, valid_rows


def _backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    plan: _Plan = ctx.plan
    n_levels = len(plan.levels)
    saved = ctx.saved_tensors
    z = saved[0]
    lse = saved[1 : 1 + n_levels]
    coef = saved[1 + n_levels : 1 + 2 * n_levels]
    n_pos = saved[1 + 2 * n_levels : 1 + 3 * n_levels]
    valid = saved[1 + 3 * n_levels : 1 + 4 * n_levels]
    n_valid = saved[1 + 4 * n_levels]
    bank_z = saved[2 + 4 * n_levels] if ctx.has_bank else None
    tau, dt = plan.temperature, z.dtype
    all_denominator = plan.denominator == "all"

    grad_z = torch.zeros_like(z)
    grad_bank = torch.zeros_like(bank_z) if bank_z is not None and ctx.needs_input_grad[1] else None
    # c_i = dLoss/dlevel_loss * valid_i / n_valid
    scale = grad_losses.to(dt) / n_valid.clamp_min(1).to(dt)  # (L,)
    inv_pos = [1.0 / c.clamp_min(1).to(dt) for c in n_pos]
    # Rows of the backward are the valid anchors only.
    plan_rows = plan.anchors
    plan.anchors = list(valid)
    try:
        for r0 in range(0, plan.n, plan.block_rows):
            r1 = min(plan.n, r0 + plan.block_rows)
            row_levels = _row_levels(plan, plan.anchors, r0, r1)
            if not any(row_levels):
                continue
            zr = z[r0:r1]
            grad_r = torch.zeros_like(zr)
            for tile in plan.tiles(z, bank_z, r0, r1, row_levels):
                logits = tile.cos / tau
                zero = torch.zeros_like(logits)
                d_s = torch.zeros_like(logits)
                for li in range(n_levels):
                    if not row_levels[li]:
                        continue
                    p, q = tile.pos[li], tile.neg[li]
                    if p is None and q is None:
                        continue
                    big_l = lse[li][r0:r1, None]
                    shift = torch.where(torch.isfinite(big_l), big_l, torch.zeros_like(big_l))
                    c = scale[li] * valid[li][r0:r1].to(dt)[:, None]  # (R, 1)
                    term = zero
                    if q is not None:
                        e = torch.exp(_masked(logits, q, tile.logw[li]) - shift)
                        term = term + (e if all_denominator else coef[li][r0:r1, None] * e)
                    if p is not None:
                        ip = inv_pos[li][r0:r1, None]
                        if all_denominator:
                            e = torch.exp(_masked(logits, p, None) - shift)
                            term = term + e - torch.where(p, ip.expand_as(logits), zero)
                        else:
                            term = term - torch.where(p, ip * torch.sigmoid(big_l - logits), zero)
                    d_s = d_s + c * term
                d_s = d_s / tau  # d loss / d cos
                if tile.kind == "batch":
                    zc = z[tile.c0 : tile.c1]
                    grad_r += d_s @ zc
                    grad_z[tile.c0 : tile.c1] += d_s.T @ zr
                elif tile.kind == "bank" and bank_z is not None:
                    grad_r += d_s @ bank_z[tile.c0 : tile.c1]
                    if grad_bank is not None:
                        grad_bank[tile.c0 : tile.c1] += d_s.T @ zr
                elif bank_z is not None and tile.safe is not None:
                    grad_r += torch.einsum("rc,rcd->rd", d_s, bank_z[tile.safe])
                    if grad_bank is not None:
                        contrib = d_s[:, :, None] * zr[:, None, :]  # (R, C, D)
                        grad_bank.index_add_(0, tile.safe.reshape(-1), contrib.reshape(-1, z.shape[1]))
            grad_z[r0:r1] += grad_r
    finally:
        plan.anchors = plan_rows
    return grad_z, grad_bank, None


def multilevel_info_nce_fused(
    z: Tensor,
    tags: ViewTags,
    levels: list[Level],
    temperature: float,
    denominator: str,
    bank_z: Tensor | None,
    bank_tags: ViewTags | None,
    candidates: list[Tensor | None],
    weights: list[Any],
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Tiled multi-level InfoNCE; same values, gradients and statistics as the reference path.

    Called by :func:`mlcl_losses.functional.multilevel_info_nce` after validation.

    Args:
        z: ``(N, D)`` L2-normalised embeddings, float32 or float64.
        tags: ``(N,)`` tags.
        levels: the levels.
        temperature: :math:`\\tau > 0`.
        denominator: ``"pos_neg"`` or ``"all"``.
        bank_z: ``(M, D)`` normalised bank embeddings (dtype of ``z``) or ``None``.
        bank_tags: ``(M,)`` bank tags or ``None``.
        candidates: one ``(N, k)`` int tensor (``-1`` = padding) or ``None`` per level.
        weights: one spec per level: ``None``, a ``(N, N + C_b)`` tensor, or a callable with
            ``is_elementwise = True`` called on tiles, ``fn(hardness (R, C), mask (R, C)) -> (R, C)``.
        block_rows: anchors per row tile (default :data:`BLOCK_ROWS`).
        block_cols: candidates per column tile (default :data:`BLOCK_COLS`).

    Returns:
        ``(loss, stats)`` as :func:`~mlcl_losses.functional.multilevel_info_nce`.

    Raises:
        ValueError: negative weights of the wrong shape, negative or not finite.
    """
    from mlcl_losses.functional import LevelStats  # local import: functional imports this module

    block_rows = BLOCK_ROWS if block_rows is None else int(block_rows)
    block_cols = BLOCK_COLS if block_cols is None else int(block_cols)
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"Expected positive block sizes, but got block_rows={block_rows}, block_cols={block_cols}")
    n = z.shape[0]
    for level, cand, spec in zip(levels, candidates, weights, strict=True):
        if isinstance(spec, Tensor):
            c_b = 0 if bank_z is None else (bank_z.shape[0] if cand is None else cand.shape[1])
            if spec.shape != (n, n + c_b):
                raise ValueError(
                    f"Expected `negative_weights` of level {level.name!r} to have shape {(n, n + c_b)} "
                    f"(anchors, batch + bank candidates), but got {tuple(spec.shape)}"
                )
    plan = _Plan(
        tags,
        levels,
        temperature,
        denominator,
        bank_tags if bank_z is not None else None,
        0 if bank_z is None else bank_z.shape[0],
        candidates,
        weights,
        block_rows,
        block_cols,
    )
    losses, sims, counts, valid_rows = _FusedInfoNCE.apply(z, bank_z, plan)
    level_weights = torch.tensor([float(level.weight) for level in levels], dtype=z.dtype, device=z.device)
    total = (losses * level_weights).sum()
    out: dict[str, Any] = {}
    for li, level in enumerate(levels):
        out[level.name] = LevelStats(
            loss=losses[li].detach(),
            anchors=counts[li, 0],
            skipped=counts[li, 1],
            pos_sim=sims[li, 0],
            neg_sim=sims[li, 1],
            valid=valid_rows[li],
        )
    logger.debug("fused multilevel_info_nce: N=%d, levels=%d, blocks=(%d, %d)", n, len(levels), block_rows, block_cols)
    return total, out


