"""Atomic, verified checkpoints and RNG state, for runs that resume exactly where they stopped.

A checkpoint is one ``torch.save`` file holding four entries:

* ``format`` and ``version`` (:data:`FORMAT`, :data:`VERSION`);
* ``payload``: the bytes of a second ``torch.save`` of the run's state (models, optimisers,
  schedulers, the hard-negative index, the self-paced pace, plus the RNG states of Python, NumPy and
  torch), as a ``uint8`` tensor;
* ``sha256``: the SHA-256 digest of those bytes.

Every part is made of tensors and plain Python types (the RNG states too), so both levels load with
``torch.load(..., weights_only=True)``: a crafted file cannot run code when it is read. The digest is
checked before the payload is unpickled, so a file changed on disk (a flipped byte in a tensor) is
refused instead of resuming silently. The file is written to a temporary name in the same directory,
flushed to disk (``fsync``) and moved over the old one with :func:`os.replace`, so a crash mid-write
never leaves a torn file.

:func:`load_checkpoint` is the public reader (also for tools that only want the trained weights).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "write_durably",
]

FORMAT = "mlcl_losses.examples.checkpoint"
VERSION = 2  # 1: pickled RNG states (NumPy arrays), no digest


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, or from another kind of run or format version."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch CPU and (when present) CUDA, as tensors and plain types.

    Returns:
        ``{"python": {"version", "state" (625,) int64, "gauss"}, "numpy": {"name", "key" (624,) int64,
        "pos", "has_gauss", "cached_gaussian"}, "torch": uint8 tensor[, "cuda": [uint8 tensor, ...]]}``.
    """
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_durably(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write a file atomically and durably: ``write(f)`` into a temporary file, ``fsync``, :func:`os.replace`.

    The directory entry is synced too (where the platform allows), so after a crash or power loss
    the file is either the old one or the new one, complete.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _serialise(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the RNG states) with its SHA-256 digest, atomically and durably.

    Args:
        path: the checkpoint file (its directory is created).
        state: tensors and plain Python types only (what ``weights_only=True`` loads); CUDA tensors
            are stored as they are and come back on ``map_location``.

    Raises:
        CheckpointError: ``state`` holds an object ``torch.load(weights_only=True)`` would refuse.
    """
    payload = _serialise({"rng": get_rng_state(), **state})
    try:  # refuse to write what could not be read back safely
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot save checkpoint {path}: the state is not weights-only loadable ({err})") from err
    outer = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    data = _serialise(outer)
    write_durably(path, lambda f: f.write(data))


def _legacy_version(p: Path) -> Any:
    """The ``version`` of a checkpoint written before format 2 (its NumPy RNG state needs NumPy's globals).

    Still ``weights_only=True``: only NumPy's array reconstruction is allowed, which runs no code.
    """
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            old = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(old, dict) and old.get("format") == FORMAT:
        return old.get("version")
    return None


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; never runs code from the file.

    Both the file and its payload are loaded with ``weights_only=True``, and the payload's SHA-256
    digest is checked before it is unpickled. The RNG states are returned, not restored (see
    :func:`set_rng_state`).

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default CPU).

    Returns:
        The ``state`` given to :func:`save_checkpoint` plus ``"rng"``: nested dicts/lists of tensors
        and plain Python types. The pipelines' checkpoints hold ``fingerprint``, ``method``,
        ``stage`` (``"pretrain"`` or ``"finetune"``), ``epoch`` and ``pretrain`` or ``finetune``
        (each with a ``"model"`` state dict).

    Raises:
        CheckpointError: the file does not exist, cannot be read, is not such a checkpoint, is of
            another format version, or its payload does not match its digest.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {p}")
    try:
        outer = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a corrupt or unsafe file
        old = _legacy_version(p)
        if old is not None:
            raise CheckpointError(
                f"{p}: checkpoint format version {old!r}, but this code reads version {VERSION}; "
                "start the run again (--overwrite) or use the version of the code that wrote it"
            ) from err
        if not zipfile.is_zipfile(p):  # e.g. a YAML file given as the run; torch's message would advise unpickling
            raise CheckpointError(
                f"cannot read checkpoint {p}: it is not a checkpoint (not the zip archive torch.save writes; "
                "expected a run's checkpoint.pt)"
            ) from err
        first = str(err).split(". ", 1)[0].splitlines()[0] if str(err) else ""  # not torch's advice to unpickle
        raise CheckpointError(f"cannot read checkpoint {p} safely ({type(err).__name__}: {first})") from err
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a checkpoint of the example pipelines")
    if outer.get("version") != VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {outer.get('version')!r}, but this code reads version {VERSION}; "
            "start the run again (--overwrite) or use the version of the code that wrote it"
        )
    payload, digest = outer.get("payload"), outer.get("sha256")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or not isinstance(digest, str):
        raise CheckpointError(f"{p} is not a checkpoint of the example pipelines (no payload or digest)")
    data = payload.contiguous().numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"{p} is corrupted: the SHA-256 digest of its payload does not match the one recorded when it "
            "was written; refusing to use it (to resume or to predict)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read the payload of checkpoint {p} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: the payload is a {type(state).__name__}, expected a dict")
    return state
