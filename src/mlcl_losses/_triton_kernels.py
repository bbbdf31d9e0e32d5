"""Triton kernels of :mod:`mlcl_losses._triton` (imported on first use; needs Triton).

Shapes: ``Z (N, D)`` float32 row-major with row stride ``stride_z``; tag vectors ``(N,)``
int64, contiguous; level parameters ``(NUM_LEVELS, 6)`` int32 (see ``_triton._PARAMS``); per-level
row statistics ``(NUM_LEVELS, N)`` float32. ``BLOCK`` rows and columns per tile; ``BLOCK_D`` a
power of two >= D. Row offsets are computed in int64 (``rows * stride_z`` overflows int32 once
``N * D >= 2**31``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ruff: noqa: N803, N806  (Triton's conventions: pointer and constexpr arguments in capitals)


@triton.jit
def _row_tags(KIND, QUAL, SRC, IMG, LAB, idx, valid):
    kind = tl.load(KIND + idx, mask=valid, other=-1)
    qual = tl.load(QUAL + idx, mask=valid, other=-1)
    src = tl.load(SRC + idx, mask=valid, other=-1)
    img = tl.load(IMG + idx, mask=valid, other=-1)
    lab = tl.load(LAB + idx, mask=valid, other=-1)
    return kind, qual, src, img, lab


@triton.jit
def _base_mask(rows, cols, rmask, cmask, rsrc, csrc, rimg, cimg, HAS_IMG: tl.constexpr):
    """Pairs that may be negatives at all: in range, not itself, not the same source (image)."""
    base = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :]) & (rsrc[:, None] != csrc[None, :])
    if HAS_IMG:
        base = base & (rimg[:, None] != cimg[None, :])
    return base


@triton.jit
def _level_mask(LVL, lvl, base, rkind, rqual, rlab, ckind, cqual, clab, HAS_LAB: tl.constexpr):
    """Negative mask of level ``lvl`` on a tile: anchor rows x admitted columns, minus never-negatives."""
    a_kind = tl.load(LVL + lvl * 6 + 0)
    a_qual = tl.load(LVL + lvl * 6 + 1)
    n_kind = tl.load(LVL + lvl * 6 + 2)
    n_qual = tl.load(LVL + lvl * 6 + 3)
    excl_label = tl.load(LVL + lvl * 6 + 4)
    in_batch = tl.load(LVL + lvl * 6 + 5)
    anchor = ((a_kind < 0) | (rkind == a_kind)) & ((a_qual < 0) | (rqual == a_qual)) & (in_batch != 0)
    admitted = ((n_kind < 0) | (ckind == n_kind)) & ((n_qual < 0) | (cqual == n_qual))
    mask = base & anchor[:, None] & admitted[None, :]
    if HAS_LAB:
        mask = mask & ((excl_label == 0) | (rlab[:, None] != clab[None, :]))
    return mask


@triton.jit
def neg_lse_fwd(
    Z,
    KIND,
    QUAL,
    SRC,
    IMG,
    LAB,
    LVL,
    LSE,
    CNT,
    CSUM,
    N,
    D,
    scale,
    stride_z,
    NUM_LEVELS: tl.constexpr,
    HAS_IMG: tl.constexpr,
    HAS_LAB: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per-level online log-sum-exp over each anchor row's negatives; negative counts and cosine sums."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    dims = tl.arange(0, BLOCK_D)
    zr = tl.load(
        Z + rows[:, None].to(tl.int64) * stride_z + dims[None, :], mask=rmask[:, None] & (dims[None, :] < D), other=0.0
    )
    rkind, rqual, rsrc, rimg, rlab = _row_tags(KIND, QUAL, SRC, IMG, LAB, rows, rmask)
    lv = tl.arange(0, 8)  # level axis of the running state (NUM_LEVELS <= 8)
    m_run = tl.full((BLOCK, 8), float("-inf"), tl.float32)
    s_run = tl.zeros((BLOCK, 8), tl.float32)
    c_run = tl.zeros((BLOCK, 8), tl.float32)
    cs_run = tl.zeros((BLOCK, 8), tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < N
        zc = tl.load(
            Z + cols[:, None].to(tl.int64) * stride_z + dims[None, :],
            mask=cmask[:, None] & (dims[None, :] < D),
            other=0.0,
        )
        cos = tl.dot(zr, tl.trans(zc), input_precision="ieee")
        s = cos * scale
        ckind, cqual, csrc, cimg, clab = _row_tags(KIND, QUAL, SRC, IMG, LAB, cols, cmask)
        base = _base_mask(rows, cols, rmask, cmask, rsrc, csrc, rimg, cimg, HAS_IMG)
        for lvl in tl.static_range(NUM_LEVELS):
            mask = _level_mask(LVL, lvl, base, rkind, rqual, rlab, ckind, cqual, clab, HAS_LAB)
            sel = lv[None, :] == lvl
            sm = tl.where(mask, s, float("-inf"))
            m_old = tl.max(tl.where(sel, m_run, float("-inf")), axis=1)
            m_new = tl.maximum(m_old, tl.max(sm, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_old = tl.sum(tl.where(sel, s_run, 0.0), axis=1)
            s_new = s_old * tl.exp(m_old - m_safe) + tl.sum(tl.exp(sm - m_safe[:, None]), axis=1)
            m_run = tl.where(sel, m_new[:, None], m_run)
            s_run = tl.where(sel, s_new[:, None], s_run)
            c_run += tl.where(sel, tl.sum(mask.to(tl.float32), axis=1)[:, None], 0.0)
            cs_run += tl.where(sel, tl.sum(tl.where(mask, cos, 0.0), axis=1)[:, None], 0.0)
    lse = tl.where(s_run > 0, m_run + tl.log(tl.where(s_run > 0, s_run, 1.0)), float("-inf"))
    out = lv[None, :] * N + rows[:, None]
    keep = rmask[:, None] & (lv[None, :] < NUM_LEVELS)
    tl.store(LSE + out, lse, mask=keep)
    tl.store(CNT + out, c_run, mask=keep)
    tl.store(CSUM + out, cs_run, mask=keep)


@triton.jit
def _grad_tile(
    cos,
    rows,
    cols,
    rmask,
    cmask,
    rkind,
    rqual,
    rsrc,
    rimg,
    rlab,
    ckind,
    cqual,
    csrc,
    cimg,
    clab,
    LVL,
    LSE,
    G,
    N,
    scale,
    NUM_LEVELS: tl.constexpr,
    HAS_IMG: tl.constexpr,
    HAS_LAB: tl.constexpr,
):
    """``dloss / ds_ij = sum_l g_li [j in N_l(i)] exp(s_ij - L_li)`` on a tile (rows = anchors)."""
    s = cos * scale
    base = _base_mask(rows, cols, rmask, cmask, rsrc, csrc, rimg, cimg, HAS_IMG)
    grad = tl.zeros(cos.shape, tl.float32)
    for lvl in tl.static_range(NUM_LEVELS):
        mask = _level_mask(LVL, lvl, base, rkind, rqual, rlab, ckind, cqual, clab, HAS_LAB)
        lse = tl.load(LSE + lvl * N + rows, mask=rmask, other=0.0)
        g = tl.load(G + lvl * N + rows, mask=rmask, other=0.0)
        grad += tl.where(mask, tl.exp(s - lse[:, None]) * g[:, None], 0.0)
    return grad


@triton.jit
def neg_lse_bwd(
    Z,
    KIND,
    QUAL,
    SRC,
    IMG,
    LAB,
    LVL,
    LSE,
    G,
    DZ,
    N,
    D,
    scale,
    stride_z,
    NUM_LEVELS: tl.constexpr,
    HAS_IMG: tl.constexpr,
    HAS_LAB: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BY_COLS: tl.constexpr,
):
    """The gradient's two halves, each block of embeddings owned by one program (no atomics).

    ``BY_COLS=False``: ``dz_i = scale * sum_j G_ij z_j`` for a block of anchor rows ``i``;
    ``BY_COLS=True``: ``dz_j = scale * sum_i G_ij z_i`` for a block of columns ``j``.
    """
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims[None, :] < D
    own = pid * BLOCK + tl.arange(0, BLOCK)
    omask = own < N
    zo = tl.load(Z + own[:, None].to(tl.int64) * stride_z + dims[None, :], mask=omask[:, None] & dmask, other=0.0)
    okind, oqual, osrc, oimg, olab = _row_tags(KIND, QUAL, SRC, IMG, LAB, own, omask)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK):
        other = start + tl.arange(0, BLOCK)
        xmask = other < N
        zx = tl.load(Z + other[:, None].to(tl.int64) * stride_z + dims[None, :], mask=xmask[:, None] & dmask, other=0.0)
        xkind, xqual, xsrc, ximg, xlab = _row_tags(KIND, QUAL, SRC, IMG, LAB, other, xmask)
        if BY_COLS:  # the other block holds the anchors
            cos = tl.dot(zx, tl.trans(zo), input_precision="ieee")
            grad = _grad_tile(
                cos, other, own, xmask, omask, xkind, xqual, xsrc, ximg, xlab, okind, oqual, osrc, oimg, olab,
                LVL, LSE, G, N, scale, NUM_LEVELS, HAS_IMG, HAS_LAB,
            )  # fmt: skip
            acc += tl.dot(tl.trans(grad), zx, input_precision="ieee")
        else:
            cos = tl.dot(zo, tl.trans(zx), input_precision="ieee")
            grad = _grad_tile(
                cos, own, other, omask, xmask, okind, oqual, osrc, oimg, olab, xkind, xqual, xsrc, ximg, xlab,
                LVL, LSE, G, N, scale, NUM_LEVELS, HAS_IMG, HAS_LAB,
            )  # fmt: skip
            acc += tl.dot(grad, zx, input_precision="ieee")
    tl.store(DZ + own[:, None].to(tl.int64) * D + dims[None, :], acc * scale, mask=omask[:, None] & dmask)
