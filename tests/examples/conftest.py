"""Fixtures of the example pipelines' tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-module cache of rendered synthetic images (``data.synthetic.cache_dir``)."""
    return tmp_path_factory.mktemp("synthetic_cache")
