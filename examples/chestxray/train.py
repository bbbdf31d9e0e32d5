"""NIH ChestX-ray14 pipeline: CoMCL pre-training, 14-label BCE fine-tuning, per-label AUC per image quality.

With no arguments it runs CoMCL on the built-in synthetic chest X-rays (``configs/default.yaml``)::

    python examples/chestxray/train.py                       # CoMCL, synthetic data (run time: examples/README.md)
    python examples/chestxray/train.py --out runs/x --method ce --set finetune.epochs=10
    python examples/chestxray/train.py --out runs/x --resume # continue an interrupted run
    python examples/chestxray/train.py --compare --seeds 3 --out runs/chest-compare
    python examples/chestxray/train.py --config examples/chestxray/configs/real_gpu.yaml \
        --set data.chestxray14.root=/data/ChestX-ray14

Writes ``OUT/metrics.json`` (``mean_auc``, ``per_label_auc``, ``per_quality`` good / usable / reject
with the same keys), ``OUT/scalars.csv``, TensorBoard events, ``OUT/config.yaml`` and
``OUT/summary.png`` and ``OUT/checkpoint.pt`` (updated atomically after every epoch; an existing run
is never replaced without ``--overwrite``). ``--compare`` writes
``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare_auc.png``. See examples/chestxray/README.md.
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

from examples.chestxray.data import LABELS, QUALITY_NAMES, ChestXrayDataConfig  # noqa: E402
from examples.common import cli  # noqa: E402
from examples.common.cli import RunConfig  # noqa: E402
from examples.common.config import FinetuneConfig, ModelConfig, PretrainConfig, check  # noqa: E402
from examples.common.task import MultiLabelTask, pos_weight_from_targets  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


@dataclass
class LossConfig:
    """The fine-tuning loss: ``BCEWithLogitsLoss``, optionally with ``pos_weight`` = negatives / positives."""

    pos_weight: bool = False
    max_pos_weight: float = 10.0

    def validate(self, key: str) -> None:
        check(self.max_pos_weight >= 1, f"{key}.max_pos_weight", "a number >= 1", self.max_pos_weight)


@dataclass
class ChestXrayConfig:
    """The whole ChestX-ray14 pipeline configuration (sections as in configs/default.yaml)."""

    data: ChestXrayDataConfig = field(default_factory=ChestXrayDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/chestxray"))

    def validate(self) -> None:
        self.data.validate("data")
        self.model.validate("model")
        self.pretrain.validate("pretrain")
        self.finetune.validate("finetune")
        self.loss.validate("loss")
        self.run.validate("run")
        check(
            self.pretrain.patch_size
            <= (self.data.image_size if self.data.source == "synthetic" else self.data.chestxray14.view_image_size),
            "pretrain.patch_size",
            "at most the image size the patches are cut from",
            self.pretrain.patch_size,
        )


def _build_data(cfg: ChestXrayConfig, seed: int, _args: argparse.Namespace) -> Any:
    from examples.chestxray.data import build_data

    return build_data(cfg, seed)


def make_task(cfg: ChestXrayConfig, data: Any) -> MultiLabelTask:
    """BCE over the 14 labels; ``pos_weight`` from the training targets when ``loss.pos_weight`` is set."""
    pw = None
    if data is not None and cfg.loss.pos_weight:
        pw = pos_weight_from_targets(data.train.targets, cfg.loss.max_pos_weight)
    return MultiLabelTask(LABELS, pw, labels_title=f"the {len(LABELS)} labels")


CLI = cli.PipelineCLI(
    prog="python examples/chestxray/train.py",
    description="CoMCL on ChestX-ray14-style X-rays: pre-train, fine-tune (14 labels), AUC per image quality.",
    name="ChestX-ray14",
    config_cls=ChestXrayConfig,
    default_config=DEFAULT_CONFIG,
    group_names=QUALITY_NAMES,
    build_data=_build_data,
    make_task=make_task,
    identity={"task": "multilabel-bce"},
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(CLI, argv)


if __name__ == "__main__":
    sys.exit(main())
