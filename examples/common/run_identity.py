"""The identity of a run: the fingerprint its checkpoints and encoders carry, and what differs from another.

A resumed run, or a reused pre-trained encoder, must have the fingerprint of the run asking for it
(method, seed, configuration, and the encoder it starts from); when it does not, the message names the
differing keys with their old and new values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from examples.common.checkpoint import CheckpointError, load_checkpoint

__all__ = ["check_resumable", "encoder_fingerprint", "refuse_mismatch", "resume_mismatch", "run_fingerprint"]


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprint(
    method: str,
    seed: int,
    identity: dict[str, Any] | None,
    pretrain_only: bool = False,
    encoder: str | None = None,
) -> str:
    """The identity of a run (checkpoints and encoders carry it; a resumed or reused one must match).

    Args:
        method: the run's method.
        seed: its training seed.
        identity: the configuration (without run-time settings).
        pretrain_only: a pre-training run (see :func:`run_pipeline`).
        encoder: the fingerprint of the encoder a fine-tuning run starts from.
    """
    return _fingerprint(
        {"method": method, "seed": seed, **(identity or {})}
        | ({} if encoder is None else {"encoder": encoder})
        | ({"pretrain_only": True} if pretrain_only else {})
    )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


def resume_mismatch(state: dict[str, Any], method: str, seed: int, identity: dict[str, Any] | None) -> str:
    """What differs between a checkpoint's run and this one: ``"pretrain.temperature: 0.1 -> 0.2; seed: 0 -> 3"``.

    Compares the stored configuration, method and seed (checkpoints written before the seed was stored
    leave it out); ``""`` when none of them differs (then the pre-trained encoder or the kind of run does).
    """
    old, new = _flat(state.get("config") or {}), _flat(identity or {})
    old |= {"method": state.get("method"), "seed": state.get("seed", seed)}
    new |= {"method": method, "seed": seed}
    missing = object()
    diffs = [
        f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(set(old) | set(new), key=lambda k: (k not in ("method", "seed"), k))
        if old.get(key, missing) != new.get(key, missing)
    ]
    return "; ".join(diffs)


def refuse_mismatch(ckpt_path: Path, state: dict[str, Any], method: str, seed: int, identity: Any) -> None:
    """Raise :class:`CheckpointError` naming what differs between ``state``'s run and this one."""
    diffs = resume_mismatch(state, method, seed, identity)
    what = f" ({diffs})" if diffs else " (another pre-trained encoder or kind of run)"
    raise CheckpointError(
        f"{ckpt_path} was written by a run with another configuration, method or seed{what}; "
        "resume with the same config and options, or use another --out"
    )


def check_resumable(
    ckpt_path: str | Path,
    method: str,
    seed: int,
    identity: dict[str, Any] | None,
    pretrain_only: bool = False,
    encoder: str | None = None,
) -> None:
    """Refuse, before any data is prepared, to resume from another run's checkpoint.

    Args:
        ckpt_path: the checkpoint to resume from.
        method, seed, identity, pretrain_only, encoder: the run asking, as for :func:`run_fingerprint`.

    Raises:
        CheckpointError: the checkpoint is unreadable or its run differs (the differing keys are named).
    """
    state = load_checkpoint(ckpt_path, map_location="cpu")
    if state.get("fingerprint") != run_fingerprint(method, seed, identity, pretrain_only, encoder):
        refuse_mismatch(Path(ckpt_path), state, method, seed, identity)


def encoder_fingerprint(path: str | Path) -> str | None:
    """The fingerprint stored in an ``encoder.pt`` (``None`` when there is no file).

    Raises:
        CheckpointError: the file is unreadable or fails its digest check (see :func:`load_checkpoint`).
    """
    if not Path(path).is_file():
        return None
    return str(load_checkpoint(path).get("fingerprint"))
