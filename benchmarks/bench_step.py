"""Share of one pre-training step spent in the multi-level loss.

One step: encoder (ResNet-50; ``--quick``: ResNet-18) + projection head on a batch of
four-view patches, the loss, backward, SGD update. Timed with the loss (fused,
:func:`comcl_levels`) and with a trivial stand-in loss (``mean(z**2)``); the loss's own
forward+backward on the same embeddings is timed too. bf16 autocast on CUDA.

Usage::

    python benchmarks/bench_step.py            # ResNet-50, 256 patches at 128 px
    python benchmarks/bench_step.py --quick    # ResNet-18, 60 patches at 64 px (CPU, ~2 min)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_loss import comcl_tags, machine
from mlcl_losses import comcl_levels
from mlcl_losses.functional import multilevel_info_nce

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 60 patches at 64 px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchvision.models import resnet18, resnet50

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n, px = (60, 64) if args.quick else (256, 128)
    encoder = (resnet18 if args.quick else resnet50)(num_classes=128).to(device)
    model = nn.Sequential(encoder, nn.ReLU(), nn.Linear(128, 128)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tags = comcl_tags(n, device)
    levels = comcl_levels()
    x = torch.randn(n, 3, px, px, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(with_loss: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            z = model(x)
            loss = multilevel_info_nce(z, tags, levels, 0.1)[0] if with_loss else z.float().pow(2).mean()
        loss.backward()
        opt.step()
        sync()

    def loss_only() -> None:
        z = torch.randn(n, 128, device=device, requires_grad=True)
        multilevel_info_nce(z, tags, levels, 0.1)[0].backward()
        sync()

    def timed(fn: Any, *a: Any) -> float:
        fn(*a)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(*a)
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[len(times) // 2]

    with_loss = timed(step, True)
    without = timed(step, False)
    loss_ms = timed(loss_only)
    res = {
        "machine": machine(args.device),
        "encoder": "resnet18" if args.quick else "resnet50",
        "patches": n,
        "pixels": px,
        "autocast_bf16": cuda,
        "step_with_loss_ms": with_loss,
        "step_without_loss_ms": without,
        "loss_fwd_bwd_ms": loss_ms,
        "loss_share_of_step": loss_ms / with_loss,
    }
    print(
        f"{res['encoder']}, {n} patches at {px} px on {args.device}: step {with_loss:.1f} ms with the loss, "
        f"{without:.1f} ms without; loss forward+backward {loss_ms:.1f} ms "
        f"= {100 * loss_ms / with_loss:.2f}% of the step"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"loss_step_{'cuda' if cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
