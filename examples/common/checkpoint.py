"""Atomic checkpoints and RNG state, for runs that resume exactly where they stopped.

A checkpoint is one ``torch.save`` file written to a temporary name in the same directory and moved
over the old one with :func:`os.replace`, so a crash mid-write never leaves a torn file. It holds
whatever state the pipeline passes (models, optimisers, schedulers, the hard-negative index, the
self-paced pace) plus the RNG states of Python, NumPy and torch.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "get_rng_state", "load_checkpoint", "save_checkpoint", "set_rng_state", "seed_everything"]

FORMAT = "mlcl_losses.examples.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or from another kind of run."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch CPU and (when present) CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the RNG states) atomically: temporary file, fsync, :func:`os.replace`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "rng": get_rng_state(), **state}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (does not restore the RNG; see :func:`set_rng_state`).

    Raises:
        CheckpointError: the file does not exist, cannot be read, or is not such a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {p}")
    try:
        # The file holds RNG states (NumPy arrays, Python tuples) besides tensors, so it is not
        # weights-only; only load checkpoints this pipeline wrote.
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as err:  # torch.load raises many types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {p} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a checkpoint of the example pipelines")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint version {state.get('version')!r}, expected {VERSION}")
    return state
