"""Demo: pre-train a tiny encoder on synthetic fundus patches with the CoMCL loss.

Every piece of the library in one short loop: synthetic fundus images with lesion boxes,
the four views (lesion / healthy x high / low quality), the three CoMCL levels, self-paced
weighting of negatives, and a hard-negative index filled by a momentum key encoder.

    python examples/demo.py                 # run time: examples/README.md
    python examples/demo.py --steps 200 --device cuda

It prints the loss per level as training goes, and at the end how far apart lesion and
healthy patches are, at high and at low quality, before and after training.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS and torch ship separate OpenMP pools (see index.py)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mlcl_losses import (  # noqa: E402
    Kind,
    MultiLevelContrastiveLoss,
    PaceSchedule,
    Quality,
    SelfPacedWeighting,
    comcl_levels,
)
from mlcl_losses.degrade import FundusDegradation  # noqa: E402
from mlcl_losses.index import HardNegativeIndex  # noqa: E402
from mlcl_losses.synthetic import SyntheticFundus  # noqa: E402
from mlcl_losses.views import FourViewDataset, FourViewRecord, FourViewSampler, collate_four_views  # noqa: E402


class TinyEncoder(nn.Module):
    """Four conv blocks and a projection head: (B, 3, P, P) -> (B, dim)."""

    def __init__(self, dim: int = 64, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MIN_PATCH = 16  # TinyEncoder halves the patch four times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: every bad value is a one-line error naming the option (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--images", type=int, default=96, help="synthetic fundus images")
    parser.add_argument("--batch-images", type=int, default=8, help="images per batch (each gives several views)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--patch", type=int, default=32, help="patch side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    for name in ("steps", "images", "batch_images", "size", "patch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_images > args.images:  # full batches only: with fewer images there would be none
        parser.error(f"--batch-images must be <= --images ({args.images}), got {args.batch_images}")
    if args.size < 32:
        parser.error(f"--size must be >= 32 (the synthetic fundus images), got {args.size}")
    if not MIN_PATCH <= args.patch <= args.size:
        parser.error(f"--patch must be in [{MIN_PATCH}, --size ({args.size})], got {args.patch}")
    problem = device_problem(args.device)
    if problem is not None:
        parser.error(f"--device must be {problem}, got {args.device!r}")
    return args


def device_problem(name: str) -> str | None:
    """What is wrong with the device ``name`` on this machine (``None``: nothing)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "a torch device (cpu, cuda, cuda:N, mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "a device of this machine (CUDA is not available here)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"a CUDA device of this machine (it has {torch.cuda.device_count()})"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "a device of this machine (MPS is not available here)"
    elif device.type not in ("cpu", "cuda", "mps"):
        return "cpu, cuda, cuda:N or mps"
    return None


@torch.no_grad()
def separation(encoder: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean cosine similarity of lesion vs healthy patches, and of each patch's two qualities."""
    encoder.eval()
    views, tags = next(iter(loader))
    z = nn.functional.normalize(encoder(views.to(device)), dim=1).cpu()
    encoder.train()
    sim = z @ z.T
    lesion, healthy = tags.kind == Kind.LESION, tags.kind == Kind.HEALTHY
    high, low = tags.quality == Quality.HIGH, tags.quality == Quality.LOW
    same_source = tags.source[:, None] == tags.source[None, :]
    return {
        "lesion-healthy": float(sim[lesion][:, healthy].mean()),
        "lesion high-low (same patch)": float(
            sim[(lesion & high)[:, None] & (lesion & low)[None, :] & same_source].mean()
        ),
        "healthy high-low (same patch)": float(
            sim[(healthy & high)[:, None] & (healthy & low)[None, :] & same_source].mean()
        ),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    print(f"Rendering {args.images} synthetic fundus images at {args.size} px ...")
    fundus = SyntheticFundus(n=args.images, size=args.size, seed=args.seed)
    records = []
    for i in range(len(fundus)):
        sample = fundus[i]
        records.append(FourViewRecord(image=sample.clean_image, boxes=sample.boxes[:4], label=sample.grade))
    dataset = FourViewDataset(
        records,
        FourViewSampler(patch_size=args.patch, n_healthy=2),
        degradation=FundusDegradation(severity=(0.5, 1.0), kinds="random"),
        base_seed=args.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_images,
        shuffle=True,
        collate_fn=collate_four_views,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    probe = DataLoader(dataset, batch_size=32, collate_fn=collate_four_views)

    encoder = TinyEncoder().to(device)
    key_encoder = copy.deepcopy(encoder).requires_grad_(False)
    index = HardNegativeIndex(dim=64, capacity=2048, device=device, backend="torch")
    # Easy negatives first: admit the least similar half of each level's negatives, then all of them.
    # (A quantile pace, since a fresh encoder maps every patch close to every other.)
    spl = SelfPacedWeighting("hard", PaceSchedule.quantile(start=0.5, end=1.0, steps=args.steps))
    criterion = MultiLevelContrastiveLoss(comcl_levels(), temperature=0.1, weighting=spl, index=index, k=32)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=1e-4)

    before = separation(encoder, probe, device)
    start = time.perf_counter()
    step, epoch = 0, 0
    on_terminal = sys.stderr.isatty()  # a redirected log gets a line every 25 steps, not every bar refresh
    bar = tqdm(total=args.steps, desc="pre-training", unit="step", disable=not on_terminal)
    while step < args.steps:
        dataset.set_epoch(epoch)
        for views, tags in loader:
            views, tags = views.to(device), tags.to(device)
            loss, stats = criterion(encoder(views), tags, keys=key_encoder(views))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            criterion.step()
            with torch.no_grad():  # momentum update of the key encoder
                for k, q in zip(key_encoder.parameters(), encoder.parameters(), strict=True):
                    k.mul_(0.99).add_(q.detach(), alpha=0.01)
            step += 1
            bar.set_postfix({"loss": f"{loss.item():.3f}"} | {n: f"{float(s.loss):.2f}" for n, s in stats.items()})
            bar.update()
            if not on_terminal and (step % 25 == 0 or step == args.steps):
                print(f"step {step}/{args.steps}: loss {loss.item():.3f}", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    bar.close()
    after = separation(encoder, probe, device)

    print(f"\n{step} steps in {time.perf_counter() - start:.0f} s; the bank holds {len(index)} keys")
    print(f"{'mean cosine similarity':34s} {'before':>8s} {'after':>8s}")
    for name in before:
        print(f"{name:34s} {before[name]:8.3f} {after[name]:8.3f}")
    print("Lesion and healthy patches should move apart; the two qualities of one patch should move together.")


if __name__ == "__main__":
    main()
