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
path masks before the top-k; the FAISS paths search one sub-bank per tag group with an over-fetch
and refill (``faiss_backend.py``, whose docstring also says what the backend does about
faiss-cpu's BLAS threshold, OpenMP spin-waiting and the FAISS GPU limits; the measurements are in
``docs/hard_negative_index.md``).

The package, one file per part: ``hard_negative_index.py`` (:class:`HardNegativeIndex`,
:class:`SearchResult`: the ring buffer, its state and the backend choice), ``filters.py`` (a
search's tag filter), ``backend.py`` (the interface every backend implements),
``torch_backend.py`` and ``faiss_backend.py`` (the two backends). Import the public names from
here.

.. py:type:: Backend
   :canonical: typing.Literal['auto', 'torch', 'faiss']

   The ``backend`` option (type alias).

.. py:data:: FAISS_GPU_MAX_K
   :value: 2048

   FAISS GPU k-selection limit (``faiss::gpu::getMaxKSelection()``).

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

from mlcl_losses.index.faiss_backend import FAISS_GPU_MAX_K, faiss_available, faiss_gpu_available
from mlcl_losses.index.hard_negative_index import Backend as Backend  # the `backend` option type (documented above)
from mlcl_losses.index.hard_negative_index import HardNegativeIndex, SearchResult

__all__ = ["FAISS_GPU_MAX_K", "HardNegativeIndex", "SearchResult", "faiss_available", "faiss_gpu_available"]
