r"""The tiles of the fused loss: which anchors and candidates meet, and their masks and weights.

The dense reference builds one ``(N, N + C_b)`` logit matrix and two boolean masks per
level. The fused path never does. A :class:`Plan` lists only the similarities a level can use:

* **Rows** are the anchors, grouped by the set of levels they anchor and cut into row
  tiles of at most ``block_rows``; rows that anchor no level are never visited.
* **Batch columns** of a row tile are only those its levels' negative selectors admit
  (a *span*: e.g. for the CoMCL lesion level, the healthy patches). Each row tile visits
  its span in column tiles of at most ``block_cols``; a ``(R, C)`` logit tile is one
  matmul, shared by the levels of the row tile. The never-negative masks (same source,
  image or label) are built inside a tile only where the row tile and the span share a
  tag value at all; otherwise the tile is unmasked.
* **Positives** of ``relation="source"`` levels are enumerated from the tags (sort by
  source, ``O(N log N)``); those of ``relation="label"`` levels are dense and get their own
  pass over the span of the positive selector.
* Bank columns and mined candidates are visited after the batch, as tiles of their own.
* A ``pair_mask`` and tensor negative weights (dense inputs the caller already holds) are
  read tile by tile; callable weights are called on each tile's cosines (they must be
  elementwise: a self-paced weighting arrives here frozen, its pace fixed for the call).

Every pass (pace selection, forward, backward) visits the same row tiles
(:meth:`Plan.anchor_groups`), so each tile's logits are the same numbers in every pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlcl_losses._core import forbid_mask, source_pairs
from mlcl_losses.levels import Level
from mlcl_losses.tags import ViewTags

__all__ = ["Plan"]


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


def _and(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a & b


def _or(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b


class Plan:
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
        pair_mask: tuple[Tensor | None, Tensor | None] | None = None,
        tau_plus: float = 0.0,
        beta: float = 0.0,
    ) -> None:
        self.tags = tags
        self.tau_plus = tau_plus
        self.beta = beta
        self.levels = levels
        self.temperature = temperature
        self.denominator = denominator
        self.bank_tags = bank_tags
        self.bank_size = bank_size if bank_tags is not None else 0
        self.candidates = candidates
        self.weights = weights
        self.block_rows = block_rows
        self.block_cols = block_cols
        self.pos_mask, self.neg_mask = (None, None) if pair_mask is None else pair_mask
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
        self._anchor_groups: list[_Group] | None = None

    def anchor_groups(self) -> list[_Group]:
        """The row tiles of the anchors, the same list for every pass of the call."""
        if self._anchor_groups is None:
            self._anchor_groups = self.groups(self.anchors)
        return self._anchor_groups

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
            a, p = source_pairs(self.tags.source, self.anchors[li], self.possel[li])
            if self.pos_mask is not None:
                keep = self.pos_mask[a.to(self.pos_mask.device), p.to(self.pos_mask.device)].to(a.device)
                a, p = a[keep], p[keep]
            self._pairs[li] = (a, p)
        return self._pairs[li]

    def hardness(self, logits: Tensor) -> Tensor:
        """The cosines of a logit tile, as every pass (pace selection, forward, backward) computes them."""
        return (logits * self.temperature).detach()

    @staticmethod
    def _dense(x: Tensor, rows: Tensor, cols: Tensor | slice) -> Tensor:
        """``x[rows][:, cols]`` of a dense ``(N, N + C_b)`` input, on the device of ``rows``."""
        rr = rows.to(x.device)
        out = x[rr[:, None], cols.to(x.device)[None, :]] if isinstance(cols, Tensor) else x[rr, cols]
        return out.to(rows.device)

    def _weight_tile(
        self, li: int, logits: Tensor, neg: Tensor | None, rows: Tensor, cols: Tensor | slice
    ) -> Tensor | None:
        """``log w`` of one tile (``-inf`` outside ``neg``), or ``None`` for unit weights.

        ``cols`` index the columns of the ``(N, N + C_b)`` weight matrix.
        """
        spec = self.weights[li]
        if spec is None:
            return None
        log_weights = getattr(spec, "log_weights", None)
        if callable(log_weights):  # a frozen self-paced weighting: log w directly, in range by construction
            logw = log_weights(self.hardness(logits))
            return logw if neg is None else logw.masked_fill_(~neg, float("-inf"))
        if neg is None:
            neg = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        if isinstance(spec, Tensor):
            w = self._dense(spec, rows, cols)
        else:
            cos = self.hardness(logits)
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
        with_weights: bool = True,
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
            with_weights: compute the tiles' negative log-weights (not before a pace is chosen).
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
                    if self.neg_mask is not None:
                        q = _and(q, self._dense(self.neg_mask, rows, cols))
                    neg[li] = q
                    logw[li] = self._weight_tile(li, logits, q, rows, cols) if with_weights else None
                pos: dict[int, Tensor] = {}
                if same_label is not None:
                    for li in pos_levels:
                        sel = span.pos[li]
                        p = same_label if sel is None else same_label & sel[c0:c1][None, :]
                        if check_self:
                            p = p & (rows[:, None] != cols[None, :])  # never its own positive
                        if self.pos_mask is not None:
                            p = p & self._dense(self.pos_mask, rows, cols)
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
                    q = self.bank_negsel[li][c0:c1][None, :] & ~forbid_mask(tr, tc, levels[li])
                    if self.neg_mask is not None:
                        q = q & self._dense(self.neg_mask, rows, slice(n + c0, n + c1))
                    neg[li] = q
                    logw[li] = self._weight_tile(li, logits, q, rows, slice(n + c0, n + c1)) if with_weights else None
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
                    q = levels[li].negatives(tc) & valid & ~forbid_mask(tr, tc, levels[li])
                    cols_c = slice(self.n + c0, self.n + c1)
                    if self.neg_mask is not None:
                        q = q & self._dense(self.neg_mask, rows, cols_c)
                    neg[li] = q
                    logw[li] = self._weight_tile(li, logits, q, rows, cols_c) if with_weights else None
                yield _Tile("cand", logits, slice(c0, c1), None, neg, logw, {}, safe)
