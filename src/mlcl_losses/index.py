"""Hard-negative index: a tagged ring buffer of past embeddings with exact, tag-filtered top-k search.

:class:`HardNegativeIndex` keeps the last ``capacity`` embeddings (keys of a momentum encoder, or
detached embeddings) and their :class:`~mlcl_losses.tags.ViewTags` on the device
(``docs/architecture.md``, ``docs/hard_negative_index.md``). For each query it returns the ``k``
most similar entries among the allowed negatives: entries passing a tag predicate (a
:class:`~mlcl_losses.levels.Select` or a :class:`~mlcl_losses.levels.Level`'s negative selector)
that share neither the query's ``source``, ``image`` nor (where asked) ``label``.

Backends (one interface, chosen by ``backend=``):

==============  =============================================================================
``"torch"``     exact; ``matmul`` + ``topk`` over chunks of the bank with a running top-k
                merge, so a 4M-entry bank never allocates ``N x 4M``; disallowed entries are
                set to ``-inf`` *before* the top-k. CPU and CUDA, float32 / float16 /
                bfloat16 banks. The fallback everywhere.
``"faiss"``     FAISS. On CPU: exact inner-product search (the ``IndexFlatIP`` kernel,
                ``faiss.knn`` on a zero-copy NumPy view of the buffer), or ``IndexIVFFlat`` when
                ``ivf_nlist`` is given (approximate, ``nprobe`` lists probed). On CUDA (needs
                ``faiss.get_num_gpus() > 0``): ``faiss.knn_gpu`` directly on the torch
                buffer (no copy). Float32 banks on CPU; float32 / float16 on GPU.
``"auto"``      CPU: ``"faiss"`` (exact) when FAISS is installed and the bank is float32,
                else ``"torch"``. CUDA: ``"faiss"`` when FAISS has GPUs, else ``"torch"``.
                The choice is logged (``logging.getLogger("mlcl_losses.index")``).
==============  =============================================================================

Tag filtering is exact in every backend: a filter never drops a true top-k neighbour. The torch
path masks before the top-k. The FAISS paths search *per tag group*: the entries passing the
predicate (and, for label exclusion, not carrying the query's label) are gathered into a
contiguous sub-bank per distinct query label (on CPU one block of ``chunk_size`` slots at a time,
merged into a running top-k, so the bank is never copied whole), which is searched with an
over-fetch of ``k`` plus a margin; rows that lose hits to the per-query source / image exclusion
are searched again with a doubled fetch until they hold ``k`` valid hits or the sub-bank is
exhausted.

Measured facts about FAISS and what the index does about them (2-core AMD EPYC VM, faiss-cpu
1.15.1, torch 2.14.1; ``docs/hard_negative_index.md`` has the tables):

* **BLAS threshold.** ``faiss-cpu``'s exact search takes a slow non-BLAS (SIMD, one query at a
  time) path when ``n_queries * dim < faiss.cvar.distance_compute_blas_threshold`` (128000 in
  1.15.1, i.e. fewer than 1000 queries at ``dim = 128``). Measured at 131k bank entries,
  ``k = 64``: 512 queries took 1958 ms on the default path and 197 ms on the BLAS path (10x);
  999 queries 3486 ms vs 514 ms. The index therefore forces the BLAS path (threshold 0) for the
  duration of its own FAISS calls, under a lock, and restores the global value afterwards.
* **OpenMP spin-waiting.** faiss-cpu ships its own ``libgomp`` next to torch's, so two OpenMP
  pools (plus OpenBLAS's threads) share the cores; idle threads of one pool spin and steal the
  cores the other needs. In one run of 13 searches (65536 entries, 4096 queries) FAISS took
  939 / 1285 / 3943 ms (min / median / max, cv 0.56) with ``OMP_WAIT_POLICY`` unset and
  1203 / 1878 / 2197 ms (cv 0.22) with ``PASSIVE``; repeats on the then heavily shared machine
  did not separate the two. The variable is read when the OpenMP runtimes load (``import torch``),
  so the index cannot (and a library must not) set it; it logs an INFO hint at the first FAISS use
  when it is unset on a machine with at most 4 cores. Set it in the launcher.
* **GPU indexes cannot overwrite in place.** A ``GpuIndexFlatIP`` only appends (``add``) and has
  no cheap in-place update, so a ring buffer would re-add the whole bank after every wrap-around.
  The GPU path therefore never builds a FAISS index: it calls ``faiss.knn_gpu`` (brute force,
  ``bfKnn``) on the torch ring buffer through ``faiss.contrib.torch_utils``, no copy.
* **FAISS GPU top-k is limited to** ``k <= 2048``. Searches (including the over-fetch of a
  filtered search) that need more than 2048 hits per query run on the exact torch path instead.

.. py:type:: Backend
   :canonical: typing.Literal['auto', 'torch', 'faiss']

   The ``backend`` option (type alias).

Examples:
    >>> import torch
    >>> from mlcl_losses.levels import Select
    >>> from mlcl_losses.tags import ViewTags
    >>> index = HardNegativeIndex(dim=4, capacity=8, backend="torch")
    >>> bank = torch.eye(4).repeat(2, 1)  # (8, 4)
    >>> tags = ViewTags(kind=[0, 1] * 4, quality=[0] * 8, source=list(range(8)))
    >>> index.add(bank, tags)
    >>> len(index)
    8
    >>> hits = index.search(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), k=2, negatives=Select(kind=0))
    >>> hits.indices.tolist()
    [[0, 4]]
    >>> hits = index.search(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), k=2, exclude_source=torch.tensor([0]))
    >>> hits.indices[0, 0].item(), hits.similarities[0, 0].item()
    (4, 1.0)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import ViewTags

__all__ = ["FAISS_GPU_MAX_K", "HardNegativeIndex", "SearchResult", "faiss_available", "faiss_gpu_available"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "faiss"]
_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")
_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: FAISS GPU k-selection limit (``faiss::gpu::getMaxKSelection()``).
FAISS_GPU_MAX_K = 2048

_FAISS_LOCK = threading.Lock()
_OMP_HINT_LOGGED = False


class SearchResult(NamedTuple):
    """Hits of :meth:`~mlcl_losses.index.HardNegativeIndex.search`, best first.

    Attributes:
        similarities: ``(N, k)`` float32 inner products (cosine when the index normalises);
            ``-inf`` at padded positions.
        indices: ``(N, k)`` int64 slot indices into the ``embeddings`` buffer of
            :class:`~mlcl_losses.index.HardNegativeIndex`; ``-1`` at padded positions.
        tags: ``(N, k)`` :class:`~mlcl_losses.tags.ViewTags` of the hits; every field is ``-1``
            at padded positions (built with ``validate=False``).
    """

    similarities: Tensor
    indices: Tensor
    tags: ViewTags


# ---------------------------------------------------------------------------------------------- FAISS


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


# ---------------------------------------------------------------------------------------------- helpers


def _merge_topk(
    best_s: Tensor | None, best_i: Tensor | None, sims: Tensor, idx: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge a running ``(N, k)`` top-k with new candidates ``(N, c)`` (both sorted or not)."""
    if best_s is None or best_i is None:
        s, i = sims, idx
    else:
        s, i = torch.cat([best_s, sims], dim=1), torch.cat([best_i, idx], dim=1)
    kk = min(k, s.shape[1])
    top_s, pos = torch.topk(s, kk, dim=1)
    return top_s, torch.gather(i, 1, pos)


def _pad(sims: Tensor | None, idx: Tensor | None, n: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pad a top-k result to ``(n, k)`` with ``-inf`` / ``-1``; entries at ``-inf`` get index ``-1``."""
    out_s = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
    out_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
    if sims is not None and idx is not None and sims.shape[1] > 0:
        c = min(k, sims.shape[1])
        out_s[:, :c] = sims[:, :c].float()
        out_i[:, :c] = idx[:, :c]
    out_i[torch.isneginf(out_s)] = -1
    return out_s, out_i


class _Filter(NamedTuple):
    """A search's filter over the valid prefix ``[0, size)`` of the bank."""

    allowed: Tensor | None  # (size,) bool: passes the tag predicate; None = all
    exclusions: list[tuple[Tensor, Tensor]]  # [(query values (N,), bank values (size,))]: never equal
    label: tuple[Tensor, Tensor] | None  # label exclusion (query (N,), bank (size,)), kept apart for grouping


# ---------------------------------------------------------------------------------------------- backends


class _TorchBackend:
    """Exact chunked ``matmul`` + ``topk`` with masking before the top-k."""

    name = "torch"

    def __init__(self, chunk_size: int | None) -> None:
        self.chunk_size = chunk_size

    def _chunk_rows(self, n_queries: int, size: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # Keep the (N, chunk) float32 similarity block around 64 MiB.
        rows = (1 << 24) // max(1, n_queries)
        return int(min(max(rows, 1024), 1 << 16, max(size, 1)))

    def search(self, bank: Tensor, queries: Tensor, k: int, flt: _Filter) -> tuple[Tensor, Tensor]:
        size, n = bank.shape[0], queries.shape[0]
        compute_dtype = bank.dtype if bank.is_cuda else torch.float32
        q = queries.to(compute_dtype)
        exclusions = list(flt.exclusions) + ([flt.label] if flt.label is not None else [])
        rows = self._chunk_rows(n, size)
        best_s: Tensor | None = None
        best_i: Tensor | None = None
        for start in range(0, size, rows):
            stop = min(start + rows, size)
            chunk = bank[start:stop].to(compute_dtype)
            sims = (q @ chunk.T).float()  # (N, C)
            if flt.allowed is not None or exclusions:
                keep = torch.ones_like(sims, dtype=torch.bool)
                if flt.allowed is not None:
                    keep &= flt.allowed[None, start:stop]
                for qv, bv in exclusions:
                    keep &= qv[:, None] != bv[None, start:stop]
                sims.masked_fill_(~keep, -math.inf)
            kk = min(k, stop - start)
            top_s, top_pos = torch.topk(sims, kk, dim=1)
            best_s, best_i = _merge_topk(best_s, best_i, top_s, top_pos + start, k)
        return _pad(best_s, best_i, n, k, queries.device)


class _FaissBackend:
    """FAISS: exact flat search on CPU, IVF on CPU, or ``knn_gpu`` on CUDA; over-fetch for exclusions."""

    name = "faiss"

    def __init__(self, device: torch.device, ivf_nlist: int | None, nprobe: int, torch_fallback: _TorchBackend):
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
        self._ivf = None
        self._ivf_size = 0

    def on_add(self, slots: Tensor, vectors: Tensor, size: int) -> None:
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
    def search(self, bank: Tensor, queries: Tensor, k: int, flt: _Filter) -> tuple[Tensor, Tensor]:
        n, size, device = queries.shape[0], bank.shape[0], queries.device
        ivf = self._ivf_index(bank)
        if flt.label is not None:
            q_label, b_label = flt.label
            groups = [(q_label == value, b_label != value) for value in torch.unique(q_label)]
        else:
            groups = [(None, None)]
        out_s, out_i = _pad(None, None, n, k, device)  # rows whose sub-bank is empty stay padded
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
            return (d, slots) if fetch == k else _pad(d, slots, n, k, device)
        out_s = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
        out_i = torch.full((n, k), -1, dtype=torch.int64, device=device)
        todo = torch.arange(n, device=device)
        while todo.numel() > 0:
            if fetch > max_k:  # FAISS GPU k-selection limit: finish these rows exactly with torch
                flt = _Filter(allowed, [(qv[todo], bv) for qv, bv in excl], None)
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
            top_s, top_i = _pad(top_s, top_i, todo.numel(), k, device)
            # A row is done when it has k valid hits, the sub-bank is exhausted, or FAISS ran out (IVF lists).
            n_valid = valid.sum(dim=1)
            done = (n_valid >= k) | (fetch >= m) | (~local_valid).any(dim=1)
            out_s[todo[done]], out_i[todo[done]] = top_s[done], top_i[done]
            todo = todo[~done]
            fetch = min(m, 2 * fetch)
        return out_s, out_i


# ---------------------------------------------------------------------------------------------- the index


class HardNegativeIndex(nn.Module):
    """A ring buffer of embeddings and their tags with exact, tag-filtered top-k search.

    Args:
        dim: embedding dimension ``D``.
        capacity: number of slots ``M``; adding past it overwrites the oldest entries.
        device: where the buffers live (default CPU). Moving the module with ``.to()`` works too.
        backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see the module docstring).
        dtype: dtype of the embedding buffer: float32, float16 or bfloat16 (FAISS on CPU:
            float32 only; FAISS on GPU: float32 or float16).
        normalize: L2-normalise added embeddings and queries, so similarity = cosine.
        ivf_nlist: FAISS CPU only: search an ``IndexIVFFlat`` with this many lists instead of
            exact search (approximate; for banks of millions). Trained on the bank at the first
            search with at least ``39 * ivf_nlist`` entries (exact search until then) and retrained
            after :meth:`reset` / :meth:`~torch.nn.Module.load_state_dict`. Keeps its own copy of the bank.
        nprobe: IVF lists probed per query.
        chunk_size: bank rows per block: of the torch backend's ``matmul`` (default: about 64 MiB
            of similarities per block), and of the exact FAISS CPU path's filtered search, which
            gathers the allowed entries of one block at a time (default: about 8 MiB of rows).

    Buffers (changed under ``torch.no_grad()``): ``embeddings`` ``(M, D)`` of ``dtype`` and the
    tag fields ``(M,)`` int64. Slots not yet filled hold zeros; only indices returned by
    :meth:`search` are meaningful. The valid entries are always the slots ``[0, len(self))``.

    Examples:
        >>> import torch
        >>> from mlcl_losses.tags import ViewTags
        >>> index = HardNegativeIndex(dim=2, capacity=3, backend="torch")
        >>> index.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ViewTags([0, 0], [0, 0], [0, 1]))
        >>> index.add(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), ViewTags([0, 0], [0, 0], [2, 3]))
        >>> len(index), index.tags.source.tolist()  # slot 0 was overwritten by source 3
        (3, [3, 1, 2])
        >>> index.search(torch.tensor([[1.0, 0.0]]), k=3).indices.tolist()
        [[2, 1, 0]]
    """

    embeddings: Tensor
    _kind: Tensor
    _quality: Tensor
    _source: Tensor
    _label: Tensor
    _image: Tensor

    def __init__(
        self,
        dim: int,
        capacity: int,
        device: torch.device | str | None = None,
        backend: Backend = "auto",
        dtype: torch.dtype = torch.float32,
        normalize: bool = True,
        ivf_nlist: int | None = None,
        nprobe: int = 16,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"Expected `{name}` > 0, but got {value}")
        if backend not in _BACKENDS:
            raise ValueError(f"Expected `backend` in {_BACKENDS}, but got {backend!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"Expected `dtype` in {[str(d) for d in _DTYPES]}, but got {dtype}")
        if ivf_nlist is not None and (not isinstance(ivf_nlist, int) or ivf_nlist <= 0):
            raise ValueError(f"Expected `ivf_nlist` to be a positive int or None, but got {ivf_nlist!r}")
        if ivf_nlist is not None and backend != "faiss":
            raise ValueError(f"`ivf_nlist` needs backend='faiss', but got backend={backend!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"Expected `normalize` to be a bool, but got {type(normalize).__name__}")
        for name, option in (("nprobe", nprobe), ("chunk_size", chunk_size)):
            if option is None and name == "chunk_size":
                continue
            if isinstance(option, bool) or not isinstance(option, int):
                raise TypeError(f"Expected `{name}` to be an int, but got {type(option).__name__}")
            if option <= 0:
                raise ValueError(f"Expected `{name}` > 0, but got {option}")
        self.dim, self.capacity, self.normalize = dim, capacity, normalize
        self.backend, self.ivf_nlist, self.nprobe = backend, ivf_nlist, nprobe
        device = torch.device("cpu") if device is None else torch.device(device)
        self.register_buffer("embeddings", torch.zeros(capacity, dim, dtype=dtype, device=device))
        for name in ("_kind", "_quality", "_source", "_label", "_image"):
            self.register_buffer(name, torch.zeros(capacity, dtype=torch.int64, device=device))
        self._ptr = 0
        self._size = 0
        self._has_label: bool | None = None  # set by the first add
        self._has_image: bool | None = None
        self._torch_backend = _TorchBackend(chunk_size)
        self._backends: dict[tuple[str, str], _TorchBackend | _FaissBackend] = {}
        self._backend_for(self.embeddings)  # resolve now: fail early, log the choice

    # ------------------------------------------------------------------ backend choice
    def _backend_for(self, bank: Tensor) -> _TorchBackend | _FaissBackend:
        key = (bank.device.type, str(bank.dtype))
        if key in self._backends:
            return self._backends[key]
        device, dtype = bank.device, bank.dtype
        chosen: _TorchBackend | _FaissBackend
        if self.backend == "torch":
            chosen = self._torch_backend
        elif self.backend == "faiss":
            self._check_faiss_dtype(device, dtype)
            chosen = _FaissBackend(device, self.ivf_nlist, self.nprobe, self._torch_backend)
        else:  # auto
            if device.type == "cuda":
                use_faiss = dtype in (torch.float32, torch.float16) and faiss_gpu_available()
            else:
                use_faiss = dtype == torch.float32 and device.type == "cpu" and faiss_available()
            chosen = _FaissBackend(device, None, self.nprobe, self._torch_backend) if use_faiss else self._torch_backend
            logger.info("HardNegativeIndex(backend='auto') on %s/%s uses the %r backend", device, dtype, chosen.name)
        self._backends[key] = chosen
        return chosen

    @staticmethod
    def _check_faiss_dtype(device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cuda":
            if dtype not in (torch.float32, torch.float16):
                raise ValueError(f"backend='faiss' on CUDA needs a float32 or float16 bank, but `dtype` is {dtype}")
        elif device.type != "cpu":
            raise ValueError(f"backend='faiss' runs on CPU or CUDA, but the index is on {device}")
        elif dtype != torch.float32:
            raise ValueError(
                f"backend='faiss' on CPU needs a float32 bank, but `dtype` is {dtype}; use backend='torch' for it"
            )

    @property
    def backend_name(self) -> str:
        """The backend that searches the bank on its current device and dtype."""
        return self._backend_for(self.embeddings).name

    # ------------------------------------------------------------------ container
    def __len__(self) -> int:
        """Number of valid entries, at most ``capacity``."""
        return self._size

    @property
    def tags(self) -> ViewTags:
        """``(capacity,)`` tags of the slots (zeros where not yet filled; ``label`` / ``image`` None if absent)."""
        return ViewTags(
            self._kind,
            self._quality,
            self._source,
            self._label if self._has_label else None,
            self._image if self._has_image else None,
            validate=False,
        )

    def extra_repr(self) -> str:
        """Sizes, fill level and requested backend."""
        return (
            f"dim={self.dim}, capacity={self.capacity}, size={self._size}, dtype={self.embeddings.dtype}, "
            f"backend={self.backend!r}, normalize={self.normalize}"
        )

    # ------------------------------------------------------------------ validation
    def _check_vectors(self, name: str, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Expected `{name}` of shape (N, {self.dim}), but got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"Expected `{name}` to have a floating-point dtype, but got {x.dtype}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"Expected finite `{name}`, but row {bad} holds NaN or inf")
        x = x.detach().to(self.embeddings.device)
        if self.normalize:
            x = nn.functional.normalize(x.float(), dim=1)
        return x

    def _check_exclude(self, name: str, value: Tensor | None, n: int) -> Tensor | None:
        if value is None:
            return None
        if not isinstance(value, Tensor):
            raise TypeError(f"Expected `{name}` to be an int64 tensor of shape ({n},) or None, but got {type(value)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"Expected `{name}` to have an integer dtype, but got {value.dtype}")
        if value.shape != (n,):
            raise ValueError(
                f"`{name}` and `queries` must have the same length, got shape {tuple(value.shape)} for {n} queries"
            )
        return value.to(device=self.embeddings.device, dtype=torch.int64)

    # ------------------------------------------------------------------ mutation
    @torch.no_grad()
    def add(self, embeddings: Tensor, tags: ViewTags) -> None:
        """Write a batch into the ring buffer, overwriting the oldest entries once full.

        Args:
            embeddings: ``(B, D)`` float, finite; L2-normalised here when ``normalize=True``.
                Detached and cast to the buffer's dtype and device.
            tags: ``(B,)`` tags of the batch. ``label`` / ``image`` must be present in every
                batch or in none (fixed by the first add after construction or :meth:`reset`).

        If ``B > capacity`` only the newest (last) ``capacity`` rows are kept.

        Raises:
            TypeError: ``embeddings`` not a float tensor, or ``tags`` not a :class:`~mlcl_losses.tags.ViewTags`.
            ValueError: a shape that is not ``(B, D)``, a row with NaN or inf, an all-zero row (it has
                no direction: no cosine similarity is defined for it), tags of another length, or
                optional tags other than the bank's.
        """
        if not isinstance(tags, ViewTags):
            raise TypeError(f"Expected `tags` to be a ViewTags, but got {type(tags).__name__}")
        x = self._check_vectors("embeddings", embeddings)
        b = x.shape[0]
        zero = (x == 0).all(dim=1)
        if b and bool(zero.any()):
            raise ValueError(
                "Expected `embeddings` rows with a non-zero norm (a bank entry needs a direction), "
                f"but row {int(zero.nonzero()[0, 0])} is all zeros"
            )
        if tags.shape != (b,):
            raise ValueError(
                f"`embeddings` and `tags` must have the same length, got {b} and shape {tuple(tags.shape)}"
            )
        has_label, has_image = tags.label is not None, tags.image is not None
        if self._has_label is None or self._size == 0:
            self._has_label, self._has_image = has_label, has_image
        elif (has_label, has_image) != (self._has_label, self._has_image):
            raise ValueError(
                f"Every batch added to the index must carry the same optional tags: the bank has "
                f"label={self._has_label}, image={self._has_image}, but `tags` has label={has_label}, image={has_image}"
            )
        if b == 0:
            return
        fields = tags.to(self.embeddings.device).fields()
        if b > self.capacity:  # only the newest `capacity` rows survive
            x = x[b - self.capacity :]
            fields = {k: None if v is None else v[b - self.capacity :] for k, v in fields.items()}
            b = self.capacity
        slots = (self._ptr + torch.arange(b, device=x.device)) % self.capacity
        self.embeddings.index_copy_(0, slots, x.to(self.embeddings.dtype))
        for name in ("kind", "quality", "source", "label", "image"):
            value = fields[name]
            target = getattr(self, "_" + name)
            target.index_copy_(0, slots, torch.zeros_like(slots) if value is None else value)
        self._ptr = (self._ptr + b) % self.capacity
        self._size = min(self._size + b, self.capacity)
        for backend in self._backends.values():
            if isinstance(backend, _FaissBackend):
                backend.on_add(slots, self.embeddings.index_select(0, slots), self._size)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the index: zero the buffers, rewind the write pointer."""
        self.embeddings.zero_()
        for name in ("_kind", "_quality", "_source", "_label", "_image"):
            getattr(self, name).zero_()
        self._ptr, self._size = 0, 0
        self._has_label = self._has_image = None
        for backend in self._backends.values():
            if isinstance(backend, _FaissBackend):
                backend.reset()

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, int]:
        """Write pointer, fill level and optional-tag flags (plain ints, ``weights_only`` loadable)."""
        return {
            "ptr": self._ptr,
            "size": self._size,
            "capacity": self.capacity,
            "dim": self.dim,
            "has_label": -1 if self._has_label is None else int(self._has_label),
            "has_image": -1 if self._has_image is None else int(self._has_image),
        }

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """As :class:`~torch.nn.Module`'s, but the extra state is required even with ``strict=False``.

        Without it the buffers would be loaded into an index whose fill level says it is empty.

        Raises:
            ValueError: ``state_dict`` has no ``{prefix}_extra_state``.
        """
        key = prefix + "_extra_state"
        if key not in state_dict:
            raise ValueError(
                f"Expected `state_dict` to hold {key!r} (the index's write pointer and fill level, written by "
                "HardNegativeIndex.state_dict()), but it is missing; strict=False does not make it optional: "
                "load a complete state dict of the index"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def set_extra_state(self, state: Any) -> None:
        """Inverse of :meth:`get_extra_state`."""
        if not isinstance(state, dict):
            raise TypeError(f"Expected the index's extra state to be a dict, but got {type(state).__name__}")
        if (state.get("capacity"), state.get("dim")) != (self.capacity, self.dim):
            raise ValueError(
                f"State of an index with capacity={state.get('capacity')}, dim={state.get('dim')} cannot be "
                f"loaded into one with capacity={self.capacity}, dim={self.dim}"
            )
        ptr, size = int(state["ptr"]), int(state["size"])
        if not (0 <= ptr < self.capacity and 0 <= size <= self.capacity):
            raise ValueError(f"Expected 0 <= ptr < {self.capacity} and 0 <= size <= {self.capacity}, got {ptr}, {size}")
        self._ptr, self._size = ptr, size
        flags = [None if int(state[name]) < 0 else bool(state[name]) for name in ("has_label", "has_image")]
        self._has_label, self._has_image = flags
        for backend in self._backends.values():
            if isinstance(backend, _FaissBackend):
                backend.reset()

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search(
        self,
        queries: Tensor,
        k: int,
        negatives: Select | Level | None = None,
        exclude_source: Tensor | None = None,
        exclude_image: Tensor | None = None,
        exclude_label: Tensor | None = None,
    ) -> SearchResult:
        """The ``k`` most similar allowed entries for each query, best first.

        Args:
            queries: ``(N, D)`` float, finite; L2-normalised here when ``normalize=True``.
            k: hits per query, ``1 <= k <= capacity``.
            negatives: which entries may be returned: a :class:`~mlcl_losses.levels.Select`, a
                :class:`~mlcl_losses.levels.Level` (its ``negatives`` selector; nothing at all
                when ``level.bank_negatives`` is False; ``exclude_label`` required when
                ``level.needs_label``) or None (every entry).
            exclude_source: ``(N,)`` int64 or None: entries with the query's source are never returned.
            exclude_image: ``(N,)`` int64 or None: likewise for the image (needs image tags in the bank).
            exclude_label: ``(N,)`` int64 or None: likewise for the label (needs label tags in the bank).

        Returns:
            :class:`SearchResult` with ``(N, k)`` float32 similarities, int64 slot indices and
            tags; rows with fewer than ``k`` allowed entries are padded with ``-inf`` / ``-1``.
        """
        q = self._check_vectors("queries", queries)
        n = q.shape[0]
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"Expected `k` to be an int, but got {type(k).__name__}")
        if k <= 0 or k > self.capacity:
            raise ValueError(f"Expected 1 <= `k` <= capacity ({self.capacity}), but got {k}")
        excl_source = self._check_exclude("exclude_source", exclude_source, n)
        excl_image = self._check_exclude("exclude_image", exclude_image, n)
        excl_label = self._check_exclude("exclude_label", exclude_label, n)
        select: Select | None
        if isinstance(negatives, Level):
            if negatives.needs_label and excl_label is None:
                raise ValueError(
                    f"Level {negatives.name!r} excludes same-label negatives, so `exclude_label` must be given"
                )
            select = negatives.negatives if negatives.bank_negatives else None
            nothing = not negatives.bank_negatives
        elif negatives is None or isinstance(negatives, Select):
            select, nothing = negatives, False
        else:
            raise TypeError(f"Expected `negatives` to be a Select, a Level or None, but got {type(negatives).__name__}")
        size = self._size
        if size > 0:
            if excl_image is not None and not self._has_image:
                raise ValueError("`exclude_image` was given, but the entries in the index carry no image tags")
            if excl_label is not None and not self._has_label:
                raise ValueError("`exclude_label` was given, but the entries in the index carry no label tags")
        if nothing or size == 0:
            sims, idx = _pad(None, None, n, k, q.device)
            return SearchResult(sims, idx, self._gather_tags(idx))
        bank_tags = self.tags[:size]
        allowed = None
        if select is not None and (select.kind is not None or select.quality is not None):
            allowed = select(bank_tags)
        exclusions = []
        if excl_source is not None:
            exclusions.append((excl_source, self._source[:size]))
        if excl_image is not None:
            exclusions.append((excl_image, self._image[:size]))
        label = None if excl_label is None else (excl_label, self._label[:size])
        backend = self._backend_for(self.embeddings)
        bank = self.embeddings[:size]
        sims, idx = backend.search(
            bank, q.to(bank.dtype) if bank.is_cuda else q.float(), k, _Filter(allowed, exclusions, label)
        )
        return SearchResult(sims, idx, self._gather_tags(idx))

    def _gather_tags(self, idx: Tensor) -> ViewTags:
        """``(N, k)`` tags at slot indices ``idx``, ``-1`` in every field where ``idx == -1``."""
        pad = idx < 0
        any_pad = bool(pad.any())
        safe = idx.clamp(min=0) if any_pad else idx

        def take(field: Tensor) -> Tensor:
            hits = torch.take(field, safe)  # several times faster than field[safe] on CPU
            return hits.masked_fill(pad, -1) if any_pad else hits

        return ViewTags(
            take(self._kind),
            take(self._quality),
            take(self._source),
            take(self._label) if self._has_label else None,
            take(self._image) if self._has_image else None,
            validate=False,
        )
