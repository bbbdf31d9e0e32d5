r"""Triton path of the fused loss on CUDA: all levels' in-batch negatives in one tiled pass.

The expensive part of :func:`~mlcl_losses.functional.multilevel_info_nce` is, for every level
:math:`l` and anchor :math:`i`, the log-sum-exp over the anchor's negatives

.. math:: L_{li} = \log \sum_{j \in N_l(i)} e^{s_{ij}}, \qquad s_{ij} = z_i^\top z_j / \tau,

an ``N x N`` computation. Three Triton kernels do it without materialising anything ``N x N``:

* **forward**: one program per block of anchor rows streams over column blocks; each
  ``(BLOCK, BLOCK)`` logit tile is one ``tl.dot`` shared by all levels; each level's
  negative mask is built in registers from the tags (anchor and negative selectors, never
  itself, never the same source / image / label) and folded into a per-level online
  log-sum-exp. It also counts each anchor's negatives and sums their cosines (statistics).
* **backward**, with upstream :math:`g_{li} = \partial \text{loss} / \partial L_{li}`: the tile
  gradient :math:`G_{ij} = \sum_l g_{li}\, [j \in N_l(i)]\, e^{s_{ij} - L_{li}}` is recomputed
  (FlashAttention style) and multiplied into :math:`\partial z_i = \sum_j G_{ij} z_j / \tau` by a
  row-parallel kernel and into :math:`\partial z_j = \sum_i G_{ij} z_i / \tau` by a
  column-parallel kernel (no atomics).

The positives of ``relation="source"`` levels are a few per anchor: they are enumerated from the
tags (:func:`~mlcl_losses._core.source_pairs`) and scored in torch, and the loss is assembled
from them and :math:`L` with autograd (``denominator="pos_neg"``: :math:`l_i = \frac{1}{|P(i)|}
\sum_p \operatorname{softplus}(L_i - s_{ip})`; ``"all"``: :math:`\log(e^{L_i} + \sum_p e^{s_{ip}})
- \frac{1}{|P(i)|} \sum_p s_{ip}`), exactly as the reference does.

Supported (:func:`supports`): CUDA float32 / float16 / bfloat16 embeddings (normalised and
computed in float32; products in IEEE float32, not TF32), ``relation="source"`` levels, no
bank, no mined candidates, no negative weights, no ``tau_plus``/``beta``, no ``pair_mask``.
Everything else takes the torch tiles. The kernels return per-anchor losses; anchor weights,
level weights and the reduction are done by the caller, as for every path. With
``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors in
Triton's interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mlcl_losses._core import PathResult, source_pairs
from mlcl_losses.levels import Level
from mlcl_losses.tags import ViewTags

__all__ = ["available", "multilevel_info_nce_triton", "neg_lse", "supports"]

#: Rows and columns per tile. 32 x 32 tiles with 4 warps and 2 pipeline stages compile for sm_90
#: without register spills at D <= 128 (64 x 64 spilled heavily: IEEE float32 ``tl.dot`` runs on
#: CUDA cores, not tensor cores); measured with Triton 3.8's compiler, not yet timed on a GPU.
BLOCK: int = 32
NUM_WARPS: int = 4
NUM_STAGES: int = 2
#: Largest embedding dimension: whole ``(BLOCK, D)`` rows are staged in shared memory.
MAX_DIM: int = 256
#: Level parameters per level: anchor kind, anchor quality, negative kind, negative quality
#: (-1 = any), exclude same label (0/1), in-batch negatives (0/1).
_PARAMS = 6

_kernels: Any = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA with Triton, or Triton's CPU interpreter)."""
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(
    z: Tensor,
    tags: ViewTags,
    levels: Sequence[Level],
    bank_z: Tensor | None,
    candidates: Sequence[Tensor | None],
    weights: Sequence[Any],
    tau_plus: float = 0.0,
    beta: float = 0.0,
    pair_mask: Any = None,
) -> bool:
    """Whether :func:`multilevel_info_nce_triton` computes these inputs (else the torch tiles do)."""
    return (
        tau_plus == 0
        and beta == 0
        and pair_mask is None
        and available(z.device)
        and z.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and z.dim() == 2
        and z.shape[1] <= MAX_DIM
        and bank_z is None
        and all(c is None for c in candidates)
        and all(w is None for w in weights)
        and all(level.relation == "source" for level in levels)
        and 0 < len(levels) <= 8
        and z.shape[0] > 0
    )


def _load_kernels() -> Any:
    """Compile-on-first-use: the kernels module imports Triton."""
    global _kernels
    if _kernels is None:
        from mlcl_losses import _triton_kernels

        _kernels = _triton_kernels
    return _kernels


def _level_params(levels: Sequence[Level], has_label: bool, device: torch.device) -> Tensor:
    rows = []
    for level in levels:
        rows.append(
            [
                -1 if level.anchors.kind is None else int(level.anchors.kind),
                -1 if level.anchors.quality is None else int(level.anchors.quality),
                -1 if level.negatives.kind is None else int(level.negatives.kind),
                -1 if level.negatives.quality is None else int(level.negatives.quality),
                int(level.needs_label and has_label),
                int(level.in_batch_negatives),
            ]
        )
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _on_device(device: torch.device) -> Any:
    """Triton launches on the current CUDA device: make it the tensors' (a no-op context on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


class _NegLSE(torch.autograd.Function):
    """``(z (N, D), tags, levels) -> L (n_levels, N)``: per-level log-sum-exp over in-batch negatives."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, tags: ViewTags, params: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        k = _load_kernels()
        zc = z.float().contiguous()  # the kernels read float32 rows (fp16 / bf16 are upcast)
        n, d = zc.shape
        n_levels = params.shape[0]
        lse = torch.empty(n_levels, n, dtype=torch.float32, device=z.device)
        count = torch.empty_like(lse)
        cos_sum = torch.empty_like(lse)
        # the kernels index tags with unit stride: views such as tags[::2] must be copied
        kind, quality, source = tags.kind.contiguous(), tags.quality.contiguous(), tags.source.contiguous()
        image = source if tags.image is None else tags.image.contiguous()
        label = source if tags.label is None else tags.label.contiguous()
        with _on_device(z.device):
            k.neg_lse_fwd[(math.ceil(n / BLOCK),)](
                zc,
                kind,
                quality,
                source,
                image,
                label,
                params,
                lse,
                count,
                cos_sum,
                n,
                d,
                float(scale),
                zc.stride(0),
                NUM_LEVELS=n_levels,
                HAS_IMG=tags.image is not None,
                HAS_LAB=tags.label is not None,
                BLOCK=BLOCK,
                BLOCK_D=_block_d(d),
                num_warps=NUM_WARPS,
                num_stages=NUM_STAGES,
            )
        ctx.save_for_backward(zc, lse, params, kind, quality, source, image, label)
        ctx.flags = (tags.image is not None, tags.label is not None, float(scale), z.dtype)
        ctx.mark_non_differentiable(count, cos_sum)
        return lse, count, cos_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_lse: Tensor, *_unused: Any) -> tuple[Tensor | None, None, None, None]:
        k = _load_kernels()
        zc, lse, params, kind, quality, source, image, label = ctx.saved_tensors
        has_img, has_lab, scale, dtype = ctx.flags
        n, d = zc.shape
        finite = torch.isfinite(lse)  # anchors with no negative: no gradient, and no inf * 0
        g = torch.where(finite, grad_lse.float(), torch.zeros_like(lse)).contiguous()
        lse_safe = torch.where(finite, lse, torch.zeros_like(lse)).contiguous()
        dz_rows = torch.empty(n, d, dtype=torch.float32, device=zc.device)
        dz_cols = torch.empty_like(dz_rows)
        common = dict(
            NUM_LEVELS=params.shape[0],
            HAS_IMG=has_img,
            HAS_LAB=has_lab,
            BLOCK=BLOCK,
            BLOCK_D=_block_d(d),
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        )
        args = (zc, kind, quality, source, image, label, params, lse_safe, g)
        grid = (math.ceil(n / BLOCK),)
        with _on_device(zc.device):
            k.neg_lse_bwd[grid](*args, dz_rows, n, d, scale, zc.stride(0), BY_COLS=False, **common)
            k.neg_lse_bwd[grid](*args, dz_cols, n, d, scale, zc.stride(0), BY_COLS=True, **common)
        return (dz_rows + dz_cols).to(dtype), None, None, None


def neg_lse(z: Tensor, tags: ViewTags, levels: Sequence[Level], temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-level log-sum-exp of ``z_i . z_j / temperature`` over each anchor's in-batch negatives.

    Args:
        z: ``(N, D)`` L2-normalised embeddings (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        tags: ``(N,)`` tags on the same device.
        levels: the levels (their anchor and negative selectors and never-negative rules).
        temperature: :math:`\tau`.

    Returns:
        ``lse (L, N)`` float32 (``-inf`` where an anchor has no negative; differentiable in ``z``),
        ``count (L, N)`` negatives per anchor and ``cos_sum (L, N)`` their summed cosines.
    """
    params = _level_params(levels, tags.label is not None, z.device)
    out: tuple[Tensor, Tensor, Tensor] = _NegLSE.apply(z, tags, params, 1.0 / temperature)
    return out


def multilevel_info_nce_triton(
    z: Tensor, tags: ViewTags, levels: list[Level], temperature: float, denominator: str
) -> PathResult:
    """The per-anchor losses of :func:`~mlcl_losses.functional.multilevel_info_nce` via :func:`neg_lse`.

    Called after validation, for inputs :func:`supports` accepts; ``z`` is L2-normalised.
    Returns a :class:`~mlcl_losses._core.PathResult` (``path="fused-triton"``).
    """
    zf = z.float()
    n = zf.shape[0]
    lse, count, cos_sum = neg_lse(zf, tags, levels, temperature)
    per_anchor_rows, valid_rows, anchor_rows, pos_sims, neg_sims = [], [], [], [], []
    for li, level in enumerate(levels):
        anchors = level.anchors(tags)
        a, p = source_pairs(tags.source, anchors, level.positives(tags))
        cos_ap = (zf[a] * zf[p]).sum(dim=1)
        s_ap = cos_ap / temperature
        n_pos = torch.zeros(n, dtype=zf.dtype, device=zf.device).index_add_(0, a, torch.ones_like(s_ap))
        valid = anchors & (n_pos > 0) & (count[li] > 0)
        lse_l = lse[li]
        if denominator == "pos_neg":
            per_pair = torch.logaddexp(s_ap, lse_l[a]) - s_ap
            per_anchor = torch.zeros_like(n_pos).index_add_(0, a, per_pair) / n_pos.clamp_min(1)
        else:
            shift = torch.full_like(n_pos, -math.inf).scatter_reduce(0, a, s_ap.detach(), "amax")
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            pos_sum = torch.zeros_like(n_pos).index_add_(0, a, torch.exp(s_ap - shift[a]))
            pos_lse = torch.where(n_pos > 0, torch.log(pos_sum.clamp_min(1e-38)) + shift, -math.inf)
            mean_pos = torch.zeros_like(n_pos).index_add_(0, a, s_ap) / n_pos.clamp_min(1)
            per_anchor = torch.logaddexp(pos_lse, lse_l) - mean_pos
        per_anchor_rows.append(torch.where(valid, per_anchor, torch.zeros_like(per_anchor)))
        valid_rows.append(valid)
        anchor_rows.append(anchors)
        with torch.no_grad():
            vpair = valid[a]
            n_neg = count[li][valid].sum()
            zero = zf.new_zeros(())
            pos_sims.append(cos_ap[vpair].sum() / vpair.sum() if bool(vpair.any()) else zero)
            neg_sims.append(cos_sum[li][valid].sum() / n_neg if bool(n_neg > 0) else zero)
    return PathResult(
        torch.stack(per_anchor_rows),
        torch.stack(valid_rows),
        torch.stack(anchor_rows),
        torch.stack(pos_sims),
        torch.stack(neg_sims),
        "fused-triton",
    )
