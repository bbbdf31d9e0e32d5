"""Cases of tests/test_triton.py, run in a subprocess with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter).

``python tests/triton_cases.py OUT.pt`` computes, for every case, the Triton path (kernels run in
the interpreter on CPU tensors, float32) and the reference path (float64) and saves both.
The interpreter must be chosen before Triton is imported, hence the separate process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from mlcl_losses import Level, Select, ViewTags, comcl_levels
from mlcl_losses.functional import multilevel_info_nce, normalize_embeddings
from mlcl_losses.levels import level_masks

# (name, n, d, levels, denominator, with image tags, with label tags, sources)
LEVELS: dict[str, list[Level]] = {
    "comcl": comcl_levels(),
    "instance": [Level.instance()],
    "exclude_label": [Level("x", exclude_same_label=True), Level("y", Select(kind=1), negatives=Select(quality=0))],
    "no_in_batch": [Level.instance(), Level("off", in_batch_negatives=False)],
    "quality_only": [Level("q", Select(quality=1), Select(quality=0), negatives=Select(kind=0), weight=0.5)],
}
CASES: list[tuple[str, int, int, str, str, bool, bool, int]] = [
    ("comcl_pos_neg", 150, 32, "comcl", "pos_neg", True, True, 40),
    ("comcl_all", 150, 64, "comcl", "all", True, False, 40),
    ("comcl_n_not_tile_multiple", 65, 128, "comcl", "pos_neg", False, False, 20),
    ("comcl_d256", 70, 256, "comcl", "pos_neg", True, False, 25),
    ("instance_two_views", 128, 32, "instance", "pos_neg", False, False, 64),
    ("instance_all", 97, 32, "instance", "all", True, True, 30),
    ("exclude_label", 120, 64, "exclude_label", "pos_neg", True, True, 50),
    ("exclude_label_all", 120, 64, "exclude_label", "all", False, True, 50),
    ("no_in_batch_level", 80, 32, "no_in_batch", "pos_neg", False, False, 30),
    ("weighted_single_level", 90, 32, "quality_only", "pos_neg", True, False, 30),
    ("tiny_batch", 3, 32, "instance", "pos_neg", False, False, 2),
    ("one_embedding", 1, 32, "instance", "pos_neg", False, False, 1),
    ("no_negatives", 6, 32, "instance", "pos_neg", False, False, 1),
]


def make(n: int, d: int, with_image: bool, with_label: bool, sources: int, seed: int) -> tuple[torch.Tensor, ViewTags]:
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, sources, (n,), generator=g)
    tags = ViewTags(
        kind=torch.randint(0, 2, (n,), generator=g),
        quality=torch.randint(0, 2, (n,), generator=g),
        source=source,
        label=torch.randint(0, 3, (n,), generator=g) if with_label else None,
        image=source // 3 if with_image else None,
    )
    return torch.randn(n, d, generator=g, dtype=torch.float64), tags


def stats_tuple(stats: dict[str, Any]) -> dict[str, list[Any]]:
    return {
        k: [float(v.loss), int(v.anchors), int(v.skipped), float(v.pos_sim), float(v.neg_sim), v.valid]
        for k, v in stats.items()
    }


def run_case(case: tuple[str, int, int, str, str, bool, bool, int], seed: int) -> dict[str, Any]:
    from mlcl_losses import _triton

    name, n, d, level_key, denominator, with_image, with_label, sources = case
    levels = LEVELS[level_key]
    x, tags = make(n, d, with_image, with_label, sources, seed)
    x64 = x.clone().requires_grad_()
    ref, ref_stats = multilevel_info_nce(x64, tags, levels, temperature=0.2, denominator=denominator, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, x64, allow_unused=False)
    x32 = x.float().requires_grad_()
    assert _triton.supports(normalize_embeddings(x32), tags, levels, None, [None] * len(levels), [None] * len(levels))
    out, out_stats = multilevel_info_nce(
        x32, tags, levels, temperature=0.2, denominator=denominator, impl="fused", backend="triton"
    )
    assert all(v.path == "fused-triton" for v in out_stats.values())
    (grad,) = torch.autograd.grad(out, x32)
    # the kernel's statistics against dense masks of the reference
    z = normalize_embeddings(x32.detach())
    lse, count, cos_sum = _triton.neg_lse(z, tags, levels, 0.2)
    cos = z.double() @ z.double().T
    dense = []
    for lm in level_masks(tags, levels):
        dense.append(
            (
                torch.where(lm.negatives, cos / 0.2, -torch.inf).logsumexp(dim=1),
                lm.negatives.sum(dim=1).double(),
                torch.where(lm.negatives, cos, 0.0).sum(dim=1),
            )
        )
    return {
        "name": name,
        "ref": float(ref),
        "out": float(out),
        "ref_grad": ref_grad,
        "grad": grad.double(),
        "ref_stats": stats_tuple(ref_stats),
        "out_stats": stats_tuple(out_stats),
        "lse": lse.double(),
        "count": count.double(),
        "cos_sum": cos_sum.double(),
        "dense": dense,
    }


def extra_checks() -> dict[str, Any]:
    """Strided tag views and half-precision input of :func:`mlcl_losses._triton.neg_lse`."""
    from mlcl_losses import _triton

    x, tags = make(160, 32, True, True, 50, seed=99)
    z = normalize_embeddings(x.float())
    levels = comcl_levels()
    strided = tags[::2]  # a view: stride 2 in every field
    lse_view, count_view, _ = _triton.neg_lse(z[::2], strided, levels, 0.2)
    copied = ViewTags(
        strided.kind.clone(),
        strided.quality.clone(),
        strided.source.clone(),
        strided.label.clone(),
        strided.image.clone(),
    )
    lse_copy, count_copy, _ = _triton.neg_lse(z[::2].contiguous(), copied, levels, 0.2)
    zh = z.half().requires_grad_()
    lse_h, _, _ = _triton.neg_lse(zh, tags, levels, 0.2)
    torch.where(torch.isfinite(lse_h), lse_h, 0.0).sum().backward()
    z32 = z.half().float().requires_grad_()
    lse_f, _, _ = _triton.neg_lse(z32, tags, levels, 0.2)
    torch.where(torch.isfinite(lse_f), lse_f, 0.0).sum().backward()
    return {
        "strided": (lse_view, count_view, lse_copy, count_copy),
        "half": (zh.grad.dtype, zh.grad.float(), z32.grad),
    }


def main(out_path: str) -> None:
    results = [run_case(case, seed) for seed, case in enumerate(CASES)]
    torch.save({"cases": results, "extra": extra_checks()}, out_path)


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton (mlcl_losses imports it lazily)
    main(sys.argv[1])
