r"""Fused (tiled) path of :func:`mlcl_losses.functional.multilevel_info_nce`.

The dense reference builds one ``(N, N + C_b)`` logit matrix and two boolean masks per
level. This path never does. It computes only the similarities a level can use:

* **Rows** are the anchors, grouped by the set of levels they anchor and cut into row
  tiles of at most ``block_rows``; rows that anchor no level are never visited.
* **Batch columns** of a row tile are only those its levels' negative selectors admit
  (a *span*: e.g. for the CoMCL lesion level, the healthy patches). Each row tile visits
  its span in column tiles of at most ``block_cols``; a ``(R, C)`` logit tile is one
  matmul, shared by the levels of the row tile. The never-negative masks (same source,
  image or label) are built inside a tile only where the row tile and the span share a
  tag value at all; otherwise the tile is unmasked.
* **Positives** of ``relation="source"`` levels are enumerated from the tags (sort by
  source, ``O(N log N)``): a handful per anchor, scored with one dot product each instead
  of a scan of every tile. Positives of ``relation="label"`` levels are dense: they get
  their own pass over the span of the positive selector.
* Bank columns and mined candidates are visited after the batch, as tiles of their own.

Each level keeps a streaming (online) log-sum-exp per anchor over its negatives,
accumulated in float32 (float64 for float64 input); the logits are ``(z / \tau) z^T``.

A custom :class:`torch.autograd.Function` saves only the normalised embeddings and
``O(N)`` per-level row statistics (the log-sum-exp, the positive count, a coefficient and
the valid flag); its backward recomputes the tiles (FlashAttention style,
https://arxiv.org/abs/2205.14135). Memory is ``O(N D + P + block_rows * block_cols)``,
with ``P`` the number of same-source positive pairs (a few per anchor).

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

__all__ = ["BLOCK_COLS", "BLOCK_ROWS", "multilevel_info_nce_fused", "source_pairs", "supports"]

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
    """One logit tile of a row tile: columns of the batch, the bank or mined candidates."""

    kind: str  # "batch" | "bank" | "cand"
    logits: Tensor  # (R, C) s = cos / tau
    cols: Tensor | slice  # batch: (C,) batch indices; bank: slice of bank rows; cand: slice of candidate slots
    zc: Tensor | None  # (C, D) column embeddings (batch, bank); None for candidates
    neg: dict[int, Tensor | None]  # level -> (R, C) bool negative mask, None = every column of the tile
    logw: dict[int, Tensor | None]  # level -> (R, C) log negative weight (-inf outside the mask) or None (weight 1)
    pos: dict[int, Tensor]  # label level -> (R, C) bool positive mask
    safe: Tensor | None = None  # (R, C) bank index of a candidate tile


@dataclass
class _Group:
    """Row tile: rows (in batch order) that are rows of the same set of levels."""

    rows: Tensor  # (R,) int64 batch indices
    levels: list[int]


@dataclass
class _Span:
    """Batch columns visited by row tiles of some levels, and which of them each level uses."""

    cols: Tensor  # (C,) int64 batch indices, ascending
    neg: dict[int, Tensor | None]  # level -> (C,) bool negative selector on ``cols``; None = all of them
    pos: dict[int, Tensor | None]  # label level -> (C,) bool positive selector on ``cols``; None = all


def _restrict(mask: Tensor, cols: Tensor) -> Tensor | None:
    """``mask[cols]``, or ``None`` when it selects every column."""
    sub = mask[cols]
    return None if bool(sub.all()) else sub


def _shares(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two tag vectors have a value in common (so a dense equality mask is needed)."""
    return a is not None and b is not None and a.numel() > 0 and b.numel() > 0 and bool(torch.isin(a, b).any())


def _or(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b


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
        #: Levels whose positives share the label: dense, found in tiles; the others share the source: sparse pairs.
        self.dense = [level.relation == "label" for level in levels]
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
        self._spans: dict[tuple[tuple[int, ...], tuple[int, ...]], _Span] = {}
        self._pairs: dict[int, tuple[Tensor, Tensor]] = {}
        self._checks: dict[tuple[tuple[int, ...], ...], tuple[bool, bool, bool, bool]] = {}

    def groups(self, row_masks: Sequence[Tensor | None]) -> list[_Group]:
        """Row tiles: rows sorted by the set of levels they are rows of, at most ``block_rows`` each.

        Rows of no level are skipped (``None`` = the level has no rows here), and a tile never
        mixes level sets, so no tile spends work on rows a level would mask out (CoMCL: each patch
        is the anchor of at most one level). A level set's rows are cut into tiles of equal size.
        One host synchronisation per call.
        """
        if self.n == 0 or all(mask is None for mask in row_masks):
            return []
        signature = torch.zeros(self.n, dtype=torch.long, device=self.tags.device)
        for li, mask in enumerate(row_masks):
            if mask is not None:
                signature |= mask.long() << li
        order = torch.argsort(signature, stable=True)
        values, counts = torch.unique_consecutive(signature[order], return_counts=True)
        out: list[_Group] = []
        start = 0
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if value != 0:
                levels = [li for li in range(len(row_masks)) if (value >> li) & 1]
                pieces = -(-count // self.block_rows)
                bounds = [start + (count * k) // pieces for k in range(pieces + 1)]
                out.extend(_Group(order[p0:p1], levels) for p0, p1 in zip(bounds[:-1], bounds[1:], strict=True))
            start += count
        return out

    def span(self, neg_levels: tuple[int, ...], pos_levels: tuple[int, ...]) -> _Span:
        """The batch columns that the negatives of ``neg_levels`` and positives of ``pos_levels`` may use."""
        key = (neg_levels, pos_levels)
        if key not in self._spans:
            union = torch.zeros(self.n, dtype=torch.bool, device=self.tags.device)
            for li in neg_levels:
                union |= self.negsel[li]
            for li in pos_levels:
                union |= self.possel[li]
            cols = union.nonzero()[:, 0]
            self._spans[key] = _Span(
                cols,
                {li: _restrict(self.negsel[li], cols) for li in neg_levels},
                {li: _restrict(self.possel[li], cols) for li in pos_levels},
            )
        return self._spans[key]

    def checks(
        self, levels: Sequence[int], neg_levels: tuple[int, ...], pos_levels: tuple[int, ...]
    ) -> tuple[bool, bool, bool, bool]:
        """Which equality masks the tiles of ``levels``' rows against a span need: source, image, label, self.

        A mask is needed only where some row and some column of the span share a value (or, for
        ``self``, an index) at all. Checked once per call against the anchors of ``levels``, a
        superset of the rows of any tile of them.
        """
        key = (tuple(levels), neg_levels, pos_levels)
        if key not in self._checks:
            tags = self.tags
            cols = self.span(neg_levels, pos_levels).cols
            rows_mask = torch.zeros(self.n, dtype=torch.bool, device=tags.device)
            for li in levels:
                rows_mask |= self.anchors[li]
            rows = rows_mask.nonzero()[:, 0]

            def shares(tag: Tensor | None) -> bool:
                return tag is not None and _shares(tag[rows], tag[cols])

            wants_label = bool(pos_levels) or any(self.levels[li].needs_label for li in neg_levels)
            self._checks[key] = (
                shares(tags.source),
                shares(tags.image),
                wants_label and shares(tags.label),
                bool(pos_levels) and _shares(rows, cols),
            )
        return self._checks[key]

    def pairs(self, li: int) -> tuple[Tensor, Tensor]:
        """Positive pairs ``(anchor (P,), positive (P,))`` of a ``relation="source"`` level, from the tags.

        Candidates are sorted by source; each anchor's positives are the run of its source
        (``searchsorted``), minus the anchor itself. Sorted by anchor.
        """
        if li not in self._pairs:
            self._pairs[li] = source_pairs(self.tags.source, self.anchors[li], self.possel[li])
        return self._pairs[li]

    def _weight_tile(
        self, li: int, logits: Tensor, neg: Tensor | None, rows: Tensor, cols: Tensor | slice
    ) -> Tensor | None:
        """``log w`` of one tile (``-inf`` outside ``neg``), or ``None`` for unit weights.

        ``cols`` index the columns of the ``(N, N + C_b)`` weight matrix.
        """
        spec = self.weights[li]
        if spec is None:
            return None
        if neg is None:
            neg = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        if isinstance(spec, Tensor):
            rr = rows.to(spec.device)
            w = spec[rr[:, None], cols.to(spec.device)[None, :]] if isinstance(cols, Tensor) else spec[rr, cols]
        else:
            cos = (logits * self.temperature).detach()
            w = spec(cos, neg)
            if not isinstance(w, Tensor) or w.shape != cos.shape:
                got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(
                    f"Expected the elementwise `negative_weights` of level {self.levels[li].name!r} to return "
                    f"a tile of shape {tuple(cos.shape)} (as its hardness tile), but got {got}"
                )
        w = w.to(device=logits.device, dtype=logits.dtype)
        ok = torch.isfinite(w) & (w >= 0)
        bad = neg & ~ok
        if bool(bad.any()):
            raise ValueError(f"Expected finite `negative_weights` >= 0, but got {float(w[bad][0])}")
        neg_inf = torch.full_like(w, float("-inf"))
        return torch.where(neg & (w > 0), torch.log(torch.where(ok, w, torch.ones_like(w))), neg_inf)

    def tiles(
        self,
        zs: Tensor,
        z: Tensor,
        bank_z: Tensor | None,
        group: _Group,
        neg_levels: Sequence[int],
        pos_levels: Sequence[int] = (),
        cache: dict[Any, Tensor] | None = None,
    ) -> Iterator[_Tile]:
        """Yield the logit tiles of a row tile with its levels' masks.

        Args:
            zs: ``(N, D)`` normalised embeddings divided by the temperature (the rows).
            z: ``(N, D)`` normalised embeddings (the columns).
            bank_z: ``(M, D)`` normalised bank or ``None``.
            group: the row tile.
            neg_levels: levels of ``group`` whose negatives are needed (batch, bank, candidates).
            pos_levels: label levels of ``group`` whose (dense) positives are needed (batch only).
            cache: the pass's gathered span embeddings, reused by the row tiles of one span.
        """
        levels, tags, bc = self.levels, self.tags, self.block_cols
        rows = group.rows
        r = rows.shape[0]
        zr = zs[rows]  # (R, D)
        batch_neg = tuple(li for li in neg_levels if levels[li].in_batch_negatives)
        span = self.span(batch_neg, tuple(pos_levels))
        cols_all = span.cols
        if cols_all.numel():
            check_src, check_img, check_lbl, check_self = self.checks(group.levels, batch_neg, tuple(pos_levels))
            src_r, src_c = tags.source[rows], tags.source[cols_all]
            img_r = None if tags.image is None else tags.image[rows]
            lbl_r = None if tags.label is None else tags.label[rows]
            key = (batch_neg, tuple(pos_levels))
            if cache is None or key not in cache:
                zc_all = z[cols_all]  # (C, D)
                if cache is not None:
                    cache[key] = zc_all
            else:
                zc_all = cache[key]
            for c0 in range(0, cols_all.shape[0], bc):
                c1 = min(cols_all.shape[0], c0 + bc)
                cols = cols_all[c0:c1]
                zc = zc_all[c0:c1]
                logits = zr @ zc.T  # (R, C)
                forbid = src_r[:, None] == src_c[None, c0:c1] if check_src else None
                if check_img and img_r is not None and tags.image is not None:
                    forbid = _or(forbid, img_r[:, None] == tags.image[cols][None, :])
                same_label = None
                if check_lbl and lbl_r is not None and tags.label is not None:
                    same_label = lbl_r[:, None] == tags.label[cols][None, :]
                neg: dict[int, Tensor | None] = {}
                logw: dict[int, Tensor | None] = {}
                for li in batch_neg:
                    f = _or(forbid, same_label) if levels[li].needs_label else forbid
                    sel = span.neg[li]
                    q = None if sel is None else sel[c0:c1][None, :].expand(r, c1 - c0)
                    if f is not None:
                        q = ~f if q is None else q & ~f  # the diagonal shares the source: excluded
                    neg[li] = q
                    logw[li] = self._weight_tile(li, logits, q, rows, cols)
                pos: dict[int, Tensor] = {}
                if same_label is not None:
                    for li in pos_levels:
                        sel = span.pos[li]
                        p = same_label if sel is None else same_label & sel[c0:c1][None, :]
                        if check_self:
                            p = p & (rows[:, None] != cols[None, :])  # never its own positive
                        pos[li] = p
                yield _Tile("batch", logits, cols, zc, neg, logw, pos)
        if bank_z is None or self.bank_tags is None:
            return

        tr = tags[rows]
        bank_levels = [li for li in neg_levels if li in self.full_bank_levels]
        if bank_levels:
            n = self.n
            for c0 in range(0, self.bank_size, bc):
                c1 = min(self.bank_size, c0 + bc)
                zc = bank_z[c0:c1]
                logits = zr @ zc.T  # (R, C)
                tc = self.bank_tags[c0:c1]
                neg, logw = {}, {}
                for li in bank_levels:
                    q = self.bank_negsel[li][c0:c1][None, :] & ~_forbid(tr, tc, levels[li])
                    neg[li] = q
                    logw[li] = self._weight_tile(li, logits, q, rows, slice(n + c0, n + c1))
                yield _Tile("bank", logits, slice(c0, c1), zc, neg, logw, {})

        for cand, members in self.cand_groups:
            cand_levels = [li for li in members if li in neg_levels and levels[li].bank_negatives]
            if not cand_levels:
                continue
            k = cand.shape[1]
            cand_rows = cand[rows.to(cand.device)]  # (R, k)
            for c0 in range(0, k, bc):
                c1 = min(k, c0 + bc)
                idx = cand_rows[:, c0:c1].to(z.device)  # (R, C)
                valid = idx >= 0
                safe = idx.clamp_min(0).long()
                logits = torch.einsum("rd,rcd->rc", zr, bank_z[safe])  # (R, C)
                tc = self.bank_tags[safe]  # (R, C) tags
                neg, logw = {}, {}
                for li in cand_levels:
                    q = levels[li].negatives(tc) & valid & ~_forbid(tr, tc, levels[li])
                    neg[li] = q
                    logw[li] = self._weight_tile(li, logits, q, rows, slice(self.n + c0, self.n + c1))
                yield _Tile("cand", logits, slice(c0, c1), None, neg, logw, {}, safe)


def source_pairs(source: Tensor, anchors: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Same-source pairs ``(anchor (P,), positive (P,))``, sorted by anchor, never an embedding with itself.

    Args:
        source: ``(N,)`` source ids.
        anchors: ``(N,)`` bool, which embeddings are anchors.
        positives: ``(N,)`` bool, which embeddings may be positives.

    Candidates are sorted by source; each anchor's positives are the run of its source
    (``searchsorted``), minus the anchor itself: ``O(N log N + P)``, no ``N x N`` mask.
    """
    anchor_idx = anchors.nonzero()[:, 0]
    pos_idx = positives.nonzero()[:, 0]
    keys, order = torch.sort(source[pos_idx], stable=True)
    pos_sorted = pos_idx[order]
    anchor_keys = source[anchor_idx]
    lo = torch.searchsorted(keys, anchor_keys, side="left")
    count = torch.searchsorted(keys, anchor_keys, side="right") - lo
    a = anchor_idx.repeat_interleave(count)
    first = (torch.cumsum(count, 0) - count).repeat_interleave(count)
    offset = torch.arange(a.shape[0], device=a.device) - first + lo.repeat_interleave(count)
    p = pos_sorted[offset]
    keep = a != p  # never its own positive
    return a[keep], p[keep]


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


def _pair_chunk(plan: _Plan, d: int) -> int:
    """Pairs scored at once: about one tile's worth of memory."""
    return max(1, (plan.block_rows * plan.block_cols) // max(1, d))


def _forward(ctx: Any, z: Tensor, bank_z: Tensor | None, plan: _Plan) -> tuple[Tensor, ...]:
    n, n_levels = plan.n, len(plan.levels)
    tau, dt, dev = plan.temperature, z.dtype, z.device
    all_denominator = plan.denominator == "all"
    zs = z / tau  # (N, D): logits = zs @ z.T
    neg_m = [z.new_full((n,), float("-inf")) for _ in range(n_levels)]  # running max of the negatives' terms
    neg_s = [z.new_zeros(n) for _ in range(n_levels)]  # running sum
    n_neg = [torch.zeros(n, dtype=torch.long, device=dev) for _ in range(n_levels)]
    neg_logit = [z.new_zeros(n) for _ in range(n_levels)]  # sum of the negatives' logits

    # Pass 1: the negatives' log-sum-exp L_i of every level.
    cache: dict[Any, Tensor] = {}
    for group in plan.groups(plan.anchors):
        rows, r = group.rows, group.rows.shape[0]
        m = {li: z.new_full((r,), float("-inf")) for li in group.levels}
        s = {li: z.new_zeros(r) for li in group.levels}
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
                m[li], s[li] = _fold(m[li], s[li], _masked(logits, q, tile.logw[li], copy=shared))
        for li in group.levels:
            neg_m[li][rows], neg_s[li][rows] = m[li], s[li]
            n_neg[li][rows], neg_logit[li][rows] = cnt[li], total[li]
    big_l = [_online_result(neg_m[li], neg_s[li]) for li in range(n_levels)]  # (N,) each; -inf: no negative

    # Pass 2: the positives, given L_i.
    n_pos = [torch.zeros(n, dtype=torch.long, device=dev) for _ in range(n_levels)]
    pos_logit = [z.new_zeros(n) for _ in range(n_levels)]  # sum of the positives' logits
    term = [z.new_zeros(n) for _ in range(n_levels)]  # pos_neg: sum_p logaddexp(s_p, L) - s_p
    coef_sum = [z.new_zeros(n) for _ in range(n_levels)]  # pos_neg: sum_p sigmoid(L - s_p)
    pos_m = [z.new_full((n,), float("-inf")) for _ in range(n_levels)]  # all: log-sum-exp of the positives
    pos_s = [z.new_zeros(n) for _ in range(n_levels)]
    for li in range(n_levels):
        if plan.dense[li]:
            continue
        a, p = plan.pairs(li)
        sp = _pair_logits(zs, z, a, p, _pair_chunk(plan, z.shape[1]))  # (P,)
        n_pos[li] = torch.bincount(a, minlength=n)
        pos_logit[li] = z.new_zeros(n).index_add(0, a, sp)
        if all_denominator:
            pos_m[li] = z.new_full((n,), float("-inf")).scatter_reduce(0, a, sp, "amax")
            pos_s[li] = z.new_zeros(n).index_add(0, a, torch.exp(sp - _shift(pos_m[li])[a]))
        else:
            la = big_l[li][a]
            term[li] = z.new_zeros(n).index_add(0, a, torch.logaddexp(sp, la) - sp)
            coef_sum[li] = z.new_zeros(n).index_add(0, a, torch.sigmoid(la - sp))
    dense_rows = [plan.anchors[li] if plan.dense[li] else None for li in range(n_levels)]
    for group in plan.groups(dense_rows):
        rows = group.rows
        for tile in plan.tiles(zs, z, None, group, (), group.levels, cache):
            x = tile.logits
            zero = torch.zeros_like(x)
            for li, pm in tile.pos.items():
                n_pos[li][rows] += pm.sum(dim=1)
                pos_logit[li][rows] += torch.where(pm, x, zero).sum(dim=1)
                if all_denominator:
                    m_r, s_r = _fold(pos_m[li][rows], pos_s[li][rows], x.masked_fill(~pm, float("-inf")))
                    pos_m[li][rows], pos_s[li][rows] = m_r, s_r
                else:
                    lr = big_l[li][rows][:, None]
                    term[li][rows] += torch.where(pm, torch.logaddexp(x, lr) - x, zero).sum(dim=1)
                    coef_sum[li][rows] += torch.where(pm, torch.sigmoid(lr - x), zero).sum(dim=1)

    lse: list[Tensor] = []  # L (pos_neg) or T (all)
    coef: list[Tensor] = []  # A_i (pos_neg); unused (all)
    level_losses: list[Tensor] = []
    valid_list: list[Tensor] = []
    n_valid_list: list[Tensor] = []
    sim_rows: list[Tensor] = []
    count_rows: list[Tensor] = []
    zero = z.new_zeros(())
    for li in range(n_levels):
        npos = n_pos[li].clamp_min(1).to(dt)
        if all_denominator:
            big_t = _online_result(*_merge(neg_m[li], neg_s[li], pos_m[li], pos_s[li]))
            per_anchor = big_t - pos_logit[li] / npos
            lse.append(big_t)
            coef.append(z.new_zeros(n))
        else:
            per_anchor = term[li] / npos
            lse.append(big_l[li])
            coef.append(coef_sum[li] / npos)
        valid = plan.anchors[li] & (n_pos[li] > 0) & (n_neg[li] > 0)
        n_valid = valid.sum()
        loss_rows = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
        level_losses.append(loss_rows.sum() / n_valid.clamp_min(1).to(dt))
        valid_list.append(valid)
        n_valid_list.append(n_valid)
        vp = torch.where(valid, n_pos[li], torch.zeros_like(n_pos[li])).sum()
        vn = torch.where(valid, n_neg[li], torch.zeros_like(n_neg[li])).sum()
        sp_sum = torch.where(valid, pos_logit[li], torch.zeros_like(pos_logit[li])).sum() * tau  # cosines
        sn_sum = torch.where(valid, neg_logit[li], torch.zeros_like(neg_logit[li])).sum() * tau
        count_rows.append(torch.stack([n_valid, (plan.anchors[li] & ~valid).sum()]))
        sim_rows.append(
            torch.stack(
                [
                    torch.where(vp > 0, sp_sum / vp.clamp_min(1), zero),
                    torch.where(vn > 0, sn_sum / vn.clamp_min(1), zero),
                ]
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
    zs = z / tau
    grad_z = torch.zeros_like(z)
    grad_bank = torch.zeros_like(bank_z) if bank_z is not None and ctx.needs_input_grad[1] else None
    scale = grad_losses.to(dt) / n_valid.clamp_min(1).to(dt)  # (L,) dLoss/dl_i of a valid anchor
    inv_pos = 1.0 / n_pos.clamp_min(1).to(dt)  # (L, N)
    lse_shift = _shift(lse)  # (L, N)
    # d loss / d logit of a negative, per row: scale (all) or scale * A_i (pos_neg); / tau makes it d / d cos.
    neg_factor = (scale[:, None].expand_as(coef) if all_denominator else scale[:, None] * coef) / tau  # (L, N)

    # Only valid anchors have a gradient: they are the rows of the backward.
    cache: dict[Any, Tensor] = {}
    for group in plan.groups(list(valid.unbind(0))):
        rows = group.rows
        zr = z[rows]
        grad_r = torch.zeros_like(zr)
        pos_levels = [li for li in group.levels if plan.dense[li]]
        for tile in plan.tiles(zs, z, bank_z, group, group.levels, pos_levels, cache):
            logits = tile.logits
            shared = len(tile.neg) + len(tile.pos) > 1
            d: Tensor | None = None  # d loss / d cos
            for li, q in tile.neg.items():
                e = _masked(logits, q, tile.logw[li], copy=shared)
                e = e.sub_(lse_shift[li, rows][:, None]).exp_().mul_(neg_factor[li, rows][:, None])
                d = e if d is None else d.add_(e)
            for li, pm in tile.pos.items():
                rs = scale[li] / tau
                if all_denominator:
                    g = rs * (torch.exp(logits - lse_shift[li, rows][:, None]) - inv_pos[li, rows][:, None])
                else:
                    g = -rs * inv_pos[li, rows][:, None] * torch.sigmoid(lse[li, rows][:, None] - logits)
                g = torch.where(pm, g, torch.zeros_like(g))
                d = g if d is None else d.add_(g)
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
            g = scale[li] * (torch.exp(sp - lse_shift[li, a]) - inv_pos[li, a])
        else:
            g = -scale[li] * inv_pos[li, a] * torch.sigmoid(lse[li, a] - sp)
        g = g / tau  # d loss / d cos of each pair
        for i in range(0, a.shape[0], chunk):
            ai, pi, gi = a[i : i + chunk], p[i : i + chunk], g[i : i + chunk, None]
            grad_z.index_add_(0, ai, gi * z[pi])
            grad_z.index_add_(0, pi, gi * z[ai])
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
