"""EyeQ diabetic-retinopathy pipeline: CoMCL pre-training, fine-tuning, evaluation per image quality.

With no arguments it runs CoMCL on the built-in synthetic fundus data (``configs/default.yaml``)::

    python examples/eyeq/train.py                       # CoMCL, synthetic data (run time: examples/README.md)
    python examples/eyeq/train.py --out runs/x --set pretrain.epochs=5 --set model.width=0.5
    python examples/eyeq/train.py --out runs/x --resume # continue an interrupted run (--overwrite: replace it)
    python examples/eyeq/train.py --compare --seeds 3 --out runs/compare
    python examples/eyeq/train.py --config examples/eyeq/configs/real_gpu.yaml --set data.eyeq.root=/data/EyeQ

Writes ``OUT/metrics.json`` (accuracy, quadratic kappa, macro-F1, macro AUC, and ``per_quality``
good / usable / reject), ``OUT/scalars.csv``, TensorBoard events, ``OUT/config.yaml`` and
``OUT/summary.png`` and ``OUT/checkpoint.pt`` (updated atomically after every epoch; an existing run
is never replaced without ``--overwrite``). ``--compare`` writes
``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare_kappa.png``. See examples/eyeq/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS and torch ship separate OpenMP pools (see index.py)
if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 draws progress bars (read when tqdm loads)
    os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.common import cli  # noqa: E402
from examples.common.cli import RunConfig  # noqa: E402
from examples.common.config import FinetuneConfig, ModelConfig, PretrainConfig, check  # noqa: E402
from examples.common.task import SingleLabelTask  # noqa: E402
from examples.eyeq.data import QUALITY_NAMES, EyeQDataConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


@dataclass
class EyeQConfig:
    """The whole EyeQ pipeline configuration (sections as in configs/default.yaml)."""

    data: EyeQDataConfig = field(default_factory=EyeQDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        self.data.validate("data")
        self.model.validate("model")
        self.pretrain.validate("pretrain")
        self.finetune.validate("finetune")
        self.run.validate("run")
        check(
            self.pretrain.patch_size
            <= (self.data.image_size if self.data.source == "synthetic" else self.data.eyeq.view_image_size),
            "pretrain.patch_size",
            "at most the image size the patches are cut from",
            self.pretrain.patch_size,
        )


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow converting data.eyeq.boxes_pickle (unpickling runs code; trusted files only)",
    )


def _build_data(cfg: EyeQConfig, seed: int, args: argparse.Namespace) -> Any:
    from examples.eyeq.data import build_data

    return build_data(cfg, seed, allow_pickle=args.allow_pickle)


CLI = cli.PipelineCLI(
    prog="python examples/eyeq/train.py",
    description="CoMCL on EyeQ-style fundus images: pre-train, fine-tune, evaluate per image quality.",
    name="EyeQ",
    config_cls=EyeQConfig,
    default_config=DEFAULT_CONFIG,
    group_names=QUALITY_NAMES,
    build_data=_build_data,
    make_task=lambda _cfg, _data: SingleLabelTask(),
    add_arguments=_add_arguments,
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(CLI, argv)


if __name__ == "__main__":
    sys.exit(main())
