"""The hard-negative index: a tagged ring buffer of past embeddings with exact, tag-filtered top-k search.

:class:`HardNegativeIndex` holds the buffers (embeddings and the five tag fields), writes batches
into them as a ring buffer, keeps the write pointer and fill level in its ``state_dict``, checks
every input, and hands each search to the backend chosen for the bank's device and dtype
(:mod:`mlcl_losses.index.torch_backend`, :mod:`mlcl_losses.index.faiss_backend`) with the
search's tag filter (:mod:`mlcl_losses.index.filters`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from mlcl_losses.functional import normalize_embeddings
from mlcl_losses.index.backend import pad_hits
from mlcl_losses.index.faiss_backend import FaissBackend, faiss_available, faiss_gpu_available
from mlcl_losses.index.filters import build_filter, negatives_predicate
from mlcl_losses.index.torch_backend import TorchBackend
from mlcl_losses.levels import Level, Select
from mlcl_losses.tags import ViewTags

__all__ = ["Backend", "HardNegativeIndex", "SearchResult"]

logger = logging.getLogger("mlcl_losses.index")  # the index package's one logger

Backend = Literal["auto", "torch", "faiss"]
_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")
_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


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


class HardNegativeIndex(nn.Module):
    """A ring buffer of embeddings and their tags with exact, tag-filtered top-k search.

    Args:
        dim: embedding dimension ``D``.
        capacity: number of slots ``M``; adding past it overwrites the oldest entries.
        device: where the buffers live (default CPU). Moving the module with ``.to()`` works too.
        backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see :mod:`mlcl_losses.index`).
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
        if ivf_nlist is not None and (isinstance(ivf_nlist, bool) or not isinstance(ivf_nlist, int)):
            raise TypeError(f"Expected `ivf_nlist` to be a positive int or None, but got {ivf_nlist!r}")
        if ivf_nlist is not None and ivf_nlist <= 0:
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
        self._torch_backend = TorchBackend(chunk_size)
        self._backends: dict[tuple[str, str], TorchBackend | FaissBackend] = {}
        self._backend_for(self.embeddings)  # resolve now: fail early, log the choice

    # ------------------------------------------------------------------ backend choice
    def _backend_for(self, bank: Tensor) -> TorchBackend | FaissBackend:
        key = (bank.device.type, str(bank.dtype))
        if key in self._backends:
            return self._backends[key]
        device, dtype = bank.device, bank.dtype
        chosen: TorchBackend | FaissBackend
        if self.backend == "torch":
            chosen = self._torch_backend
        elif self.backend == "faiss":
            self._check_faiss_dtype(device, dtype)
            chosen = FaissBackend(device, self.ivf_nlist, self.nprobe, self._torch_backend)
        else:  # auto
            if device.type == "cuda":
                use_faiss = dtype in (torch.float32, torch.float16) and faiss_gpu_available()
            else:
                use_faiss = dtype == torch.float32 and device.type == "cpu" and faiss_available()
            chosen = FaissBackend(device, None, self.nprobe, self._torch_backend) if use_faiss else self._torch_backend
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
        zero = (x == 0).all(dim=1)
        if x.shape[0] and bool(zero.any()):
            raise ValueError(
                f"Expected `{name}` rows with a non-zero norm (a {'bank entry' if name == 'embeddings' else 'query'} "
                f"needs a direction), but row {int(zero.nonzero()[0, 0])} is all zeros"
            )
        if self.normalize:
            # divides each row by its largest |entry| first: tiny and huge rows are normalised too
            return normalize_embeddings(x, name).float()
        limit = torch.finfo(self.embeddings.dtype).max
        if name == "embeddings" and x.numel() and bool((x.abs() > limit).any()):
            bad = int((x.abs() > limit).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"Expected `{name}` entries within +-{limit:.4g} (the range of the bank's dtype "
                f"{self.embeddings.dtype}; normalize=False stores them as given), but row {bad} exceeds it"
            )
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
            embeddings: ``(B, D)`` float, finite; L2-normalised here when ``normalize=True`` (each
                row first divided by its largest absolute entry, so tiny and huge rows are normalised too).
                Detached and cast to the buffer's dtype and device.
            tags: ``(B,)`` tags of the batch. ``label`` / ``image`` must be present in every
                batch or in none (fixed by the first add after construction or :meth:`reset`).

        If ``B > capacity`` only the newest (last) ``capacity`` rows are kept.

        Raises:
            TypeError: ``embeddings`` not a float tensor, or ``tags`` not a :class:`~mlcl_losses.tags.ViewTags`.
            ValueError: a shape that is not ``(B, D)``, a row with NaN or inf, an all-zero row (it has
                no direction: no cosine similarity is defined for it), with ``normalize=False`` an entry
                outside the range of the bank's dtype, tags of another length, or optional tags other
                than the bank's.
        """
        if not isinstance(tags, ViewTags):
            raise TypeError(f"Expected `tags` to be a ViewTags, but got {type(tags).__name__}")
        x = self._check_vectors("embeddings", embeddings)
        b = x.shape[0]
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
            if isinstance(backend, FaissBackend):
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
            if isinstance(backend, FaissBackend):
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
            if isinstance(backend, FaissBackend):
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
            queries: ``(N, D)`` float, finite, no all-zero row; L2-normalised here when
                ``normalize=True`` (each row is first divided by its largest absolute entry, so
                tiny and huge rows get their cosine similarities too).
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

        Raises:
            TypeError: ``queries`` not a float tensor, ``k`` not an int, an ``exclude_*`` not an
                integer tensor, or ``negatives`` of another type.
            ValueError: ``queries`` not ``(N, D)``, a row with NaN or inf or all zeros (no direction),
                ``k`` outside ``[1, capacity]``, an ``exclude_*`` of another length, or an
                ``exclude_image`` / ``exclude_label`` the bank has no tags for.
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
        select, nothing = negatives_predicate(negatives, excl_label)
        size = self._size
        if size > 0:
            if excl_image is not None and not self._has_image:
                raise ValueError("`exclude_image` was given, but the entries in the index carry no image tags")
            if excl_label is not None and not self._has_label:
                raise ValueError("`exclude_label` was given, but the entries in the index carry no label tags")
        if nothing or size == 0:
            sims, idx = pad_hits(None, None, n, k, q.device)
            return SearchResult(sims, idx, self._gather_tags(idx))
        flt = build_filter(select, self.tags[:size], excl_source, excl_image, excl_label)
        backend = self._backend_for(self.embeddings)
        bank = self.embeddings[:size]
        sims, idx = backend.search(bank, q.to(bank.dtype) if bank.is_cuda else q.float(), k, flt)
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
