"""An image file as a ``(C, H, W)`` float tensor in ``[0, 1]``, for :class:`~mlcl_losses.views.FourViewRecord` paths.

8-bit modes are scaled by 1/255 (grayscale stays one channel, everything else becomes RGB),
16-bit grayscale by 1/65535, float images must already lie in ``[0, 1]``. What cannot be read
as intensities (32-bit integers, floats outside ``[0, 1]``, a file that is not an image) is a
``ValueError`` naming the file and its mode.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["read_image_file"]

_GRAY_8 = ("L",)
_GRAY_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image_file(path: str | os.PathLike, name: str) -> Tensor:
    """Read ``path`` (any format pillow reads) as ``(C, H, W)`` float32 in ``[0, 1]``, ``C`` 1 or 3.

    Args:
        path: the image file.
        name: the record field it came from (``"image"`` or ``"degraded"``), for messages.

    Raises:
        ImportError: pillow is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an image pillow can decode, or its pixels cannot be read as
            intensities: 32-bit integers (other than a PNG's 16-bit samples), float pixels outside
            ``[0, 1]`` or not finite, or a mode pillow cannot convert.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # pragma: no cover - pillow is in the examples extra
        raise ImportError(
            f"Loading `{name}` from a file needs pillow: `pip install pillow` (or mlcl-losses[examples]); "
            "or pass a tensor or a loader callable instead"
        ) from err
    if not os.path.exists(path):
        raise FileNotFoundError(f"The `{name}` file {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_tensor(opened, path, name)
    except (UnidentifiedImageError, SyntaxError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"Expected `{name}` to be an image file pillow can read, but {os.fspath(path)!r} cannot be decoded "
            f"({type(err).__name__}: {err})"
        ) from err


def _to_tensor(img: Image, path: str | os.PathLike, name: str) -> Tensor:
    mode, where = img.mode, f"`{name}` file {os.fspath(path)!r} (pillow mode {img.mode!r})"
    if mode in _GRAY_16 or (mode == "I" and img.format == "PNG"):  # a PNG's "I" holds 16-bit samples
        gray = np.asarray(img).astype(np.float64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise ValueError(
                f"Expected 16-bit samples in [0, 65535] in the {where}, but got [{gray.min()}, {gray.max()}]"
            )
        return torch.from_numpy(gray / 65535.0).float()[None]
    if mode == "I":
        raise ValueError(
            f"Cannot read the {where} as intensities: 32-bit integer pixels have no known white level; "
            "save it as 8- or 16-bit, or as float in [0, 1], or pass a tensor"
        )
    if mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        if gray.size and not (np.isfinite(gray).all() and gray.min() >= 0.0 and gray.max() <= 1.0):
            finite = gray[np.isfinite(gray)]
            seen = f"range over [{finite.min()}, {finite.max()}]" if finite.size else "hold no finite value"
            raise ValueError(
                f"Expected float pixels in [0, 1] in the {where}, but they {seen}"
                f"{'' if finite.size == gray.size else ' and include NaN or inf'}; rescale it or pass a tensor"
            )
        return torch.from_numpy(gray.copy())[None]
    try:
        pil = img.convert("L" if mode in _GRAY_8 else "RGB")
    except ValueError as err:
        raise ValueError(f"Cannot convert the {where} to 8-bit grayscale or RGB ({err})") from err
    data = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
    channels = 1 if pil.mode == "L" else 3
    return data.view(pil.height, pil.width, channels).permute(2, 0, 1).float() / 255.0
