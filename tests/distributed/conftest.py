"""The ``ranks`` fixture of the distributed tests: what each of two gloo ranks saw, one spawn per session."""

from __future__ import annotations

from typing import Any

import pytest
from distributed_cases import WORLD, scenarios

from gloo_ranks import run_on_ranks


@pytest.fixture(scope="session")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two ranks saw (one spawn for all the distributed tests)."""
    return run_on_ranks(scenarios, WORLD, tmp_path_factory.mktemp("distributed"), weights_only=False)
