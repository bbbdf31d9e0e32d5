"""CoMCL pre-training with Lightning on synthetic four-view fundus data.

    python examples/lightning/train.py                                  # a short CPU run
    python examples/lightning/train.py --steps 400 --out runs/lightning
    python examples/lightning/train.py --steps 400 --out runs/lightning --resume   # continue it
    python examples/lightning/train.py --steps 400 --out runs/lightning --overwrite  # replace it
    python examples/lightning/train.py --accelerator cpu --devices 2 --strategy ddp  # 2 processes (gloo)
    python examples/lightning/train.py --accelerator gpu --devices 4 --strategy ddp --arch timm:convnext_tiny

Writes ``OUT/checkpoints/last.ckpt`` (at the end of every epoch, with the epoch's own file;
resumable, loadable with ``weights_only=True``) and ``OUT/lightning_logs/version_*/metrics.csv``
(the loss per level, the pace). An ``OUT`` that already holds checkpoints is refused unless the run
is continued (``--resume``) or replaced (``--overwrite``: its checkpoints and logs are removed first).
``--steps`` is the planned length of training: the pace and the learning rate follow it, and a
resumed run continues them. See examples/lightning/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS and torch ship separate OpenMP pools

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import lightning as L  # noqa: E402
from examples.common.models import TIMM_PREFIX, check_input_sizes  # noqa: E402
from examples.lightning.data import SyntheticFourViewData  # noqa: E402
from examples.lightning.module import CoMCLModule, ResumeError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lightning", help="output directory (checkpoints, logs)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps (the planned length of training)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run in OUT (its checkpoints and lightning_logs)"
    )
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
    parser.add_argument(
        "--accelerator", default="cpu", choices=ACCELERATORS, help="Lightning accelerator (default: cpu)"
    )
    parser.add_argument(
        "--devices", default="1", help="Lightning devices: a count >= 1, -1 or auto (all), or indices like 0,1"
    )
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    args = parser.parse_args(argv)
    for name in ("steps", "images", "image_size", "patch", "batch_images", "bank_size", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 32:
        parser.error(f"--image-size must be >= 32 (the synthetic fundus images), got {args.image_size}")
    if args.patch > args.image_size:
        parser.error(f"--patch must be <= --image-size ({args.image_size}), got {args.patch}")
    if args.k > args.bank_size:
        parser.error(f"--k must be <= --bank-size ({args.bank_size}), got {args.k}")
    for name in ("seed", "num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not re.fullmatch(r"auto|-1|[1-9]\d*|\d+,|\d+(,\d+)+,?", args.devices):
        parser.error(f"--devices must be a count >= 1, -1 or auto (all), or indices like 0,1; got {args.devices!r}")
    return args


ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")


def run_files(out: Path) -> list[Path]:
    """What this command writes into ``out``: the checkpoints and the CSV logs (empty: no run there)."""
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    logs = sorted(p for v in (out / "lightning_logs").glob("version_*") for p in v.glob("*") if p.is_file())
    return ckpts + [p for p in logs if p.name in ("metrics.csv", "hparams.yaml")]


def clear_run(out: Path) -> None:
    """Remove the checkpoints and logs of the run in ``out`` (``--overwrite``); other files are left alone."""
    for path in run_files(out):
        path.unlink()
    for folder in [*sorted((out / "lightning_logs").glob("version_*")), out / "lightning_logs", out / "checkpoints"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _choose_out(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--out`` for this command (``None``: nothing); nothing is changed here."""
    out = Path(args.out)
    for part in (out, *out.parents):
        if part.exists() and not part.is_dir():
            return f"--out must be a directory, but {part} is a file"
    last = out / "checkpoints" / "last.ckpt"
    if args.resume and not last.is_file():
        return f"--resume: no checkpoint {last}"
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    if ckpts and not args.resume and not args.overwrite:
        shown = ", ".join(p.name for p in ckpts[:3]) + (", ..." if len(ckpts) > 3 else "")
        return (
            f"--out {out} already holds a run ({shown}); pass --resume to continue it "
            "or --overwrite to replace it (or choose another --out)"
        )
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    last = out / "checkpoints" / "last.ckpt"
    problem = _choose_out(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
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
        check_input_sizes(module.model.encoder, args.arch, {"--patch": args.patch}, key="--arch")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    devices: int | str = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)  # at every epoch's end
    try:
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=devices,
            strategy=args.strategy,
            max_steps=args.steps,
            default_root_dir=out,
            logger=CSVLogger(out),
            callbacks=[checkpoints],
            log_every_n_steps=1,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError) as err:
        print(
            f"error: --accelerator {args.accelerator} --devices {args.devices} --strategy {args.strategy}: "
            f"Lightning cannot run with these here ({_first_line(err)})",
            file=sys.stderr,
        )
        return 2
    world = trainer.world_size
    shard = -(-args.bank_size // world)
    if args.k > shard:
        print(
            f"error: --k must be <= each process's bank shard of {shard} (--bank-size {args.bank_size} "
            f"over {world} processes), got {args.k}",
            file=sys.stderr,
        )
        return 2
    if args.batch_images % world:
        print(
            f"error: --batch-images must be divisible by the {world} processes, got {args.batch_images}",
            file=sys.stderr,
        )
        return 2
    if args.overwrite:
        clear_run(out)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=last if args.resume else None, weights_only=True)
    except ResumeError as err:
        print(f"error: {last}: {err}", file=sys.stderr)
        return 2
    if trainer.is_global_zero:
        bank = len(module.index)
        pace = module.weighting.schedule.step_count
        print(f"{trainer.global_step} steps; pace at step {pace}; this process's index holds {bank} keys")
        written = checkpoints.last_model_path  # the file this run wrote (or, resumed when finished, read)
        print(f"checkpoint: {written or last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
