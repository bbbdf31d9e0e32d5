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
    """One similarity tile of a row group: columns of the batch, the bank or mined candidates."""

    kind: str  # "batch" | "bank" | "cand"
    c0: int  # first column (batch/bank index; candidate slot for "cand")
    c1: int
    cos: Tensor  # (R, C) cosine similarities
    neg: dict[int, Tensor]  # level -> (R, C) bool negative mask
    logw: dict[int, Tensor | None]  # level -> (R, C) log negative weight (-inf outside the mask) or None (weight 1)
    pos: dict[int, tuple[Tensor, Tensor]]  # level -> positive pairs (row in tile (P,), column in tile (P,))
    safe: Tensor | None = None  # (R, C) bank index of a candidate tile


@dataclass
class _Group:
    """Row tile: rows (in batch order) that are rows of the same set of levels."""

    rows: Tensor  # (R,) int64 batch indices
    levels: list[int]


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
        # Distinct candidate tensors (levels may share one).
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
        self.full_bank_levels = {
            li
            for li, cand in enumerate(candidates)
            if cand is None and bank_tags is not None and levels[li].bank_negatives
        }

    def groups(self, row_masks: Sequence[Tensor]) -> list[_Group]:
        """Row tiles: rows sorted by the set of levels they are rows of, at most ``block_rows`` each.

        Rows of no level are skipped, and a tile never mixes level sets, so no tile spends work
        on rows a level would mask out (CoMCL: each patch is the anchor of at most one level).
        One host synchronisation per call.
        """
        if not row_masks or self.n == 0:
            return []
        signature = torch.zeros(self.n, dtype=torch.long, device=row_masks[0].device)
        for li, mask in enumerate(row_masks):
            signature |= mask.long() << li
        order = torch.argsort(signature, stable=True)
        sig_sorted = signature[order]
        values, counts = torch.unique_consecutive(sig_sorted, return_counts=True)
        out: list[_Group] = []
        start = 0
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if value != 0:
                levels = [li for li in range(len(row_masks)) if (value >> li) & 1]
                for p0 in range(start, start + count, self.block_rows):
                    p1 = min(start + count, p0 + self.block_rows)
                    out.append(_Group(order[p0:p1], levels))
            start += count
        return out

    def _weight_tile(self, li: int, cos: Tensor, neg: Tensor, rows: Tensor, c0: int, c1: int) -> Tensor | None:
        """``log w`` of one tile (``-inf`` outside ``neg``), or ``None`` for unit weights.

        ``c0:c1`` are columns of the ``(N, N + C_b)`` weight matrix.
        """
        spec = self.weights[li]
        if spec is None:
            return None
        if isinstance(spec, Tensor):
            w = spec[rows.to(spec.device), c0:c1]
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

    def tiles(self, z: Tensor, bank_z: Tensor | None, group: _Group) -> Iterator[_Tile]:
        """Yield the similarity tiles of a row group with its levels' masks.

        Args:
            z: ``(N, D)`` normalised embeddings.
            bank_z: ``(M, D)`` normalised bank or ``None``.
            group: the row tile and its levels.
        """
        levels, n, bc = self.levels, self.n, self.block_cols
        rows = group.rows
        zr = z[rows]  # (R, D)
        tr = self.tags[rows]
        for c0 in range(0, n, bc):
            c1 = min(n, c0 + bc)
            cos = zr @ z[c0:c1].T  # (R, C)
            tc = self.tags[c0:c1]
            same_source = tr.source[:, None] == tc.source[None, :]
            forbid = same_source
            if tr.image is not None and tc.image is not None:
                forbid = forbid | (tr.image[:, None] == tc.image[None, :])
            same_label = None if tr.label is None or tc.label is None else tr.label[:, None] == tc.label[None, :]
            pos: dict[int, tuple[Tensor, Tensor]] = {}
            neg: dict[int, Tensor] = {}
            logw: dict[int, Tensor | None] = {}
            for li in group.levels:
                level = levels[li]
                related = same_source if level.relation == "source" else same_label
                if related is not None:
                    ri, cj = (related & self.possel[li][c0:c1][None, :]).nonzero(as_tuple=True)
                    keep = rows[ri] != cj + c0  # never its own positive
                    pos[li] = (ri[keep], cj[keep])
                if level.in_batch_negatives:
                    f = forbid | same_label if level.needs_label and same_label is not None else forbid
                    q = self.negsel[li][c0:c1][None, :] & ~f  # the diagonal shares the source: excluded
                    neg[li] = q
                    logw[li] = self._weight_tile(li, cos, q, rows, c0, c1)
            yield _Tile("batch", c0, c1, cos, neg, logw, pos)
        if bank_z is None or self.bank_tags is None:
            return

        bank_levels = [li for li in group.levels if li in self.full_bank_levels]
        if bank_levels:
            for c0 in range(0, self.bank_size, bc):
                c1 = min(self.bank_size, c0 + bc)
                cos = zr @ bank_z[c0:c1].T  # (R, C)
                tc = self.bank_tags[c0:c1]
                neg, logw = {}, {}
                for li in bank_levels:
                    q = self.bank_negsel[li][c0:c1][None, :] & ~_forbid(tr, tc, levels[li])
                    neg[li] = q
                    logw[li] = self._weight_tile(li, cos, q, rows, n + c0, n + c1)
                yield _Tile("bank", c0, c1, cos, neg, logw, {})

        for cand, members in self.cand_groups:
            cand_levels = [li for li in members if li in group.levels and levels[li].bank_negatives]
            if not cand_levels:
                continue
            k = cand.shape[1]
            cand_rows = cand[rows.to(cand.device)]  # (R, k)
            for c0 in range(0, k, bc):
                c1 = min(k, c0 + bc)
                idx = cand_rows[:, c0:c1].to(z.device)  # (R, C)
                valid = idx >= 0
                safe = idx.clamp_min(0).long()
                cos = torch.einsum("rd,rcd->rc", zr, bank_z[safe])  # (R, C)
                tc = self.bank_tags[safe]  # (R, C) tags
                neg, logw = {}, {}
                for li in cand_levels:
                    q = levels[li].negatives(tc) & valid & ~_forbid(tr, tc, levels[li])
                    neg[li] = q
                    logw[li] = self._weight_tile(li, cos, q, rows, n + c0, n + c1)
                yield _Tile("cand", c0, c1, cos, neg, logw, {}, safe)


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
    if logw is not None:
        return values + logw  # logw is -inf outside the mask
    return torch.where(mask, values, torch.full_like(values, float("-inf")))


def _online_update(m: Tensor, s: Tensor, x_max: Tensor, x_sum_fn: Any) -> tuple[Tensor, Tensor]:
    """Streaming log-sum-exp: fold a tile with row maxima ``x_max`` into running max ``m`` and sum ``s`` (``(R,)``).

    ``x_sum_fn(shift)`` returns the tile's ``sum exp(x - shift)`` per row.
    """
    m_new = torch.maximum(m, x_max)
    shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    return m_new, s * torch.exp(m - shift) + x_sum_fn(shift)


def _online_result(m: Tensor, s: Tensor) -> Tensor:
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    tiny = torch.finfo(s.dtype).tiny
    return torch.where(s > 0, shift + torch.log(s.clamp_min(tiny)), torch.full_like(s, float("-inf")))


class _FusedInfoNCE(torch.autograd.Function):
    """Per-level mean anchor losses ``(L,)`` plus non-differentiable statistics; backward recomputes tiles."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: _Plan) -> tuple[Tensor, ...]:
        """Forward pass; see :func:`multilevel_info_nce_fused`."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return _forward(ctx, z, bank_z, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: Tensor, *unused: Any) -> tuple[Tensor | None, Tensor | None, None]:
        """Recompute the tiles and accumulate ``dL/dz`` (and ``dL/dbank`` when the bank needs it)."""
        with torch.autocast(device_type=grad_losses.device.type, enabled=False):
            return _backward(ctx, grad_losses)


def _forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: _Plan) -> tuple[Tensor, ...]:
    n, n_levels = plan.n, len(plan.levels)
    tau, dt, dev = plan.temperature, z.dtype, z.device
    all_denominator = plan.denominator == "all"
    lse = [z.new_full((n,), float("-inf")) for _ in range(n_levels)]  # L (pos_neg) or T (all)
    coef = [z.new_zeros(n) for _ in range(n_levels)]  # A_i (pos_neg); unused (all)
    n_pos = [torch.zeros(n, dtype=torch.long, device=dev) for _ in range(n_levels)]
    n_neg = [torch.zeros(n, dtype=torch.long, device=dev) for _ in range(n_levels)]
    per_anchor = [z.new_zeros(n) for _ in range(n_levels)]
    pos_cos = [z.new_zeros(n) for _ in range(n_levels)]
    neg_cos = [z.new_zeros(n) for _ in range(n_levels)]

    for group in plan.groups(plan.anchors):
        rows, r = group.rows, group.rows.shape[0]
        m = {li: z.new_full((r,), float("-inf")) for li in group.levels}
        s = {li: z.new_zeros(r) for li in group.levels}
        cnt_neg = {li: torch.zeros(r, dtype=torch.long, device=dev) for li in group.levels}
        sum_neg = {li: z.new_zeros(r) for li in group.levels}
        pairs: dict[int, list[tuple[Tensor, Tensor]]] = {li: [] for li in group.levels}  # (row, logit)
        pair_cos: dict[int, list[Tensor]] = {li: [] for li in group.levels}
        for tile in plan.tiles(z, bank_z, group):
            logits = tile.cos / tau
            zero = torch.zeros_like(logits)
            for li, q in tile.neg.items():
                cnt_neg[li] += q.sum(dim=1)
                sum_neg[li] += torch.where(q, tile.cos, zero).sum(dim=1)
                x = _masked(logits, q, tile.logw[li])
                m[li], s[li] = _online_update(
                    m[li], s[li], x.amax(dim=1), lambda sh, x=x: torch.exp(x - sh[:, None]).sum(1)
                )
            for li, (ri, cj) in tile.pos.items():
                pairs[li].append((ri, logits[ri, cj]))
                pair_cos[li].append(tile.cos[ri, cj])
        for li in group.levels:
            ri = torch.cat([p[0] for p in pairs[li]]) if pairs[li] else torch.zeros(0, dtype=torch.long, device=dev)
            sp = torch.cat([p[1] for p in pairs[li]]) if pairs[li] else z.new_zeros(0)
            cp = torch.cat(pair_cos[li]) if pair_cos[li] else z.new_zeros(0)
            cnt_pos = torch.bincount(ri, minlength=r)
            npos = cnt_pos.clamp_min(1).to(dt)
            big_l = _online_result(m[li], s[li])  # (R,) negative log-sum-exp
            if all_denominator:
                # T = logaddexp(L, log sum_p e^{s_p}): fold the positive pairs into the running (m, s).
                pmax = z.new_full((r,), float("-inf")).scatter_reduce(0, ri, sp, "amax")
                m_all, s_all = _online_update(
                    m[li],
                    s[li],
                    pmax,
                    lambda sh, ri=ri, sp=sp: torch.zeros_like(sh).index_add(0, ri, torch.exp(sp - sh[ri])),
                )
                big_t = _online_result(m_all, s_all)
                per_anchor[li][rows] = big_t - z.new_zeros(r).index_add(0, ri, sp) / npos
                lse[li][rows] = big_t
            else:
                lp = big_l[ri]
                per_anchor[li][rows] = z.new_zeros(r).index_add(0, ri, torch.logaddexp(sp, lp) - sp) / npos
                coef[li][rows] = z.new_zeros(r).index_add(0, ri, torch.sigmoid(lp - sp)) / npos
                lse[li][rows] = big_l
            n_pos[li][rows] = cnt_pos
            n_neg[li][rows] = cnt_neg[li]
            pos_cos[li][rows] = z.new_zeros(r).index_add(0, ri, cp)
            neg_cos[li][rows] = sum_neg[li]

    level_losses: list[Tensor] = []
    valid_list: list[Tensor] = []
    n_valid_list: list[Tensor] = []
    sim_rows: list[Tensor] = []
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
        sim_rows.append(
            torch.stack(
                [torch.where(vp > 0, sp / vp.clamp_min(1), zero), torch.where(vn > 0, sn / vn.clamp_min(1), zero)]
            )
        )
    losses = torch.stack(level_losses)
    sims = torch.stack(sim_rows)  # (L, 2) float: pos_sim, neg_sim
    counts = torch.stack(count_rows)  # (L, 2) int64: anchors, skipped
    valid_rows = torch.stack(valid_list)  # (L, N) bool
    ctx.plan = plan
    ctx.has_bank = bank_z is not None
    saved = [z, torch.stack(lse), torch.stack(coef), torch.stack(n_pos), valid_rows, torch.stack(n_valid_list)]
    if bank_z is not None:
        saved.append(bank_z)
    ctx.save_for_backward(*saved)
    ctx.mark_non_differentiable(sims, counts, valid_rows)
    return losses, sims, counts, valid_rows


def _backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    plan: _Plan = ctx.plan
    z, lse, coef, n_pos, valid, n_valid, *rest = ctx.saved_tensors
    bank_z = rest[0] if ctx.has_bank else None
    tau, dt = plan.temperature, z.dtype
    all_denominator = plan.denominator == "all"
    grad_z = torch.zeros_like(z)
    grad_bank = torch.zeros_like(bank_z) if bank_z is not None and ctx.needs_input_grad[1] else None
    scale = grad_losses.to(dt) / n_valid.clamp_min(1).to(dt)  # (L,) dLoss/dl_i of a valid anchor
    inv_pos = 1.0 / n_pos.clamp_min(1).to(dt)  # (L, N)
    lse_shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # (L, N)

    # Only valid anchors have a gradient: they are the rows of the backward.
    for group in plan.groups(list(valid.unbind(0))):
        rows = group.rows
        zr = z[rows]
        grad_r = torch.zeros_like(zr)
        for tile in plan.tiles(z, bank_z, group):
            logits = tile.cos / tau
            d_s = torch.zeros_like(logits)  # d loss / d logits
            for li, q in tile.neg.items():
                e = torch.exp(_masked(logits, q, tile.logw[li]) - lse_shift[li, rows][:, None])
                factor = scale[li] if all_denominator else scale[li] * coef[li, rows][:, None]
                d_s += factor * e
            for li, (ri, cj) in tile.pos.items():
                sp = logits[ri, cj]
                rr = rows[ri]
                if all_denominator:
                    g = scale[li] * (torch.exp(sp - lse_shift[li, rr]) - inv_pos[li, rr])
                else:
                    g = -scale[li] * inv_pos[li, rr] * torch.sigmoid(lse[li, rr] - sp)
                d_s.index_put_((ri, cj), g, accumulate=True)
            d_s = d_s / tau  # d loss / d cos
            if tile.kind == "batch":
                grad_r += d_s @ z[tile.c0 : tile.c1]
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
        grad_z.index_add_(0, rows, grad_r)
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
    r"""Tiled multi-level InfoNCE; same values, gradients and statistics as the reference path.

    Called by :func:`mlcl_losses.functional.multilevel_info_nce` after validation.

    Args:
        z: ``(N, D)`` L2-normalised embeddings, float32 or float64.
        tags: ``(N,)`` tags.
        levels: the levels.
        temperature: :math:`\tau > 0`.
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
    if not torch.compiler.is_compiling():  # a logger call would break a compiled graph
        logger.debug(
            "fused multilevel_info_nce: N=%d, levels=%d, blocks=(%d, %d)", n, len(levels), block_rows, block_cols
        )
    return total, out
