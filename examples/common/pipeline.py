"""One run of a pipeline: pre-training (unless the method is ``ce``), fine-tuning, evaluation.

Checkpoints are written atomically after every epoch to ``OUT/checkpoint.pt`` (models, optimisers,
LR schedules, the hard-negative index, the self-paced pace, RNG states). With ``resume=True`` the run
continues from it; every epoch draws its randomness from ``(seed, stage, epoch)`` and the checkpoint
restores all state, so the final metrics equal those of an uninterrupted run (on the same machine).

Under ``torchrun`` the same function runs on every rank (see :mod:`examples.common.ddp`): each rank
loads its shard of every global batch, gradients are averaged, rank 0 writes the files, and the
metrics are those of the whole test set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from examples.common import ddp
from examples.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seed_everything, set_rng_state
from examples.common.config import FinetuneConfig, ModelConfig, PretrainConfig
from examples.common.finetune import build_finetune
from examples.common.models import Classifier, ContrastiveModel, build_encoder
from examples.common.pretrain import PRETRAIN_METHODS, build_pretrain, pretrain_epoch
from examples.common.run_identity import (
    check_resumable,
    encoder_fingerprint,
    refuse_mismatch,
    resume_mismatch,
    run_fingerprint,
)
from examples.common.runlog import RunLogger, write_json
from examples.common.task import SingleLabelTask, Task
from mlcl_losses.degrade import mix_seed
from mlcl_losses.views import collate_four_views

__all__ = [
    "METHODS",
    "PipelineData",
    "RunOptions",
    "SizedDataset",
    "check_resumable",
    "resume_mismatch",
    "encoder_fingerprint",
    "load_encoder",
    "run_fingerprint",
    "run_pipeline",
]

METHODS = ("ce", *PRETRAIN_METHODS)
_STAGES = {"pretrain": 1, "finetune": 2}


class SizedDataset(Protocol):
    """A map-style dataset with a length (``torch.utils.data.Dataset`` declares no ``__len__``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


@dataclass
class PipelineData:
    """The datasets of a run.

    Attributes:
        views: four-view dataset for pre-training (``set_epoch``; items for ``collate_four_views``).
        train: fine-tuning dataset of ``(image, target, group)`` with ``set_epoch``.
        test: evaluation dataset of ``(image, target, group)``.
        num_classes: number of classes (of labels, for a multi-label task).
        group_names: names of the groups (EyeQ: Good, Usable, Reject).
        probe_views: four views of held-out images for the probes of :mod:`examples.common.probes`
            (``None``: no patch probes).
    """

    views: Any
    train: Any
    test: SizedDataset
    num_classes: int
    group_names: Sequence[str]
    probe_views: Any = None


@dataclass
class RunOptions:
    """Run-time options (not part of the experiment's identity)."""

    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    tensorboard: bool = True
    resume: bool = False
    stop_after_epochs: int | None = None  # simulate an interruption (tests)
    overwrite: bool = False  # a fresh run may replace the run already in the directory


def _loader(
    dataset: Any, batch_size: int, shuffle: bool, seed: int, workers: int, collate: Any = None, epoch: int = 0
) -> DataLoader:
    """One epoch's loader; under ``torchrun`` this rank's shard with its share of the global ``batch_size``."""
    job = ddp.info()
    sampler: Any = None
    if job.enabled:
        if shuffle:  # training: equal disjoint shards of a per-epoch permutation
            sampler = ddp.train_sampler(dataset, seed)
            sampler.set_epoch(epoch)
        else:  # evaluation: every item exactly once
            sampler = ddp.EvalShardSampler(len(dataset), job.rank, job.world_size)
        batch_size = max(1, batch_size // job.world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed) if shuffle and sampler is None else None,
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        persistent_workers=False,
    )


def _steps(n_items: int, global_batch: int, job: ddp.DistInfo) -> int:
    """Steps per epoch of a training loader (each rank: ``n_items // world`` items in local batches)."""
    if not job.enabled:
        return -(-n_items // global_batch)
    return -(-(n_items // job.world_size) // (global_batch // job.world_size))


def _to_cpu(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    return state


def load_encoder(path: str | Path, method: str, seed: int) -> dict[str, Any]:
    """An ``encoder.pt`` of a ``pretrain_only`` run; checks method and seed.

    The file is a checkpoint of :func:`save_checkpoint`: read with ``weights_only=True`` and its SHA-256
    digest verified, so a corrupted encoder is refused rather than silently fine-tuned.

    Raises:
        CheckpointError: the file is missing, unreadable, or another method's or seed's encoder.
    """
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"cannot read the pre-trained encoder {path}: {err}") from err
    if state.get("kind") != "encoder" or state.get("method") != method or state.get("seed") != seed:
        raise CheckpointError(
            f"{path} is not the pre-trained encoder of method {method!r}, seed {seed} "
            f"(it holds kind {state.get('kind')!r}, method {state.get('method')!r}, seed {state.get('seed')!r})"
        )
    return state


def _save_encoder(
    out: Path, model: ContrastiveModel, method: str, seed: int, fingerprint: str, times: dict[str, float], main: bool
) -> dict[str, Any]:
    path = out / "encoder.pt"
    info = {"method": method, "seed": seed, "encoder": str(path), "fingerprint": fingerprint}
    if main:
        payload = {"kind": "encoder", "method": method, "seed": seed, "fingerprint": fingerprint}
        # atomic, durable and digest-checked on load, like the run's checkpoint
        save_checkpoint(path, payload | {"encoder": _to_cpu(model.encoder.state_dict())})
        if times:  # not when a finished pre-training is only resumed to write the file
            write_json(out / "timing.json", times)
    ddp.barrier()
    return info


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
    encoder_file: str | Path | None = None,
    pretrain_only: bool = False,
) -> dict[str, Any] | None:
    """Run ``method`` and write ``OUT/metrics.json``; returns the metrics (``None`` when stopped early).

    The benchmark protocol pre-trains once per (method, repeat) and fine-tunes that encoder in every
    cell: ``pretrain_only`` stops after pre-training and writes the encoder to ``OUT/encoder.pt``
    (returning ``{"method", "seed", "encoder", "fingerprint"}``); ``encoder_file`` skips pre-training
    and starts fine-tuning from such a file.

    A fresh run (``options.resume`` False) refuses a directory that already holds a checkpoint or
    ``metrics.json`` unless ``options.overwrite``; resuming a finished run returns its metrics and
    changes nothing.

    Args:
        method: ``"ce"`` (no pre-training) or one of :data:`~examples.common.pretrain.PRETRAIN_METHODS`.
        identity: the full configuration; a resumed run must have the same one.
        task: the fine-tuning loss, prediction and metrics (default :class:`~examples.common.task.SingleLabelTask`).
        encoder_file: an ``encoder.pt`` of a ``pretrain_only`` run of the same method and seed.
        pretrain_only: pre-train and save the encoder, no fine-tuning (not for ``"ce"``).

    Raises:
        CheckpointError: nothing to resume from, a checkpoint of another run, a corrupted checkpoint, or
            a fresh run asked to write over an existing one.
    """
    task = task if task is not None else SingleLabelTask()
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {METHODS}, but got {method!r}")
    if pretrain_only and (method == "ce" or encoder_file is not None):
        raise ValueError(f"`pretrain_only` needs a pre-training method and no `encoder_file`, got {method!r}")
    out = Path(out_dir)
    job = ddp.info()
    say = tqdm.write if job.is_main else (lambda *_args, **_kwargs: None)
    if options.resume and (out / "metrics.json").is_file():
        say(f"[{method}] {out} is a finished run; nothing to resume, nothing changed")
        return dict(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    old = [out / name for name in ("checkpoint.pt", "metrics.json") if (out / name).is_file()]
    if not options.resume and old and not options.overwrite:
        raise CheckpointError(
            f"{out} already holds a run ({', '.join(p.name for p in old)}); pass --resume to continue it "
            "or --overwrite to replace it"
        )
    device = torch.device(options.device)
    ckpt_path = out / "checkpoint.pt"
    pretrained = None if encoder_file is None else load_encoder(encoder_file, method, options.seed)
    fingerprint = run_fingerprint(
        method, options.seed, identity, pretrain_only, None if pretrained is None else pretrained["fingerprint"]
    )
    seed = options.seed
    seed_everything(seed)
    ddp.local_batch(pretrain_cfg.batch_images, "pretrain.batch_images")  # divisible by the processes
    ddp.local_batch(finetune_cfg.batch_size, "finetune.batch_size")
    for name, dataset in (("training", data.train), ("test", data.test)):
        if len(dataset) < job.world_size:  # a rank with no data would leave the others waiting
            raise ValueError(f"the {name} set has {len(dataset)} images, fewer than the {job.world_size} processes")

    # the encoder is probed once with every input size it will get: a backbone that cannot take them
    # (a timm model with a fixed input or too many downsamplings) is a configuration error here
    sizes = {"data.image_size": (identity or {}).get("data", {}).get("image_size")}
    if method != "ce" and pretrained is None:
        sizes["pretrain.patch_size"] = pretrain_cfg.patch_size
    input_sizes = {key: int(size) for key, size in sizes.items() if isinstance(size, int)}
    encoder = build_encoder(model_cfg.arch, model_cfg.width, model_cfg.weights, input_sizes=input_sizes)
    contrastive = ContrastiveModel(encoder, model_cfg.proj_hidden, model_cfg.proj_dim).to(device)
    ddp.broadcast_module(contrastive)  # every rank starts from rank 0's initialisation
    if pretrained is not None:
        contrastive.encoder.load_state_dict(pretrained["encoder"])
    pre_epochs = 0 if method == "ce" or pretrained is not None else pretrain_cfg.epochs
    pre = (
        build_pretrain(
            method,
            contrastive,
            pretrain_cfg,
            model_cfg.proj_dim,
            max(1, _steps(len(data.views), pretrain_cfg.batch_images, job)),
            device,
        )
        if pre_epochs
        else None
    )
    train_steps = _steps(len(data.train), finetune_cfg.batch_size, job)

    stage, done = "pretrain", 0  # next stage, epochs of it completed
    fine = None
    times: dict[str, float] = {}  # seconds per stage, over every session of the run
    if options.resume:
        # on the CPU: the RNG states must stay CPU byte tensors; load_state_dict copies onto the device
        state = load_checkpoint(ckpt_path, map_location="cpu")
        if state.get("fingerprint") != fingerprint:
            refuse_mismatch(ckpt_path, state, method, options.seed, identity)
        if int(state.get("world_size", 1)) != job.world_size:
            raise CheckpointError(
                f"{ckpt_path} was written by a run of {state.get('world_size', 1)} process(es); "
                f"resume it with the same number, not {job.world_size}"
            )
        stage, done = state["stage"], int(state["epoch"])
        if stage == "pretrain":
            if pre is None:  # unreachable with a matching fingerprint (method and epochs are in it)
                raise CheckpointError(f"{ckpt_path} holds pre-training state, but method {method!r} does not pre-train")
            pre.load_state_dict(state["pretrain"])
            if "criterion_shards" in state:  # this rank's shard of the hard-negative index
                pre.criterion.load_state_dict(state["criterion_shards"][job.rank])
        else:
            classifier = Classifier(contrastive.encoder, data.num_classes).to(device)
            fine = build_finetune(classifier, finetune_cfg, train_steps)
            fine.load_state_dict(state["finetune"])
        times = {str(k): float(v) for k, v in state.get("times", {}).items()}
        set_rng_state(state["rng"])
        say(f"resuming {method} from {ckpt_path}: {stage} epoch {done}")
    elif old:  # options.overwrite: the user asked to replace the run
        ddp.barrier()  # every rank has seen that this is a fresh run before rank 0 removes the old files
        if job.is_main:
            for path in old:
                path.unlink()

    out.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out, tensorboard=options.tensorboard, enabled=job.is_main, fresh=not options.resume)
    if options.resume:  # drop rows of epochs this run repeats
        order = _STAGES[stage]
        log.truncate(lambda s, e: _STAGES.get(s, 0) < order or (_STAGES.get(s, 0) == order and e < done))
    epochs_run = 0

    def checkpoint(stage_name: str, epoch: int, payload: dict[str, Any]) -> bool:
        nonlocal epochs_run
        if job.enabled:
            payload["world_size"] = job.world_size
            if pre is not None and stage_name == "pretrain":  # every rank's index shard, in one file
                payload["criterion_shards"] = ddp.all_gather_objects(_to_cpu(pre.criterion.state_dict()))
        if job.is_main:
            save_checkpoint(
                ckpt_path,
                {
                    "fingerprint": fingerprint,
                    "config": identity or {},  # what predict / propose_boxes rebuild the model from
                    "method": method,
                    "seed": seed,
                    "stage": stage_name,
                    "epoch": epoch,
                    "times": dict(times),
                    **payload,
                },
            )
        ddp.barrier()  # no rank goes on (or stops) before the checkpoint is on disk
        epochs_run += 1
        return options.stop_after_epochs is not None and epochs_run >= options.stop_after_epochs

    try:
        if stage == "pretrain" and pre is not None:
            for epoch in range(done, pre_epochs):
                t0 = time.perf_counter()
                data.views.set_epoch(epoch)
                loader = _loader(
                    data.views,
                    pretrain_cfg.batch_images,
                    True,
                    mix_seed(seed, 1) if job.enabled else mix_seed(seed, 1, epoch),
                    options.num_workers,
                    collate_four_views,
                    epoch,
                )
                torch.manual_seed(mix_seed(seed, 11, epoch))
                stats = pretrain_epoch(
                    pre,
                    loader,
                    pretrain_cfg,
                    device,
                    mix_seed(seed, 12, epoch, job.rank) if job.enabled else mix_seed(seed, 12, epoch),
                    desc=f"{method} pretrain {epoch + 1}/{pre_epochs}",
                )
                ddp.average_buffers(pre.model)  # BatchNorm statistics: the mean of the ranks'
                stats = ddp.mean_over_ranks(stats)
                log.scalars("pretrain", epoch, pre.step, stats)
                say(f"[{method}] pretrain epoch {epoch + 1}/{pre_epochs}: loss {stats.get('loss', float('nan')):.4f}")
                times["pretrain_s"] = times.get("pretrain_s", 0.0) + time.perf_counter() - t0
                if checkpoint("pretrain", epoch + 1, {"pretrain": pre.state_dict()}):
                    return None
            stage, done = "finetune", 0
        if pretrain_only:  # the encoder after the last pre-training epoch (restored when resumed)
            return _save_encoder(out, contrastive, method, seed, fingerprint, times, job.is_main)
        if stage == "pretrain":  # method "ce"
            stage, done = "finetune", 0
        if fine is None:
            classifier = Classifier(contrastive.encoder, data.num_classes).to(device)
            torch.manual_seed(mix_seed(seed, 20))
            classifier.fc.reset_parameters()
            fine = build_finetune(classifier, finetune_cfg, train_steps)
        pre = None  # free the bank
        for epoch in range(done, finetune_cfg.epochs):
            t0 = time.perf_counter()
            data.train.set_epoch(epoch)
            loader = _loader(
                data.train,
                finetune_cfg.batch_size,
                True,
                mix_seed(seed, 2) if job.enabled else mix_seed(seed, 2, epoch),
                options.num_workers,
                epoch=epoch,
            )
            torch.manual_seed(mix_seed(seed, 21, epoch))
            stats = task.finetune_epoch(
                fine, loader, finetune_cfg, device, epoch, desc=f"{method} finetune {epoch + 1}/{finetune_cfg.epochs}"
            )
            ddp.average_buffers(fine.model)
            stats = ddp.mean_over_ranks(stats)
            log.scalars("finetune", epoch, fine.step, stats)
            say(
                f"[{method}] finetune epoch {epoch + 1}/{finetune_cfg.epochs}: "
                f"loss {stats['loss']:.4f}  train accuracy {stats['accuracy']:.3f}"
            )
            times["finetune_s"] = times.get("finetune_s", 0.0) + time.perf_counter() - t0
            if checkpoint("finetune", epoch + 1, {"finetune": fine.state_dict()}):
                return None
        t0 = time.perf_counter()
        ddp.check_in_sync(fine.model, "the fine-tuned model")
        test_loader = _loader(data.test, 2 * finetune_cfg.batch_size, False, 0, options.num_workers)
        probs, target, groups = task.predict(fine.model, test_loader, device, f"{method} test")
        probs, target, groups = ddp.gather_in_order((probs, target, groups), len(data.test))
        metrics = task.compute_metrics(probs, target, groups, data.group_names, data.num_classes)
        times["evaluate_s"] = time.perf_counter() - t0
        metrics["method"] = method
        metrics["seed"] = seed
        metrics["torch_threads"] = torch.get_num_threads()  # CPU reductions, hence the last digits, depend on it
        metrics["labelled_images"] = len(data.train)
        if job.enabled:
            metrics["world_size"] = job.world_size
        if job.is_main:
            write_json(out / "metrics.json", metrics)
            write_json(out / "timing.json", times)
        log.scalars("test", finetune_cfg.epochs, fine.step, {k: metrics[k] for k in task.metrics})
        return metrics
    finally:
        log.close()
