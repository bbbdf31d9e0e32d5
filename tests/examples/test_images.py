"""Tests of examples/common/images.py: image files as float tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from examples.common.images import load_image
from PIL import Image


def test_load_image_rgb_gray_and_resize(tmp_path: Path) -> None:
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[2, 3] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "f.png")
    x = load_image(tmp_path / "f.png")
    assert x.shape == (3, 6, 8)
    assert x.dtype == torch.float32
    assert x[:, 2, 3].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    assert x[0, 0, 0] == 1.0
    g = load_image(tmp_path / "f.png", mode="L", size=(3, 4))
    assert g.shape == (1, 3, 4)
    assert float(g.min()) >= 0.0
    assert float(g.max()) <= 1.0
    assert load_image(tmp_path / "f.png", size=5).shape == (3, 5, 5)


def test_load_image_gray_to_rgb_and_16_bit(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 128, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", mode="RGB")
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x, torch.full((3, 4, 4), 128 / 255))
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(tmp_path / "x16.png")
    y = load_image(tmp_path / "x16.png", mode="L")
    assert y.shape == (1, 4, 5)
    torch.testing.assert_close(y, torch.ones(1, 4, 5))


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"cannot decode image .*corrupt\.png"):
        load_image(tmp_path / "corrupt.png")
    buf = tmp_path / "full.jpeg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buf)
    (tmp_path / "truncated.jpeg").write_bytes(buf.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.jpeg"):
        load_image(tmp_path / "truncated.jpeg")
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="Expected `mode`"):
        load_image(tmp_path / "ok.png", mode="CMYK")  # type: ignore[arg-type]
    for size in (0, (2, 0), (2.0, 3), True, (1, 2, 3)):
        with pytest.raises(ValueError, match="`size`"):
            load_image(tmp_path / "ok.png", size=size)  # type: ignore[arg-type]
