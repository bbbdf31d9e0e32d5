"""Run a function on CPU processes of one gloo process group (127.0.0.1) and collect what each rank returned.

The distributed tests (``tests/distributed/``, ``tests/test_pml_distributed.py``) start their ranks
once with :func:`run_on_ranks` and compare what the ranks saw with one process on the whole batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, scenarios: Callable[[int], dict[str, Any]], world: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(scenarios(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(
    scenarios: Callable[[int], dict[str, Any]], world: int, out_dir: Path, *, weights_only: bool
) -> list[dict[str, Any]]:
    """``scenarios(rank)`` on ``world`` spawned processes (a module-level function); what each returned."""
    mp.spawn(_worker, args=(scenarios, world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=weights_only) for r in range(world)]
