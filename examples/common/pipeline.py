"""One run of a pipeline: pre-training (unless the method is ``ce``), fine-tuning, evaluation.

Checkpoints are written atomically after every epoch to ``OUT/checkpoint.pt`` (models, optimisers,
LR schedules, the hard-negative index, the self-paced pace, RNG states). With ``resume=True`` the run
continues from it; every epoch draws its randomness from ``(seed, stage, epoch)`` and the checkpoint
restores all state, so the final metrics equal those of an uninterrupted run (on the same machine).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from examples.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seed_everything, set_rng_state
from examples.common.config import FinetuneConfig, ModelConfig, PretrainConfig
from examples.common.finetune import build_finetune
from examples.common.models import Classifier, ContrastiveModel, build_encoder
from examples.common.pretrain import PRETRAIN_METHODS, build_pretrain, pretrain_epoch
from examples.common.runlog import RunLogger, write_json
from examples.common.task import SingleLabelTask, Task
from mlcl_losses.degrade import mix_seed
from mlcl_losses.views import collate_four_views

__all__ = ["METHODS", "PipelineData", "RunOptions", "run_pipeline"]

METHODS = ("ce", *PRETRAIN_METHODS)
_STAGES = {"pretrain": 1, "finetune": 2}


@dataclass
class PipelineData:
    """The datasets of a run.

    Attributes:
        views: four-view dataset for pre-training (``set_epoch``; items for ``collate_four_views``).
        train: fine-tuning dataset of ``(image, target, group)`` with ``set_epoch``.
        test: evaluation dataset of ``(image, target, group)``.
        num_classes: number of classes (of labels, for a multi-label task).
        group_names: names of the groups (EyeQ: Good, Usable, Reject).
    """

    views: Any
    train: Any
    test: Dataset
    num_classes: int
    group_names: Sequence[str]


@dataclass
class RunOptions:
    """Run-time options (not part of the experiment's identity)."""

    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    tensorboard: bool = True
    resume: bool = False
    stop_after_epochs: int | None = None  # simulate an interruption (tests)


def _loader(dataset: Any, batch_size: int, shuffle: bool, seed: int, workers: int, collate: Any = None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        persistent_workers=False,
    )


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(
    method: str,
    model_cfg: ModelConfig,
    pretrain_cfg: PretrainConfig,
    finetune_cfg: FinetuneConfig,
    data: PipelineData,
    out_dir: str | Path,
    options: RunOptions,
    identity: dict[str, Any] | None = None,
    task: Task | None = None,
) -> dict[str, Any] | None:
    """Run ``method`` and write ``OUT/metrics.json``; returns the metrics (``None`` when stopped early).

    Args:
        method: ``"ce"`` (no pre-training) or one of :data:`~examples.common.pretrain.PRETRAIN_METHODS`.
        identity: the full configuration; a resumed run must have the same one.
        task: the fine-tuning loss, prediction and metrics (default :class:`~examples.common.task.SingleLabelTask`).
    """
    task = task if task is not None else SingleLabelTask()
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {METHODS}, but got {method!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(options.device)
    ckpt_path = out / "checkpoint.pt"
    fingerprint = _fingerprint({"method": method, "seed": options.seed, **(identity or {})})
    seed = options.seed
    seed_everything(seed)

    encoder = build_encoder(model_cfg.arch, model_cfg.width, model_cfg.weights)
    contrastive = ContrastiveModel(encoder, model_cfg.proj_hidden, model_cfg.proj_dim).to(device)
    pre_epochs = 0 if method == "ce" else pretrain_cfg.epochs
    view_loader_len = -(-len(data.views) // pretrain_cfg.batch_images) if pre_epochs else 0
    pre = (
        build_pretrain(method, contrastive, pretrain_cfg, model_cfg.proj_dim, max(1, view_loader_len), device)
        if pre_epochs
        else None
    )
    train_steps = -(-len(data.train) // finetune_cfg.batch_size)

    stage, done = "pretrain", 0  # next stage, epochs of it completed
    fine = None
    if options.resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{ckpt_path} was written by a run with another configuration, method or seed; "
                "resume with the same config and options, or use another --out"
            )
        stage, done = state["stage"], int(state["epoch"])
        if stage == "pretrain":
            if pre is None:  # unreachable with a matching fingerprint (method and epochs are in it)
                raise CheckpointError(f"{ckpt_path} holds pre-training state, but method {method!r} does not pre-train")
            pre.load_state_dict(state["pretrain"])
        else:
            classifier = Classifier(contrastive.encoder, data.num_classes).to(device)
            fine = build_finetune(classifier, finetune_cfg, train_steps)
            fine.load_state_dict(state["finetune"])
        set_rng_state(state["rng"])
        tqdm.write(f"resuming {method} from {ckpt_path}: {stage} epoch {done}")
    elif ckpt_path.exists():
        ckpt_path.unlink()

    log = RunLogger(out, tensorboard=options.tensorboard)
    if options.resume:  # drop rows of epochs this run repeats
        order = _STAGES[stage]
        log.truncate(lambda s, e: _STAGES.get(s, 0) < order or (_STAGES.get(s, 0) == order and e < done))
    epochs_run = 0
    times: dict[str, float] = {}

    def checkpoint(stage_name: str, epoch: int, payload: dict[str, Any]) -> bool:
        nonlocal epochs_run
        save_checkpoint(
            ckpt_path, {"fingerprint": fingerprint, "method": method, "stage": stage_name, "epoch": epoch, **payload}
        )
        epochs_run += 1
        return options.stop_after_epochs is not None and epochs_run >= options.stop_after_epochs

    try:
        if stage == "pretrain" and pre is not None:
            t0 = time.perf_counter()
            for epoch in range(done, pre_epochs):
                data.views.set_epoch(epoch)
                loader = _loader(
                    data.views,
                    pretrain_cfg.batch_images,
                    True,
                    mix_seed(seed, 1, epoch),
                    options.num_workers,
                    collate_four_views,
                )
                torch.manual_seed(mix_seed(seed, 11, epoch))
                stats = pretrain_epoch(
                    pre,
                    loader,
                    pretrain_cfg,
                    device,
                    mix_seed(seed, 12, epoch),
                    desc=f"{method} pretrain {epoch + 1}/{pre_epochs}",
                )
                log.scalars("pretrain", epoch, pre.step, stats)
                tqdm.write(
                    f"[{method}] pretrain epoch {epoch + 1}/{pre_epochs}: loss {stats.get('loss', float('nan')):.4f}"
                )
                if checkpoint("pretrain", epoch + 1, {"pretrain": pre.state_dict()}):
                    return None
            times["pretrain_s"] = time.perf_counter() - t0
            stage, done = "finetune", 0
        if stage == "pretrain":  # method "ce"
            stage, done = "finetune", 0
        if fine is None:
            classifier = Classifier(contrastive.encoder, data.num_classes).to(device)
            torch.manual_seed(mix_seed(seed, 20))
            classifier.fc.reset_parameters()
            fine = build_finetune(classifier, finetune_cfg, train_steps)
        del pre  # free the bank
        t0 = time.perf_counter()
        for epoch in range(done, finetune_cfg.epochs):
            data.train.set_epoch(epoch)
            loader = _loader(data.train, finetune_cfg.batch_size, True, mix_seed(seed, 2, epoch), options.num_workers)
            torch.manual_seed(mix_seed(seed, 21, epoch))
            stats = task.finetune_epoch(
                fine, loader, finetune_cfg, device, epoch, desc=f"{method} finetune {epoch + 1}/{finetune_cfg.epochs}"
            )
            log.scalars("finetune", epoch, fine.step, stats)
            tqdm.write(
                f"[{method}] finetune epoch {epoch + 1}/{finetune_cfg.epochs}: "
                f"loss {stats['loss']:.4f} acc {stats['accuracy']:.3f}"
            )
            if checkpoint("finetune", epoch + 1, {"finetune": fine.state_dict()}):
                return None
        times["finetune_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        test_loader = _loader(data.test, 2 * finetune_cfg.batch_size, False, 0, options.num_workers)
        probs, target, groups = task.predict(fine.model, test_loader, device, f"{method} test")
        metrics = task.compute_metrics(probs, target, groups, data.group_names, data.num_classes)
        times["evaluate_s"] = time.perf_counter() - t0
        metrics["method"] = method
        metrics["seed"] = seed
        write_json(out / "metrics.json", metrics)
        write_json(out / "timing.json", times)
        log.scalars("test", finetune_cfg.epochs, fine.step, {k: metrics[k] for k in task.metrics})
        return metrics
    finally:
        log.close()
