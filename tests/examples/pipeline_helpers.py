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


def set_args(*settings: str) -> list[str]:
    """``["--set", s1, "--set", s2, ...]``: config overrides as the command line takes them."""
    return [arg for setting in settings for arg in ("--set", setting)]


def assert_clear_error(
    main: Callable[[list[str]], int], config: Path, out: Path, args: list[str], err: Callable[[], str], message: str
) -> None:
    """``main`` (on ``config`` unless ``args`` give ``--config``) exits 2 with ``message`` and no traceback on stderr.

    ``err`` returns what was written to stderr (``lambda: capsys.readouterr().err``).
    """
    base = ["--config", str(config)] if "--config" not in args else []
    assert main([*base, "--out", str(out), *args]) == 2
    text = err()
    assert message in text
    assert "Traceback" not in text


def read_metrics(out: Path) -> dict[str, Any]:
    """``OUT/metrics.json``."""
    return json.loads((out / "metrics.json").read_text())


def real_photograph_eyeq(root: Path, n_train: int = 8, n_test: int = 4, size: int = 128) -> list[tuple[str, int]]:
    """A tiny EyeQ dataset in the published layout made from the real photograph ``skimage.data.retina()``.

    Each image is the photograph resized to ``size`` px, flipped and rotated by its index; images of
    grade >= 1 get dark red dots (microaneurysm-like) drawn on. Returns ``(name, grade)`` of the train rows.
    """
    import numpy as np
    from PIL import Image, ImageDraw
    from skimage import data as skimage_data

    base = Image.fromarray(skimage_data.retina()).resize((size, size), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(0)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    train: list[tuple[str, int]] = []
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            img = base.rotate(90 * (i % 4))
            if i % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            grade = i % 5
            draw = ImageDraw.Draw(img)
            for _ in range(3 * grade):
                x, y = rng.integers(size // 4, 3 * size // 4, 2)
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(90, 10, 8))
            name = f"{200 + i}_{'left' if i % 2 else 'right'}.{'jpeg' if i % 3 == 0 else 'png'}"
            img.save(root / split / name)
            rows[split].append(f"{i},{name},{i % 3},{grade}")
            if split == "train":
                train.append((name, grade))
    for split in ("train", "test"):
        (root / f"Label_EyeQ_{split}.csv").write_text(",image,quality,DR_grade\n" + "\n".join(rows[split]) + "\n")
    return train


def assert_run_files_known(out: Path) -> None:
    """Every file a run or comparison wrote into ``out`` is in ``RUN_FILES``, so ``--overwrite`` removes it all."""
    from examples.common.rundir import RUN_FILES, clear_run

    written = {p.name for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    assert written - set(RUN_FILES) == set()
    clear_run(out)
    assert list(out.iterdir()) == []
