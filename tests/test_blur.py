"""Tests of the separable Gaussian blur shared by the degradations and the renderers (mlcl_losses._blur)."""

from __future__ import annotations

import pytest
import torch

from mlcl_losses._blur import gaussian_blur, gaussian_kernel1d

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("shape", "sigma"), [((2, 3, 17, 12), 0.6), ((1, 1, 40, 33), 2.5), ((1, 2, 5, 6), 3.0)])
def test_gaussian_blur_equals_2d_convolution(shape: tuple[int, ...], sigma: float) -> None:
    """The separable shifted-copy blur equals a float64 2-D convolution with the outer-product kernel."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel1d(sigma, torch.device("cpu"), torch.float64)
    r = k.numel() // 2
    mode = "reflect" if r < min(shape[-2:]) else "replicate"  # replicate where reflect cannot pad
    padded = torch.nn.functional.pad(x.double(), (r, r, r, r), mode=mode)
    c = shape[1]
    expected = torch.nn.functional.conv2d(padded, torch.outer(k, k).expand(c, 1, -1, -1), groups=c)
    assert torch.allclose(gaussian_blur(x, sigma).double(), expected, atol=1e-6)
