"""The FAISS backend of the index: exact flat search or IVF on CPU, ``knn_gpu`` on CUDA.

On CPU the backend runs FAISS's exact inner-product search (the ``IndexFlatIP`` kernel,
``faiss.knn`` on a zero-copy NumPy view of the buffer), or an ``IndexIVFFlat`` when ``ivf_nlist``
is given (approximate, ``nprobe`` lists probed), on float32 banks. On CUDA (needs
``faiss.get_num_gpus() > 0``) it calls ``faiss.knn_gpu`` directly on the torch buffer (no copy),
on float32 / float16 banks.

Tag filtering is exact: FAISS cannot mask inside its kernel, so the backend searches *per tag
group*. The entries passing the predicate (and, for label exclusion, not carrying the query's
label) are gathered into a contiguous sub-bank per distinct query label (on CPU one block of
``chunk_size`` slots at a time, merged into a running top-k, so the bank is never copied whole),
which is searched with an over-fetch of ``k`` plus a margin; rows that lose hits to the per-query
source / image exclusion are searched again with a doubled fetch until they hold ``k`` valid hits
or the sub-bank is exhausted.

What the backend does about FAISS's behaviour (the measurements are in
``docs/hard_negative_index.md``, "Measured facts about FAISS and what the index does"):

* **BLAS threshold.** ``faiss-cpu``'s exact search takes a slow non-BLAS (one query at a time)
  path when ``n_queries * dim < faiss.cvar.distance_compute_blas_threshold``, which a training
  batch of a few hundred anchors falls under. The backend forces the BLAS path (threshold 0) for
  the duration of its own FAISS calls, under a lock, and restores the global value afterwards.
* **OpenMP spin-waiting.** faiss-cpu ships its own ``libgomp`` next to torch's, and the idle
  threads of one OpenMP pool spin on the cores the other needs. ``OMP_WAIT_POLICY`` is read when
  the runtimes load (``import torch``), so a library cannot (and must not) set it; the backend
  logs an INFO hint at the first FAISS use when it is unset on a machine with at most 4 cores.
* **GPU indexes cannot overwrite in place.** A ``GpuIndexFlatIP`` only appends, so a ring buffer
  would re-add the whole bank after every wrap-around. The GPU path therefore builds no FAISS
  index: it calls ``faiss.knn_gpu`` (brute force, ``bfKnn``) on the torch ring buffer through
  ``faiss.contrib.torch_utils``.
* **FAISS GPU top-k is limited to** ``k <= 2048`` (:data:`FAISS_GPU_MAX_K`). Searches (including
  the over-fetch of a filtered search) that need more hits per query finish on the exact torch
  backend.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from mlcl_losses.index.backend import pad_hits
from mlcl_losses.index.filters import SearchFilter
from mlcl_losses.index.torch_backend import TorchBackend

__all__ = ["FAISS_GPU_MAX_K", "FaissBackend", "faiss_available", "faiss_gpu_available"]

logger = logging.getLogger("mlcl_losses.index")  # the index package's one logger

#: FAISS GPU k-selection limit (``faiss::gpu::getMaxKSelection()``).
FAISS_GPU_MAX_K = 2048

_FAISS_LOCK = threading.Lock()
_OMP_HINT_LOGGED = False


def _import_faiss(backend: str) -> Any:
    """Import FAISS lazily, with an error that says what to install and what works without it."""
    global _OMP_HINT_LOGGED
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            f"backend={backend!r} needs FAISS, which is not installed. Install it with "
            "`pip install mlcl-losses[faiss]` (faiss-cpu; or faiss-gpu for CUDA), "
            "or use backend='torch', which works without it."
        ) from err
    if not _OMP_HINT_LOGGED:
        _OMP_HINT_LOGGED = True
        if "OMP_WAIT_POLICY" not in os.environ and (os.cpu_count() or 1) <= 4:
            logger.info(
                "OMP_WAIT_POLICY is unset: on few cores the OpenMP pools of faiss and torch spin-wait against "
                "each other and FAISS timings become erratic; export OMP_WAIT_POLICY=PASSIVE before starting Python."
            )
    return faiss


def faiss_available() -> bool:
    """Whether FAISS can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """Whether FAISS is installed with GPU support and sees at least one GPU."""
    try:
        import faiss
    except ImportError:
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and int(get_num_gpus()) > 0


@contextlib.contextmanager
def _faiss_blas_always(faiss: Any) -> Iterator[None]:
    """Force faiss-cpu's BLAS path for exact search (see the module docstring), then restore."""
    with _FAISS_LOCK:
        old = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 0
        try:
            yield
        finally:
            faiss.cvar.distance_compute_blas_threshold = old


class FaissBackend:
    """FAISS: exact flat search on CPU, IVF on CPU, or ``knn_gpu`` on CUDA; over-fetch for exclusions.

    Args:
        device: the bank's device (CPU or CUDA).
        ivf_nlist: CPU only: lists of an ``IndexIVFFlat`` searched instead of the exact kernel; None: exact.
        nprobe: IVF lists probed per query.
        torch_fallback: the exact backend that finishes searches beyond :data:`FAISS_GPU_MAX_K` hits
            (its ``chunk_size`` also sets the block of the CPU filtered search).

    Raises:
        ImportError: FAISS is not installed, or on CUDA it has no GPU support or sees no GPU.
        ValueError: ``ivf_nlist`` on CUDA.
    """

    name = "faiss"

    def __init__(self, device: torch.device, ivf_nlist: int | None, nprobe: int, torch_fallback: TorchBackend):
        self.faiss = _import_faiss("faiss")
        self.gpu = device.type == "cuda"
        self.ivf_nlist = ivf_nlist
        self.nprobe = nprobe
        self.torch_fallback = torch_fallback
        self._ivf: Any = None  # trained IndexIVFFlat holding the slots [0, size) by id, or None
        self._ivf_size = 0
        self._ivf_quantizer: Any = None
        self._gpu_res: Any = None
        if self.gpu:
            if not faiss_gpu_available():
                raise ImportError(
                    "backend='faiss' on a CUDA device needs FAISS with GPU support and a visible GPU "
                    "(faiss.get_num_gpus() > 0); install faiss-gpu (`pip install mlcl-losses[faiss-gpu]`) "
                    "or use backend='torch', which works without it."
                )
            if ivf_nlist is not None:
                raise ValueError("`ivf_nlist` is supported by the FAISS CPU backend only, but the index is on CUDA")
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

            self._gpu_res = self.faiss.StandardGpuResources()

    # ---------------------------------------------------------------- ring-buffer maintenance (IVF)
    def reset(self) -> None:
        """Forget the IVF index (retrained at the next search): the bank was emptied or replaced."""
        self._ivf = None
        self._ivf_size = 0

    def on_add(self, slots: Tensor, vectors: Tensor, size: int) -> None:
        """Follow the ring buffer in the IVF index: ``vectors`` were written to ``slots``, ``size`` entries now."""
        if self._ivf is None:
            return
        ids = slots.cpu().numpy()
        overwritten = slots[slots < self._ivf_size].cpu().numpy()
        if overwritten.size:
            overwritten = overwritten.astype("int64")  # a hashtable direct map removes by IDSelectorArray only
            self._ivf.remove_ids(self.faiss.IDSelectorArray(overwritten.size, self.faiss.swig_ptr(overwritten)))
        self._ivf.add_with_ids(vectors.detach().float().cpu().contiguous().numpy(), ids)
        self._ivf_size = size

    def _ivf_index(self, bank: Tensor) -> Any:
        """The IVF index over the bank, trained on the first search with enough entries; None before."""
        if self.ivf_nlist is None:
            return None
        size = bank.shape[0]
        if self._ivf is None or self._ivf_size != size:
            if size < 39 * self.ivf_nlist:
                return None  # too few points to train nlist centroids: exact search meanwhile
            faiss = self.faiss
            data = bank.detach().float().cpu().contiguous().numpy()
            quantizer = faiss.IndexFlatIP(data.shape[1])
            ivf = faiss.IndexIVFFlat(quantizer, data.shape[1], self.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.train(data)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            ivf.add_with_ids(data, torch.arange(size).numpy())
            self._ivf, self._ivf_quantizer, self._ivf_size = ivf, quantizer, size
            logger.info("Trained IndexIVFFlat(nlist=%d) on %d bank entries", self.ivf_nlist, size)
        return self._ivf

    # ---------------------------------------------------------------- kernels: (queries, k) -> (D, I) over a sub-bank
    def _flat_kernel(self, sub: Tensor) -> tuple[Callable[[Tensor, int], tuple[Tensor, Tensor]], int]:
        faiss = self.faiss
        if self.gpu:
            res = self._gpu_res

            def gpu_kernel(q: Tensor, kk: int) -> tuple[Tensor, Tensor]:
                return faiss.knn_gpu(res, q.to(sub.dtype).contiguous(), sub, kk, metric=faiss.METRIC_INNER_PRODUCT)

            return gpu_kernel, FAISS_GPU_MAX_K
        xb = sub.detach().contiguous().numpy()

        def cpu_kernel(q: Tensor, kk: int) -> tuple[Tensor, Tensor]:
            xq = q.detach().float().contiguous().numpy()
            with _faiss_blas_always(faiss):
                d, i = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
            return torch.from_numpy(d), torch.from_numpy(i)

        return cpu_kernel, sub.shape[0]

    def _chunked_kernel(self, bank: Tensor, allowed: Tensor) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
        """Exact CPU search of the allowed slots, gathered block by block (extra memory: one block), hits as slots.

        Each block of ``rows`` slots is gathered, searched (``faiss.knn``) and merged into a running
        top-k; equal similarities in different blocks keep the lower slot first. A bank of one block
        is one ``faiss.knn`` call over the whole sub-bank.
        """
        faiss, rows = self.faiss, self.torch_fallback.chunk_size or max(1024, (1 << 21) // bank.shape[1])

        def kernel(q: Tensor, kk: int) -> tuple[Tensor, Tensor]:
            xq = q.detach().float().contiguous().numpy()
            best: tuple[Tensor, Tensor] | None = None
            for start in range(0, allowed.numel(), rows):
                ids = torch.nonzero(allowed[start : start + rows]).squeeze(1) + start
                if ids.numel() == 0:
                    continue
                xb = bank.detach().index_select(0, ids).numpy()
                with _faiss_blas_always(faiss):
                    d, i = faiss.knn(xq, xb, min(kk, ids.numel()), metric=faiss.METRIC_INNER_PRODUCT)
                s, slots = torch.from_numpy(d), ids[torch.from_numpy(i)]
                if best is not None:  # a stable sort after the earlier blocks: ties keep the lower slot
                    s, pos = torch.sort(torch.cat([best[0], s], dim=1), dim=1, descending=True, stable=True)
                    s, slots = s[:, :kk], torch.gather(torch.cat([best[1], slots], dim=1), 1, pos[:, :kk])
                best = (s, slots)
            assert best is not None  # the caller searches only non-empty sub-banks
            return best

        return kernel

    def _ivf_kernel(self, ivf: Any, allowed: Tensor | None) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
        faiss = self.faiss
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        keep_alive: list[Any] = []  # SWIG does not hold references: the bitmap and selector must outlive the search
        if allowed is not None:
            import numpy as np

            bitmap = np.packbits(allowed.cpu().numpy(), bitorder="little")
            sel = faiss.IDSelectorBitmap(allowed.numel(), faiss.swig_ptr(bitmap))
            params.sel = sel
            keep_alive += [bitmap, sel]

        def kernel(q: Tensor, kk: int) -> tuple[Tensor, Tensor]:
            d, i = ivf.search(q.detach().float().cpu().contiguous().numpy(), kk, params=params)
            _ = keep_alive  # referenced so the closure keeps the selector alive
            return torch.from_numpy(d), torch.from_numpy(i)

        return kernel

    # ---------------------------------------------------------------- search
    def search(self, bank: Tensor, queries: Tensor, k: int, flt: SearchFilter) -> tuple[Tensor, Tensor]:
        """``(N, k)`` float32 similarities and int64 slots of the ``k`` best allowed entries of ``bank``."""
        n, size, device = queries.shape[0], bank.shape[0], queries.device
        ivf = self._ivf_index(bank)
        if flt.label is not None:
            q_label, b_label = flt.label
            groups = [(q_label == value, b_label != value) for value in torch.unique(q_label)]
        else:
            groups = [(None, None)]
        out_s, out_i = pad_hits(None, None, n, k, device)  # rows whose sub-bank is empty stay padded
        for rows, bank_keep in groups:
            allowed = flt.allowed
            if bank_keep is not None:
                allowed = bank_keep if allowed is None else allowed & bank_keep
            m = size if allowed is None else int(torch.count_nonzero(allowed))  # entries of the sub-bank
            if m == 0:
                continue
            q = queries if rows is None else queries[rows]
            excl = [(qv if rows is None else qv[rows], bv) for qv, bv in flt.exclusions]
            to_slot = None
            if ivf is not None:
                kernel, max_k = self._ivf_kernel(ivf, allowed), m
            elif allowed is not None and not self.gpu:
                kernel, max_k = self._chunked_kernel(bank, allowed), m
            else:
                to_slot = None if allowed is None else torch.nonzero(allowed).squeeze(1)  # (m,) slots of the sub-bank
                kernel, max_k = self._flat_kernel(bank if to_slot is None else bank.index_select(0, to_slot))
            s, i = self._overfetch(kernel, q, k, m, max_k, excl, to_slot, bank, allowed)
            if rows is None:
                out_s, out_i = s, i
            else:
                out_s[rows], out_i[rows] = s, i
        return out_s, out_i

    def _overfetch(
        self,
        kernel: Callable[[Tensor, int], tuple[Tensor, Tensor]],
        q: Tensor,
        k: int,
        m: int,
        max_k: int,
        excl: list[tuple[Tensor, Tensor]],
        to_slot: Tensor | None,
        bank: Tensor,
        allowed: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Search ``q`` for ``k`` hits that pass the per-query exclusions, fetching more where needed."""
        n, device = q.shape[0], q.device
        fetch = min(m, k + (max(8, k // 4) if excl else 0))
        if not excl and fetch <= max_k:
            # Nothing to filter per query: one call, whose hits FAISS already returns sorted.
            d, i = kernel(q, fetch)
            d, i = d.to(device).float(), i.to(device)
            missing = i < 0  # FAISS marks absent hits (IVF lists ran out) with -1
            slots = i if to_slot is None else to_slot[i.clamp(min=0)]
            if bool(missing.any()):
                d, slots = d.masked_fill(missing, -math.inf), slots.masked_fill(missing, -1)
            return (d, slots) if fetch == k else pad_hits(d, slots, n, k, device)
        out_s = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
        out_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
        todo = torch.arange(n, device=device)
        while todo.numel() > 0:
            if fetch > max_k:  # FAISS GPU k-selection limit: finish these rows exactly with torch
                flt = SearchFilter(allowed, [(qv[todo], bv) for qv, bv in excl], None)
                s, i = self.torch_fallback.search(bank, q[todo], k, flt)
                out_s[todo], out_i[todo] = s, i
                break
            d, i = kernel(q[todo], fetch)
            d, i = d.to(device).float(), i.to(device)
            local_valid = i >= 0
            slots = i.clamp(min=0) if to_slot is None else to_slot[i.clamp(min=0)]
            valid = local_valid.clone()
            for qv, bv in excl:
                valid &= bv[slots] != qv[todo][:, None]
            d = d.masked_fill(~valid, -math.inf)
            top_s, pos = torch.topk(d, min(k, fetch), dim=1)
            top_i = torch.gather(slots, 1, pos)
            top_s, top_i = pad_hits(top_s, top_i, todo.numel(), k, device)
            # A row is done when it has k valid hits, the sub-bank is exhausted, or FAISS ran out (IVF lists).
            n_valid = valid.sum(dim=1)
            done = (n_valid >= k) | (fetch >= m) | (~local_valid).any(dim=1)
            out_s[todo[done]], out_i[todo[done]] = top_s[done], top_i[done]
            todo = todo[~done]
            fetch = min(m, 2 * fetch)
        return out_s, out_i
