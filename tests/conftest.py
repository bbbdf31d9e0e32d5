"""Shared test configuration: device from TORCH_DEVICE, hypothesis profiles, TF32 off."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Exact comparisons need full float32 matmuls on GPUs that would otherwise use TF32.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError(f"TORCH_DEVICE={DEVICE} but CUDA is not available")


@pytest.fixture
def device() -> torch.device:
    """The device tests run on (TORCH_DEVICE, default cpu)."""
    return DEVICE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` when no GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
