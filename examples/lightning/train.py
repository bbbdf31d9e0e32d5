"""CoMCL pre-training with Lightning on synthetic four-view fundus data.

    python examples/lightning/train.py                                  # a short CPU run
    python examples/lightning/train.py --steps 400 --out runs/lightning
    python examples/lightning/train.py --steps 400 --out runs/lightning --resume   # continue it
    python examples/lightning/train.py --accelerator cpu --devices 2 --strategy ddp  # 2 processes (gloo)
    python examples/lightning/train.py --accelerator gpu --devices 4 --strategy ddp --arch timm:convnext_tiny

Writes ``OUT/checkpoints/last.ckpt`` (at the end of every epoch, with the epoch's own file;
resumable, loadable with ``weights_only=True``) and ``OUT/lightning_logs/version_*/metrics.csv``
(the loss per level, the pace).
``--steps`` is the planned length of training: the pace and the learning rate follow it, and a
resumed run continues them. See examples/lightning/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS and torch ship separate OpenMP pools

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import lightning as L  # noqa: E402
from examples.common.models import TIMM_PREFIX  # noqa: E402
from examples.lightning.data import SyntheticFourViewData  # noqa: E402
from examples.lightning.module import CoMCLModule, ResumeError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lightning", help="output directory (checkpoints, logs)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps (the planned length of training)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    parser.add_argument("--arch", default="resnet18", help="resnet18|resnet34|resnet50 or timm:<name>")
    parser.add_argument(
        "--width", type=float, default=None, help="torchvision ResNet width (default 0.25; timm models take none)"
    )
    parser.add_argument("--images", type=int, default=64, help="synthetic fundus images")
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--patch", type=int, default=32, help="patch side in pixels")
    parser.add_argument("--batch-images", type=int, default=16, help="images per step, over all processes")
    parser.add_argument("--bank-size", type=int, default=2048, help="keys in the hard-negative index")
    parser.add_argument("--k", type=int, default=32, help="bank negatives per anchor and level")
    parser.add_argument("--index-backend", default="auto", choices=("auto", "torch", "faiss"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    parser.add_argument("--devices", default="1", help="Lightning devices: a count, or a list like 0,1")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    args = parser.parse_args(argv)
    for name in ("steps", "images", "image_size", "patch", "batch_images", "bank_size", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    last = out / "checkpoints" / "last.ckpt"
    if args.resume and not last.is_file():
        print(f"error: --resume: no checkpoint {last}", file=sys.stderr)
        return 2
    L.seed_everything(args.seed, workers=True, verbose=False)
    try:
        data = SyntheticFourViewData(
            n_images=args.images,
            image_size=args.image_size,
            patch_size=args.patch,
            batch_images=args.batch_images,
            seed=args.seed,
            num_workers=args.num_workers,
        )
        width = args.width if args.width is not None else (1.0 if args.arch.startswith(TIMM_PREFIX) else 0.25)
        module = CoMCLModule(
            arch=args.arch,
            width=width,
            bank_size=args.bank_size,
            k=args.k,
            index_backend=args.index_backend,
            max_steps=args.steps,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    devices: int | str | list[int] = int(args.devices) if args.devices.isdigit() else args.devices
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        max_steps=args.steps,
        default_root_dir=out,
        logger=CSVLogger(out),
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],  # at every epoch's end
        log_every_n_steps=1,
        enable_model_summary=False,
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=last if args.resume else None, weights_only=True)
    except ResumeError as err:
        print(f"error: {last}: {err}", file=sys.stderr)
        return 2
    if trainer.is_global_zero:
        bank = len(module.index)
        pace = module.weighting.schedule.step_count
        print(f"{trainer.global_step} steps; pace at step {pace}; this process's index holds {bank} keys")
        print(f"checkpoint: {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
