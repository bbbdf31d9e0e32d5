"""Helpers the end-to-end tests of the example pipelines (EyeQ, ChestX-ray14) share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_tiny(main: Callable[[list[str]], int], config: Path, out: Path, cache: Path, *extra: str) -> int:
    """Run a pipeline's ``main`` on ``config`` into ``out``, with the synthetic cache in ``cache``, no TensorBoard."""
    return main(
        [
            "--config",
            str(config),
            "--out",
            str(out),
            "--set",
            f"data.synthetic.cache_dir={cache}",
            "--set",
            "run.tensorboard=false",
            *extra,
        ]
    )


def read_metrics(out: Path) -> dict[str, Any]:
    """``OUT/metrics.json``."""
    return json.loads((out / "metrics.json").read_text())
