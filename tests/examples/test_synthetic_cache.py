"""Tests of examples/common/synthetic_cache.py: cache names, one-thread rendering, train/test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from examples.common.synthetic_cache import (
    SyntheticSetsConfig,
    render_in_one_thread,
    render_train_test,
    synthetic_cache_path,
)

CALLS: list[tuple[int, int]] = []


def _render(n: int, size: int, seed: int, index: int, copies: int, severity: tuple[float, float]) -> dict[str, Any]:
    CALLS.append((seed, index))
    out: dict[str, Any] = {
        "clean": torch.full((1, size, size), index, dtype=torch.uint8),
        "boxes": torch.zeros(index % 2, 4),
        "quality": index % 3,
        "threads": torch.get_num_threads(),
    }
    if copies:
        out["view_degraded"] = torch.full((copies, 1, size, size), seed % 256, dtype=torch.uint8)
    return out


def test_cache_file_names_stay_as_users_caches_have_them(tmp_path: Path) -> None:
    path = synthetic_cache_path(tmp_path, "fundus", 16, 64, 7, 1, (0.3, 1.0), 2)
    assert path == tmp_path / "fundus_v2_n16_s64_seed7_c1_sev0.3-1.pt"
    assert (
        synthetic_cache_path(tmp_path, "chest", 16, 48, 8, 0, (0.3, 1.0), 1).name
        == "chest_v1_n16_s48_seed8_c0_sevnone.pt"
    )


def test_render_in_one_thread_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    item = render_in_one_thread((_render, 4, 8, 0, 1, 0, (0.0, 0.0)))
    assert item["threads"] == 1
    assert torch.get_num_threads() == threads


def test_render_train_test_renders_once_then_reads_the_cache(tmp_path: Path) -> None:
    sets = SyntheticSetsConfig(n_train=3, n_test=2, seed=10, n_view_copies=2, cache_dir=str(tmp_path), workers=1)
    CALLS.clear()
    train, test, train_seed = render_train_test(_render, "toy", 1, "toy images", "toy", sets, 1, 8, (0.2, 0.5))
    assert train_seed == 12  # data_draw_seeds: seed + 2 s
    assert sorted(CALLS) == [(12, 0), (12, 1), (12, 2), (13, 0), (13, 1)]
    assert train["clean"].shape == (3, 1, 8, 8)
    assert train["view_degraded"].shape == (2, 3, 1, 8, 8)  # (copies, N, C, S, S)
    assert [b.shape[0] for b in train["boxes"]] == [0, 1, 0]  # boxes stay a list
    assert train["quality"].tolist() == [0, 1, 2]
    assert "view_degraded" not in test
    assert {p.name for p in tmp_path.iterdir()} == {
        "toy_v1_n3_s8_seed12_c2_sev0.2-0.5.pt",
        "toy_v1_n2_s8_seed13_c0_sevnone.pt",
    }
    CALLS.clear()
    again, _, _ = render_train_test(_render, "toy", 1, "toy images", "toy", sets, 1, 8, (0.2, 0.5))
    assert CALLS == []
    assert torch.equal(again["clean"], train["clean"])
