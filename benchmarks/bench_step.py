"""Share of one pre-training step spent in the method: the loss, the index search and the weighting.

One step: encoder (ResNet-50; ``--quick``: ResNet-18) + projection head on a batch of
four-view patches, the loss, backward, SGD update. Timed with

- the method as the example pipelines configure it (:class:`MultiLevelContrastiveLoss` with
  :func:`comcl_levels`, a quantile self-paced weighting of negatives, a full
  :class:`HardNegativeIndex` searched for ``k`` bank negatives per anchor and level, the keys
  enqueued after the loss),
- the loss alone (fused, no index, no weighting),
- a trivial stand-in loss (``mean(z**2)``);

and the method's and the loss's own forward+backward on the same embeddings are timed too.
bf16 autocast on CUDA. The goal is the method's share of the step.

Usage::

    python benchmarks/bench_step.py            # ResNet-50, 256 patches at 128 px, bank 16384, k 64
    python benchmarks/bench_step.py --quick    # ResNet-18, 60 patches at 64 px (CPU, ~2 min)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench_loss import comcl_tags, machine
from mlcl_losses import (
    HardNegativeIndex,
    MultiLevelContrastiveLoss,
    PaceSchedule,
    SelfPacedWeighting,
    ViewTags,
    comcl_levels,
)
from mlcl_losses.functional import multilevel_info_nce

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 128
TEMPERATURE = 0.07  # the example pipelines' default


def method_criterion(device: torch.device, bank: int, k: int) -> MultiLevelContrastiveLoss:
    """The pipelines' configuration: CoMCL levels, quantile hard self-paced weighting, a full index."""
    weighting = SelfPacedWeighting("hard", PaceSchedule.quantile(start=0.8, end=1.0, steps=1000), target="negatives")
    index = HardNegativeIndex(dim=DIM, capacity=bank, device=device, backend="auto")
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(bank, DIM, generator=gen)
    key_tags = ViewTags(
        kind=torch.randint(0, 2, (bank,), generator=gen),
        quality=torch.randint(0, 2, (bank,), generator=gen),
        source=torch.randint(1 << 20, 1 << 21, (bank,), generator=gen),  # never a batch source
    )
    index.add(keys.to(device), key_tags.to(device))
    return MultiLevelContrastiveLoss(comcl_levels(), temperature=TEMPERATURE, weighting=weighting, index=index, k=k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 60 patches at 64 px")
    parser.add_argument("--encoder", choices=["resnet18", "resnet50"], default=None, help="overrides --quick")
    parser.add_argument("--patches", type=int, default=None, help="patches per step (overrides --quick)")
    parser.add_argument("--pixels", type=int, default=None, help="patch side in pixels (overrides --quick)")
    parser.add_argument("--bank", type=int, default=16384, help="index capacity (filled before timing)")
    parser.add_argument("--k", type=int, default=64, help="bank negatives per anchor and level")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/loss_step_<device>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchvision.models import resnet18, resnet50

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    encoder_name = args.encoder or ("resnet18" if args.quick else "resnet50")
    n = args.patches or (60 if args.quick else 256)
    px = args.pixels or (64 if args.quick else 128)
    encoder = {"resnet18": resnet18, "resnet50": resnet50}[encoder_name](num_classes=DIM).to(device)
    model = nn.Sequential(encoder, nn.ReLU(), nn.Linear(DIM, DIM)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tags = comcl_tags(n, device)
    levels = comcl_levels()
    criterion = method_criterion(device, args.bank, args.k)
    x = torch.randn(n, 3, px, px, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def objective(z: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "method":
            return criterion(z, tags, keys=z.detach())[0]
        if kind == "loss":
            return multilevel_info_nce(z, tags, levels, TEMPERATURE)[0]
        return z.float().pow(2).mean()

    def step(kind: str) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            z = model(x)
            loss = objective(z, kind)
        loss.backward()
        opt.step()
        sync()

    def alone(kind: str) -> None:
        z = torch.randn(n, DIM, device=device, requires_grad=True)
        objective(z, kind).backward()
        sync()

    def timed(fn: Callable[[str], None], kind: str) -> float:
        fn(kind)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(kind)
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[len(times) // 2]

    step_ms = {kind: timed(step, kind) for kind in ("method", "loss", "none")}
    alone_ms = {kind: timed(alone, kind) for kind in ("method", "loss")}
    res = {
        "machine": machine(args.device),
        "encoder": encoder_name,
        "patches": n,
        "pixels": px,
        "bank": args.bank,
        "k": args.k,
        "index_backend": criterion.index.backend_name if criterion.index is not None else None,
        "autocast_bf16": cuda,
        "repeats": args.repeats,
        "step_with_method_ms": step_ms["method"],
        "step_with_loss_ms": step_ms["loss"],
        "step_without_loss_ms": step_ms["none"],
        "method_fwd_bwd_ms": alone_ms["method"],
        "loss_fwd_bwd_ms": alone_ms["loss"],
        "method_share_of_step": alone_ms["method"] / step_ms["method"],
        "loss_share_of_step": alone_ms["loss"] / step_ms["loss"],
    }
    print(
        f"{encoder_name}, {n} patches at {px} px on {args.device}: step {step_ms['method']:.1f} ms with the method "
        f"(bank {args.bank}, k {args.k}), {step_ms['loss']:.1f} ms with the loss alone, {step_ms['none']:.1f} ms "
        f"without; method forward+backward {alone_ms['method']:.1f} ms = "
        f"{100 * res['method_share_of_step']:.2f}% of the step; loss alone {alone_ms['loss']:.1f} ms = "
        f"{100 * res['loss_share_of_step']:.2f}%"
    )
    out = args.out
    if out is None:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"loss_step_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
