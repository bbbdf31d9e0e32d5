"""Contrastive pre-training on four-view patches: CoMCL and the SimCLR / SupCon baselines.

Methods (the ``method`` names of the comparison):

================  ================================================================================
``comcl``         :func:`mlcl_losses.comcl_levels` over V1a, V1b, V2, V3, V4; a momentum key encoder
                  fills a :class:`~mlcl_losses.index.HardNegativeIndex` whose hardest allowed keys are
                  extra negatives; self-paced weighting of negatives (pace rising over training).
``comcl_no_spl``  the same without self-paced weighting.
``comcl_no_quality``  the same with ``comcl_levels(quality_weight=0)``.
``simclr``        ``Level.instance()`` (NT-Xent) on two augmentations of each high-quality patch; no
                  degraded views, no bank.
``supcon``        ``Level.supervised()`` with ``denominator="all"`` on the same two-view batches, labels
                  = the image's disease grade.
================  ================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from examples.common import ddp
from examples.common.config import OptimConfig, PretrainConfig
from examples.common.models import ContrastiveModel, momentum_copy, momentum_update
from examples.common.protocol import batch_own_labels
from examples.common.runlog import progress
from mlcl_losses import Level, MultiLevelContrastiveLoss, PaceSchedule, SelfPacedWeighting, ViewTags, comcl_levels
from mlcl_losses.tags import Kind, Quality
from mlcl_losses.views import LightAugment

__all__ = [
    "COMCL_METHODS",
    "PRETRAIN_METHODS",
    "PretrainState",
    "build_optimizer",
    "build_pretrain",
    "pretrain_epoch",
    "two_view_batch",
]

COMCL_METHODS = ("comcl", "comcl_no_spl", "comcl_no_quality")
PRETRAIN_METHODS = (*COMCL_METHODS, "simclr", "supcon")


def build_optimizer(
    params: Any, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimiser and a per-batch LR schedule: linear warm-up, then cosine to 0 (or constant)."""
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _pace(cfg: PretrainConfig, total_steps: int) -> PaceSchedule:
    sp = cfg.self_paced
    steps = max(1, round(sp.ramp * total_steps))
    if sp.pace == "constant":
        return PaceSchedule.constant(sp.start)
    return getattr(PaceSchedule, sp.pace)(sp.start, sp.end, steps)


def build_criterion(
    method: str, cfg: PretrainConfig, dim: int, total_steps: int, device: torch.device
) -> MultiLevelContrastiveLoss:
    """The loss module of ``method``, with its index (keys of ``dim`` features) and self-paced weighting."""
    if method not in PRETRAIN_METHODS:
        raise ValueError(f"Expected a pre-training method in {PRETRAIN_METHODS}, but got {method!r}")
    job = ddp.info()  # under torchrun: negatives from the global batch, the index sharded over ranks
    if method == "simclr":
        return MultiLevelContrastiveLoss(
            Level.instance(), temperature=cfg.temperature, impl=cfg.loss_impl, gather_distributed=job.enabled
        )
    if method == "supcon":
        return MultiLevelContrastiveLoss(
            Level.supervised(),
            temperature=cfg.temperature,
            denominator="all",
            impl=cfg.loss_impl,
            gather_distributed=job.enabled,
        )
    from mlcl_losses.index import HardNegativeIndex

    w = cfg.levels
    levels = comcl_levels(w.lesion, 0.0 if method == "comcl_no_quality" else w.quality, w.healthy)
    if not levels:
        raise ValueError(f"method {method!r} with level weights {w} leaves no level with a weight > 0")
    weighting = None
    if method != "comcl_no_spl" and cfg.self_paced.enabled:
        spl = SelfPacedWeighting(cfg.self_paced.regularizer, _pace(cfg, total_steps), target="negatives")
        names = [level.name for level in levels if level.name in cfg.self_paced.levels]
        weighting = dict.fromkeys(names, spl) if names else None
    shard = -(-cfg.bank_size // job.world_size)  # this rank's part of the bank
    if cfg.k > shard:
        raise ValueError(
            f"pretrain.k: {cfg.k} hard negatives per anchor exceed each process's bank shard of {shard} "
            f"(bank_size {cfg.bank_size} / {job.world_size} processes); lower k or raise bank_size"
        )
    index = HardNegativeIndex(dim=dim, capacity=shard, device=device, backend=cfg.index_backend)
    return MultiLevelContrastiveLoss(
        levels,
        temperature=cfg.temperature,
        weighting=weighting,
        index=index,
        k=cfg.k,
        impl=cfg.loss_impl,
        gather_distributed=job.enabled,
    )


def two_view_batch(
    views: Tensor, tags: ViewTags, augment: LightAugment, generator: torch.Generator
) -> tuple[Tensor, ViewTags]:
    """SimCLR-style batch from four-view output: two augmentations of each high-quality patch.

    Lesion patches keep V1a and V1b; each healthy patch V3 is augmented twice. Degraded views (V2,
    V4) are dropped. Returns ``views (B', C, P, P)`` and their tags (all ``quality`` HIGH).
    """
    high = tags.quality == int(Quality.HIGH)
    lesion = high & (tags.kind == int(Kind.LESION))
    healthy = (high & (tags.kind == int(Kind.HEALTHY))).nonzero()[:, 0]
    parts, part_tags = [views[lesion]], [tags[lesion]]
    if healthy.numel():
        for _ in range(2):
            parts.append(torch.stack([augment(views[i], generator) for i in healthy.tolist()]))
            part_tags.append(tags[healthy])
    return torch.cat(parts), ViewTags.cat(part_tags)


@dataclass
class PretrainState:
    """Everything pre-training changes (saved in checkpoints)."""

    method: str
    model: ContrastiveModel
    key_model: nn.Module | None
    criterion: MultiLevelContrastiveLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "key_model": None if self.key_model is None else self.key_model.state_dict(),
            "criterion": self.criterion.state_dict(),  # hard-negative index + self-paced pace
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.key_model is not None:
            self.key_model.load_state_dict(state["key_model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def build_pretrain(
    method: str, model: ContrastiveModel, cfg: PretrainConfig, proj_dim: int, steps_per_epoch: int, device: torch.device
) -> PretrainState:
    """Criterion, optimiser, schedule and (for CoMCL) the momentum key encoder of ``method``."""
    total = max(1, steps_per_epoch * cfg.epochs)
    criterion = build_criterion(method, cfg, proj_dim, total, device).to(device)
    key_model = momentum_copy(model) if method in COMCL_METHODS else None
    opt, sched = build_optimizer(model.parameters(), cfg.optim, steps_per_epoch, cfg.epochs)
    return PretrainState(method, model, key_model, criterion, opt, sched)


def pretrain_epoch(
    state: PretrainState,
    loader: Any,
    cfg: PretrainConfig,
    device: torch.device,
    seed: int,
    desc: str = "pretrain",
) -> dict[str, float]:
    """One epoch over ``loader`` (batches of :class:`~mlcl_losses.views.FourViews`); returns mean statistics."""
    state.model.train()
    if state.key_model is not None:
        state.key_model.train()
    augment = LightAugment()
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    job = ddp.info()
    bar = progress(loader, desc)
    for views, tags in bar:
        if state.method in ("simclr", "supcon"):
            views, tags = two_view_batch(views, tags, augment, gen)
        if state.method == "supcon":  # images outside the labelled subset: a class of their own per batch
            tags = batch_own_labels(tags, job.rank, job.world_size)
        views, tags = views.to(device, non_blocking=True), tags.to(device)
        z = state.model(views)
        keys = None
        if state.key_model is not None:
            with torch.no_grad():
                keys = state.key_model(views)
        loss, stats = state.criterion(z, tags, keys=keys)
        state.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            ddp.average_gradients(state.model)
            state.optimizer.step()
        state.scheduler.step()
        state.criterion.step()
        if state.key_model is not None:
            momentum_update(state.key_model, state.model, cfg.key_momentum)
        state.step += 1
        values = {"loss": float(loss.detach())} | {f"loss_{name}": float(s.loss) for name, s in stats.items()}
        values |= {f"pos_sim_{name}": float(s.pos_sim) for name, s in stats.items()}
        values |= {f"neg_sim_{name}": float(s.neg_sim) for name, s in stats.items()}
        for key, value in values.items():
            if math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + value
        count += 1
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    out = {k: v / max(1, count) for k, v in sums.items()}
    out["lr"] = float(state.scheduler.get_last_lr()[0])  # a Tensor only for a tensor lr
    return out
