"""Image files as float tensors, for both pipelines (colour fundus photographs, grayscale radiographs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from examples.common.boxes import PathLike, existing_file

if TYPE_CHECKING:
    import torch

# torch, numpy and PIL are imported inside load_image, so importing this module is quick.

__all__ = ["load_image"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(
    path: PathLike,
    mode: Literal["RGB", "L"] = "RGB",
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Load an image file as a float tensor.

    8-bit images are scaled by 1/255; 16-bit grayscale (some ChestX-ray14 PNGs) by 1/65535.
    Palette, alpha and grayscale inputs are converted to ``mode``.

    Args:
        path: image file (any format PIL reads: PNG, JPEG, ...).
        mode: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        size: output ``(H, W)``, or an int for a square; ``None`` keeps the file's size. Resized
            bilinearly with antialiasing.

    Returns:
        ``(C, H, W)`` float32 in ``[0, 1]``, ``C`` 3 for RGB and 1 for L.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: a bad ``mode`` or ``size``, or a file PIL cannot decode (corrupt or truncated;
            the message names the path).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image, UnidentifiedImageError

    if mode not in ("RGB", "L"):
        raise ValueError(f"Expected `mode` in ('RGB', 'L'), but got {mode!r}")
    out_size: tuple[int, int] | None
    if size is None:
        out_size = None
    elif isinstance(size, int) and not isinstance(size, bool):
        out_size = (size, size)
    elif (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        out_size = (size[0], size[1])
    else:
        raise ValueError(f"Expected `size` to be None, an int or an (H, W) pair of ints, but got {size!r}")
    if out_size is not None and min(out_size) <= 0:
        raise ValueError(f"Expected `size` > 0, but got {size!r}")
    p = existing_file(path, "image")
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode in _SIXTEEN_BIT_MODES:
                gray = np.asarray(img, dtype=np.float32) / 65535.0  # (H, W)
                arr = gray[None] if mode == "L" else np.repeat(gray[None], 3, axis=0)
            else:
                arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
                arr = arr[None] if mode == "L" else arr.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {p} ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(np.ascontiguousarray(arr)).clamp_(0.0, 1.0)
    if out_size is not None and tuple(x.shape[1:]) != out_size:
        x = F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()
