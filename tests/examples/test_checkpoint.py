"""Checkpoint safety: weights-only loading, the SHA-256 digest, format versions, RNG state, durable writes."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.common.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    write_durably,
)

MARKER_NAME = "pwned"


class _Evil:
    """Unpickling this calls ``Path.touch`` on the marker file: the code-execution a checkpoint must never allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_rng_state_is_weights_only_and_restores_every_generator() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # tensors and plain types only
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_roundtrip_every_part_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(6.0)}, "epoch": 2, "times": {"pretrain_s": 1.5}})
    outer = torch.load(path, weights_only=True)
    assert outer["format"] == FORMAT
    assert outer["version"] == VERSION
    assert len(outer["sha256"]) == 64
    state = load_checkpoint(path)
    assert state["epoch"] == 2
    assert state["times"] == {"pretrain_s": 1.5}
    torch.testing.assert_close(state["model"]["w"], torch.arange(6.0))


def test_state_that_is_not_weights_only_is_refused_when_saving(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not weights-only loadable"):
        save_checkpoint(tmp_path / "c.pt", {"obj": _Evil(tmp_path / MARKER_NAME)})
    assert not (tmp_path / "c.pt").exists()
    assert not (tmp_path / MARKER_NAME).exists()


def test_malicious_pickle_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "version": VERSION, "evil": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*checkpoint.pt safely"):
        load_checkpoint(path)
    assert not marker.exists()
    # plain pickle (not a torch zip file) that would run code
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_malicious_payload_with_a_matching_digest_does_not_run(tmp_path: Path) -> None:
    import hashlib

    marker = tmp_path / MARKER_NAME
    buf = io.BytesIO()
    torch.save({"evil": _Evil(marker)}, buf)
    payload = buf.getvalue()
    outer = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(outer, path)
    with pytest.raises(CheckpointError, match="cannot read the payload"):
        load_checkpoint(path)
    assert not marker.exists()


def _flip_inside(path: Path, needle: bytes, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, "the tensor's bytes are not in the file"
    data[at + offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    w = torch.linspace(0.1, 0.9, 64)
    save_checkpoint(path, {"model": {"w": w}})
    _flip_inside(path, w.numpy().tobytes()[:32])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupted: the SHA-256 digest"):
        load_checkpoint(path)


def test_flipped_digest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"x": torch.ones(3)})
    digest = torch.load(path, weights_only=True)["sha256"].encode()
    _flip_inside(path, digest, offset=0)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_older_format_version_is_refused_naming_both(tmp_path: Path) -> None:
    # a version-1 file: pickled NumPy RNG state (not weights-only loadable), no digest
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "version": 1, "rng": {"numpy": np.random.get_state()}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=f"format version 1, but this code reads version {VERSION}"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "version": 99, "payload": torch.zeros(1, dtype=torch.uint8), "sha256": ""}, path)
    with pytest.raises(CheckpointError, match=f"format version 99, but this code reads version {VERSION}"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"x": 1}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(other)


def test_write_durably_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def fail(f: io.BufferedWriter) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_durably(path, fail)
    assert path.read_bytes() == b"old"  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temporary left
    write_durably(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
