"""Multi-process runs of the pipelines under ``torchrun`` (one process per GPU, or several on a CPU).

``torchrun --nproc_per_node=N examples/eyeq/train.py ...`` starts N copies of the script with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in the environment;
:func:`setup` joins the process group (NCCL on CUDA, gloo on CPU). Without ``torchrun`` (or with
``WORLD_SIZE=1``) every helper here is a no-op and a run is exactly the single-process run.

What changes with N processes:

* **Batches are global.** ``pretrain.batch_images`` and ``finetune.batch_size`` are the batch of
  the whole job; each rank loads ``batch / N`` (an error if N does not divide it). The
  contrastive loss all-gathers the embeddings (``gather_distributed=True``), so negatives span the
  global batch, and the learning rates of the config stay valid without scaling.
* **Data is split without overlap.** Training uses :class:`torch.utils.data.DistributedSampler`
  with ``drop_last=True`` (equal shards, so every rank runs the same number of steps; each epoch
  leaves out at most N - 1 items of its permutation). Evaluation uses :class:`EvalShardSampler`:
  every test image exactly once, predictions gathered and put back in dataset order, so the
  metrics are those of one process over the whole test set.
* **Gradients are averaged** with one all-reduce per step (:func:`average_gradients`) instead of
  wrapping the models in ``DistributedDataParallel``: the momentum key encoder, the frozen-encoder
  epochs of fine-tuning and the checkpoints then see the same modules as in one process. DDP
  overlaps this all-reduce with the backward pass; on a few GPUs the difference is small against
  a contrastive step. BatchNorm statistics are per rank during an epoch (the key encoder's batch
  statistics are therefore per rank, like the query encoder's) and averaged over ranks at the end
  of each epoch (:func:`average_buffers`).
* **The hard-negative index is sharded**: each rank enqueues its own keys into a shard of
  ``ceil(bank_size / N)`` entries and the loss searches all shards (:mod:`mlcl_losses.distributed`).
* **Rank 0 writes** logs, metrics and checkpoints; a checkpoint holds every rank's index shard, so
  one atomic file still restores the whole job (resume with the same N).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "DistInfo",
    "EvalShardSampler",
    "all_gather_objects",
    "average_buffers",
    "average_gradients",
    "barrier",
    "broadcast_module",
    "check_in_sync",
    "gather_in_order",
    "info",
    "local_batch",
    "main_first",
    "mean_over_ranks",
    "setup",
    "teardown",
    "train_sampler",
]


_CREATED = False  # whether setup() initialised the process group


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0


def info() -> DistInfo:
    """The current job (a single process unless a process group with several ranks is initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str) -> tuple[DistInfo, str]:
    """Join the process group ``torchrun`` describes in the environment; returns the job and this rank's device.

    With ``WORLD_SIZE`` unset or 1 nothing happens and ``device`` is returned as is. On CUDA each rank
    takes ``cuda:LOCAL_RANK`` (NCCL); on CPU the ranks share the cores (gloo).

    Raises:
        ValueError: ``WORLD_SIZE > 1`` with a device other than ``cpu`` / ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
    elif device == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"run.device: multi-process runs need 'cpu' or 'cuda', but got {device!r}")
    if not dist.is_initialized():
        # long timeout: the other ranks wait in a barrier while rank 0 renders the synthetic data
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
        global _CREATED
        _CREATED = True
    return DistInfo(rank, world, local), device


def teardown() -> None:
    """Leave the process group if :func:`setup` created it (one made by the caller is left alone)."""
    global _CREATED
    if _CREATED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED = False


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if info().enabled:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. renders and caches data), then the others (which find the cache)."""
    job = info()
    if job.enabled and not job.is_main:
        dist.barrier()
    yield
    if job.enabled and job.is_main:
        dist.barrier()


def local_batch(global_batch: int, key: str) -> int:
    """This rank's share of a global batch size; ``key`` names the config value in the error."""
    world = info().world_size
    if global_batch % world:
        raise ValueError(f"{key}: the global batch {global_batch} must be divisible by the {world} processes")
    return global_batch // world


def train_sampler(dataset: Any, seed: int) -> DistributedSampler[int] | None:
    """Disjoint, equal, shuffled shards of ``dataset`` (call ``set_epoch``); None in a single process."""
    job = info()
    if not job.enabled:
        return None
    return DistributedSampler(dataset, job.world_size, job.rank, shuffle=True, seed=seed, drop_last=True)


class EvalShardSampler(Sampler[int]):
    """Items ``rank, rank + N, rank + 2N, ...``: every item on exactly one rank, in dataset order."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; tensors should be on the CPU)."""
    job = info()
    if not job.enabled:
        return [obj]
    out: list[Any] = [None] * job.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(parts: tuple[Tensor, ...], length: int) -> tuple[Tensor, ...]:
    """Concatenate every rank's :class:`EvalShardSampler` rows of ``parts`` back into dataset order."""
    job = info()
    if not job.enabled:
        return parts
    shards = all_gather_objects(tuple(p.cpu() for p in parts))
    order = torch.cat([torch.arange(r, length, job.world_size) for r in range(job.world_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return tuple(torch.cat([s[i] for s in shards])[inverse] for i in range(len(parts)))


def _flat_all_reduce(tensors: list[Tensor], average: bool) -> None:
    """Sum (or average) ``tensors`` over ranks in place, one all-reduce per dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        if average:
            flat /= dist.get_world_size()
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def average_gradients(module: nn.Module) -> None:
    """Replace each parameter's gradient by its mean over ranks (call after ``backward``; no-op in one process).

    Every rank must hold gradients for the same parameters (true when every rank runs the same step).
    """
    job = info()
    if not job.enabled:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        _flat_all_reduce(grads, average=True)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks; no-op in one process."""
    job = info()
    if not job.enabled:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        _flat_all_reduce(buffers, average=True)


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op in one process)."""
    if not info().enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def check_in_sync(module: nn.Module, what: str) -> None:
    """Raise if ``module``'s parameters or buffers differ between ranks (they must after averaging)."""
    job = info()
    if not job.enabled:
        return
    digest = [float(t.double().sum()) for t in [*module.parameters(), *module.buffers()]]
    digests = all_gather_objects(digest)
    if any(d != digests[0] for d in digests):
        raise RuntimeError(f"{what} differs between ranks: the ranks did not run the same steps")


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each statistic averaged over ranks (every rank ran the same number of equal batches)."""
    job = info()
    if not job.enabled:
        return stats
    per_rank = all_gather_objects(stats)
    keys = [k for k in stats if all(k in s for s in per_rank)]
    return {k: math.fsum(float(s[k]) for s in per_rank) / job.world_size for k in keys}
