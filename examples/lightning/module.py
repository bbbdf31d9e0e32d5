"""CoMCL pre-training as a ``LightningModule``: the library's loss, hard-negative index and self-paced weighting.

One training step, in Lightning's hooks:

1. ``training_step``: the query encoder embeds the four views, the momentum (key) encoder embeds
   them too (no gradient), and :class:`mlcl_losses.MultiLevelContrastiveLoss` computes the three
   CoMCL levels with each anchor's hardest allowed negatives from the
   :class:`~mlcl_losses.index.HardNegativeIndex` and self-paced weights on the negatives.
2. ``optimizer_step`` (once per optimiser step, so also right with gradient accumulation): the
   optimiser steps, then the pace of the :class:`~mlcl_losses.SelfPacedWeighting` advances and
   the key encoder follows the query encoder (``key <- m key + (1 - m) query``).
3. ``on_train_batch_end``: the batch's keys are enqueued into the index, after the step, so they
   are negatives from the next step on.

**State in the checkpoint.** The query and key encoders are ordinary submodules (``state_dict``).
The loss -- the index's ring buffer and tags, and the pace -- is kept *outside* the module tree,
because under DDP each process holds its own shard of the bank: DDP would otherwise broadcast
rank 0's shard over the others, and Lightning would save rank 0's alone. :meth:`on_save_checkpoint`
gathers every process's loss state into ``checkpoint["comcl_criterion"]`` (a list, one entry per
process) and :meth:`on_load_checkpoint` gives each process its own, so ``Trainer.fit(ckpt_path=...)``
continues the pace and the index where they were.

**Loading with ``weights_only=True``.** Everything in the checkpoint is tensors, plain containers and
numbers: the hyperparameters are plain values (:meth:`save_hyperparameters`), the loss state is the
library's ``state_dict`` (whose extra states are ints, floats and strings), the optimiser and LR
schedule states are PyTorch's. So resume with ``trainer.fit(module, data, ckpt_path=path,
weights_only=True)``, read the file with ``torch.load(path, weights_only=True)`` or load the
encoders with ``CoMCLModule.load_from_checkpoint(path, weights_only=True)``; nothing is unpickled.

**DDP** is Lightning's own: ``Trainer(strategy="ddp", devices=N)`` (``accelerator="cpu"`` for
processes on one machine, gloo). The loss gathers the embeddings of all processes
(``gather_distributed=True`` when ``trainer.world_size > 1``), so negatives span the global batch,
and searches every process's index shard; DDP averages the gradients, which then equal one
process's on the whole batch (see :class:`~mlcl_losses.MultiLevelContrastiveLoss`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import lightning as L
from examples.common.config import OptimConfig
from examples.common.models import ContrastiveModel, build_encoder, momentum_copy, momentum_update
from examples.common.pretrain import build_optimizer
from mlcl_losses import MultiLevelContrastiveLoss, PaceSchedule, SelfPacedWeighting, ViewTags, comcl_levels
from mlcl_losses.index import HardNegativeIndex

__all__ = ["CHECKPOINT_KEY", "CoMCLModule", "ResumeError"]

CHECKPOINT_KEY = "comcl_criterion"


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (another configuration, process count or writer)."""


class CoMCLModule(L.LightningModule):
    """CoMCL pre-training of an encoder with a momentum key encoder and a hard-negative index.

    Args:
        arch, width, weights: the encoder (:func:`examples.common.models.build_encoder`: a
            torchvision ResNet or ``"timm:<name>"``).
        proj_hidden, proj_dim: the projection head ``F -> proj_hidden -> proj_dim``.
        temperature: the loss's temperature.
        level_weights: weights of the lesion, quality and healthy levels.
        key_momentum: ``m`` of the key encoder's update.
        bank_size: keys held by the index over all processes (each holds ``bank_size / N``).
        k: bank negatives per anchor and level.
        index_backend: ``"auto" | "torch" | "faiss"``.
        regularizer: the self-paced regulariser (``"hard"``, ``"linear"``, ``"log"``, ``"mixture"``).
        pace_start, pace_end: fractions of each level's negatives admitted at the first and the last
            step (a quantile pace).
        lr, momentum, weight_decay: SGD (Nesterov) with a cosine schedule per step.
        max_steps: the planned length of training in optimiser steps; the pace and the LR schedule
            run over it. It is a hyperparameter, not ``Trainer.max_steps``, so a run stopped early
            and resumed follows the same schedules as an uninterrupted one.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        width: float = 0.25,
        weights: str | None = None,
        proj_hidden: int = 128,
        proj_dim: int = 64,
        temperature: float = 0.2,
        level_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        key_momentum: float = 0.99,
        bank_size: int = 4096,
        k: int = 32,
        index_backend: str = "auto",
        regularizer: str = "hard",
        pace_start: float = 0.8,
        pace_end: float = 1.0,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_steps: int = 1000,
    ) -> None:
        super().__init__()
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"Expected `max_steps` to be an int >= 1, but got {max_steps!r}")
        if not 0 <= key_momentum < 1:
            raise ValueError(f"Expected `key_momentum` in [0, 1), but got {key_momentum}")
        if len(level_weights) != 3:
            raise ValueError(f"Expected `level_weights` (lesion, quality, healthy), but got {level_weights!r}")
        self.save_hyperparameters()  # plain values: the checkpoint stays weights_only-loadable
        self.model = ContrastiveModel(build_encoder(arch, width, weights), proj_hidden, proj_dim)
        self.key_model = momentum_copy(self.model)
        # Outside the module tree (see the module docstring): a list is not registered by nn.Module.
        self._criterion: list[MultiLevelContrastiveLoss] = []
        self._restored: list[dict[str, Any]] | None = None  # loss states read before the loss is built
        self._pending: tuple[Tensor, ViewTags] | None = None  # keys to enqueue after the step

    @property
    def criterion(self) -> MultiLevelContrastiveLoss:
        """The loss with its index shard and pace (built in :meth:`setup`, once the world size is known)."""
        if not self._criterion:
            raise RuntimeError("the loss is built in setup(): fit the module with a Trainer first")
        return self._criterion[0]

    @property
    def index(self) -> HardNegativeIndex:
        """This process's shard of the hard-negative index (the loss's)."""
        index = self.criterion.index
        if index is None:  # the loss is built with one; a narrowing, not an expected path
            raise RuntimeError("the loss has no hard-negative index")
        return index

    @property
    def weighting(self) -> SelfPacedWeighting:
        """The self-paced weighting shared by the three levels, with the pace."""
        weighting = self.criterion.weightings["lesion"]  # an nn.ModuleDict: typed as a plain Module
        if not isinstance(weighting, SelfPacedWeighting):
            raise RuntimeError(f"the loss's weighting is a {type(weighting).__name__}, not a SelfPacedWeighting")
        return weighting

    def _build_criterion(self, world_size: int) -> MultiLevelContrastiveLoss:
        hp = self.hparams  # read by key: Lightning types it AttributeDict | MutableMapping (no attributes)
        bank_size: int = hp["bank_size"]
        k: int = hp["k"]
        shard = -(-bank_size // world_size)
        if k > shard:
            raise ValueError(
                f"`k` ({k}) exceeds each process's bank shard of {shard} "
                f"(bank_size {bank_size} / {world_size} processes); lower k or raise bank_size"
            )
        index = HardNegativeIndex(dim=hp["proj_dim"], capacity=shard, backend=hp["index_backend"])
        pace = PaceSchedule.quantile(hp["pace_start"], hp["pace_end"], hp["max_steps"])
        levels = comcl_levels(*hp["level_weights"])
        return MultiLevelContrastiveLoss(
            levels,
            temperature=hp["temperature"],
            weighting=SelfPacedWeighting(hp["regularizer"], pace, target="negatives"),
            index=index,
            k=k,
            gather_distributed=world_size > 1,
        )

    # ------------------------------------------------------------------ set-up and checkpoints
    def setup(self, stage: str) -> None:
        """Build the loss for this run's number of processes (before Lightning restores a checkpoint)."""
        if not self._criterion:
            self._criterion.append(self._build_criterion(self.trainer.world_size))
            if self._restored is not None:
                self._load_criterion(self._restored)

    def on_fit_start(self) -> None:
        """The loss follows the module to its device."""
        self.criterion.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every process's loss state (index shard, pace) into ``checkpoint["comcl_criterion"]``."""
        state = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.criterion.state_dict().items()}
        world = self.trainer.world_size
        states: list[Any] = [state]
        if world > 1:  # Lightning calls this hook on every process and writes rank 0's checkpoint
            states = [None] * world
            dist.all_gather_object(states, state)
        checkpoint[CHECKPOINT_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Give this process its loss state back (or keep it until :meth:`setup` builds the loss)."""
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            raise ResumeError(f"the checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written by CoMCLModule")
        saved = checkpoint.get("hyper_parameters", {})
        changed = [
            f"{k}: {saved[k]!r} there, {v!r} here" for k, v in self.hparams.items() if k in saved and saved[k] != v
        ]
        if changed:  # the pace, the LR schedule and the bank would not continue the run
            raise ResumeError(f"the checkpoint was written with other hyperparameters ({'; '.join(changed)})")
        if self._criterion:
            self._load_criterion(states)
        else:
            self._restored = states

    def _load_criterion(self, states: list[dict[str, Any]]) -> None:
        world = self.trainer.world_size
        if len(states) != world:
            raise ResumeError(
                f"the checkpoint holds the index shards of {len(states)} process(es); "
                f"resume it with the same number, not {world}"
            )
        self.criterion.load_state_dict(states[self.trainer.global_rank])

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> Any:
        """SGD with Nesterov momentum and a per-step cosine schedule over ``max_steps``."""
        hp = self.hparams
        cfg = OptimConfig(name="sgd", lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        optimizer, scheduler = build_optimizer(self.model.parameters(), cfg, steps_per_epoch=hp["max_steps"], epochs=1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[Tensor, ViewTags], batch_idx: int) -> Tensor | None:
        """The CoMCL loss of one batch of four-view patches."""
        views, tags = batch
        z = self.model(views)  # (B, D), L2-normalised
        with torch.no_grad():
            keys = self.key_model(views)  # (B, D)
        loss, stats = self.criterion(z, tags)
        self._pending = (keys, tags)
        n = len(tags)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=n)
        for name, s in stats.items():
            self.log(f"loss_{name}", s.loss, batch_size=n)
        self.log("pace", float(self.weighting.schedule.last_lam), batch_size=n)
        if not loss.requires_grad:  # no level had an anchor with a positive and a negative
            return None
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then the pace and the key encoder: once per optimiser step."""
        super().optimizer_step(*args, **kwargs)
        self.criterion.step()
        momentum_update(self.key_model, self.model, self.hparams["key_momentum"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Enqueue the batch's keys into this process's index shard, after the step."""
        if self._pending is not None:
            keys, tags = self._pending
            self.index.add(keys, tags)
            self._pending = None
