"""One case of ``test_loss.py::test_memory_with_an_index_does_not_grow_with_capacity``, in its own process.

Prints, as JSON, how far the resident set grows above its level before the measured step
(``VmHWM`` after a reset through ``/proc/self/clear_refs``, minus ``VmRSS``) during one
forward+backward with an index of the given capacity: of ``MultiLevelContrastiveLoss``
(``"loss"``), and of ``multilevel_info_nce`` given the index's whole buffer and candidates
into it (``"functional"``). Backend ``torch``: the index holds 4096 entries; ``faiss`` (exact,
CPU): the index is full, so the search's own memory (it gathers the allowed entries block by
block) is part of the step.

Usage: ``python tests/loss_memory_case.py CAPACITY [torch|faiss]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mlcl_losses.functional import multilevel_info_nce
from mlcl_losses.index import HardNegativeIndex
from mlcl_losses.levels import comcl_levels
from mlcl_losses.loss import MultiLevelContrastiveLoss
from mlcl_losses.tags import ViewTags

DIM, FILLED, BOXES, K = 32, 4096, 8, 16


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(capacity: int, backend: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    filled, chunk = (capacity, 1 << 14) if backend == "faiss" else (FILLED, None)
    if backend == "faiss":
        import faiss

        faiss.omp_set_num_threads(1)
    index = HardNegativeIndex(dim=DIM, capacity=capacity, backend=backend, chunk_size=chunk)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    index.add(
        torch.randn(filled, DIM, generator=gen),
        ViewTags(
            kind=torch.randint(0, 2, (filled,), generator=gen),
            quality=torch.randint(0, 2, (filled,), generator=gen),
            source=torch.arange(filled) + 1000,
        ),
    )
    kind, quality, source = [], [], []
    for b in range(BOXES):  # V1a, V1b, V2 of a lesion box, V3, V4 of a healthy patch
        kind += [1, 1, 1, 0, 0]
        quality += [0, 0, 1, 0, 1]
        source += [2 * b, 2 * b, 2 * b, 2 * b + 1, 2 * b + 1]
    tags = ViewTags(kind=kind, quality=quality, source=source)
    z0 = torch.randn(len(tags), DIM, generator=gen)
    levels = comcl_levels()
    criterion = MultiLevelContrastiveLoss(levels, index=index, k=K)
    candidates = [torch.randint(0, FILLED, (len(tags), K), generator=gen) for _ in levels]

    def step(mode: str) -> None:
        z = z0.clone().requires_grad_(True)
        if mode == "loss":
            loss, _ = criterion(z, tags)
        else:
            loss, _ = multilevel_info_nce(z, tags, levels, bank=(index.embeddings, index.tags), candidates=candidates)
        loss.backward()

    growth = {}
    for mode in ("loss", "functional"):
        step(mode)
        step(mode)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = rss_kib("VmRSS")
        step(mode)
        growth[mode] = rss_kib("VmHWM") - base
    print(json.dumps({"growth_kib": growth, "bank_kib": capacity * DIM * 4 // 1024}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "torch")
