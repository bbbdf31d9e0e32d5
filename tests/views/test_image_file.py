"""Image files of a FourViewRecord (mlcl_losses.views._image_file): bit depths, float images, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from views_cases import BOXES, P

from mlcl_losses.views import FourViewDataset, FourViewRecord, FourViewSampler
from mlcl_losses.views.dataset import _load

Image = pytest.importorskip("PIL.Image")


def read_image_file(path: Path, name: str) -> torch.Tensor:
    """What a record with a file path gives (the dataset's loader)."""
    return _load(str(path), name)


def _save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_sixteen_bit_png_is_scaled_by_65535(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    x = read_image_file(_save(ramp, tmp_path / "ramp16.png"), "image")
    assert x.shape == (1, 64, 64)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(ramp / 65535.0).float(), atol=1e-7, rtol=0)
    assert float((x == 1.0).float().mean()) < 0.01  # not clipped to white


def test_float_tiff_in_unit_interval_is_kept(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    x = read_image_file(_save(ramp, tmp_path / "ramp.tif"), "image")
    assert torch.equal(x[0], torch.from_numpy(ramp))


def test_eight_bit_files_keep_their_channels(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    assert torch.equal(read_image_file(_save(gray, tmp_path / "g.png"), "image")[0], torch.from_numpy(gray) / 255.0)
    x = read_image_file(_save(rgb, tmp_path / "c.png"), "image")
    assert torch.equal(x, torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)


@pytest.mark.parametrize(
    ("array", "suffix", "match"),
    [
        (np.full((8, 8), 2.0, dtype=np.float32), "tif", r"float pixels in \[0, 1\].*mode 'F'.*\[2.0, 2.0\]"),
        (np.full((8, 8), np.nan, dtype=np.float32), "tif", r"mode 'F'.*NaN or inf"),
        (np.arange(64, dtype=np.int32).reshape(8, 8) * 100_000, "tif", r"mode 'I'.*32-bit integer"),
    ],
    ids=["float-above-one", "float-nan", "int32"],
)
def test_uninterpretable_pixels_are_refused(tmp_path: Path, array: np.ndarray, suffix: str, match: str) -> None:
    path = _save(array, tmp_path / f"bad.{suffix}")
    with pytest.raises(ValueError, match=match) as info:
        read_image_file(path, "degraded")
    assert "`degraded` file" in str(info.value)
    assert str(path) in str(info.value)


def test_a_record_whose_file_is_not_an_image_is_one_value_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    data = FourViewDataset([FourViewRecord(image=str(path), boxes=BOXES)], FourViewSampler(patch_size=P))
    with pytest.raises(ValueError, match=r"Expected `image` to be an image file pillow can read, but '.*notes.png'"):
        data[0]
    with pytest.raises(FileNotFoundError, match=r"`image` file '.*missing.png' does not exist"):
        read_image_file(tmp_path / "missing.png", "image")
