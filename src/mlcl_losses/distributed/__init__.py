r"""Multi-process training: gather embeddings and tags with gradients, search a sharded index.

Under ``torch.distributed`` (DDP launched by ``torchrun``) every rank holds its own part of the
batch. Contrastive losses want negatives from the *global* batch, so the embeddings and their
:class:`~mlcl_losses.tags.ViewTags` are all-gathered (``docs/architecture.md``, ``docs/distributed.md``).

**Gradients.** :func:`torch.distributed.all_gather` returns tensors without a gradient
history, so a loss over the gathered batch would not train the other ranks' rows.
:func:`all_gather_with_grad` is an autograd function whose backward *sums* (all-reduces) the
gradient that every rank computed for the gathered tensor and returns this rank's rows: the
gradient of :math:`\sum_r L_r` (the sum of all ranks' losses) with respect to the local input.
Ranks may hold different numbers of rows (sizes are gathered first; rows are padded to the
largest part, gathered, and trimmed), which the gloo backend's ``all_gather`` does not allow by
itself. :func:`torch.distributed.nn.functional.all_gather` has the same gradient but needs equal
sizes. Every rank must run the backward pass: it is a collective.

**Ids must be globally unique.** ``source`` and ``image`` tags decide positives and which pairs
may never be negatives, so once the batch spans ranks an id must name the same patch (image) on
every rank: use dataset-wide ids (e.g. the dataset index of the image). If a data pipeline
numbers ids per rank (0, 1, 2, ... on every rank), :func:`offset_ids_by_rank` makes them
distinct (``id * world_size + rank``). ``label`` is a class, shared by all ranks, and is left
as is.

**Sharded index.** Each rank keeps its own :class:`~mlcl_losses.index.HardNegativeIndex` (the
keys it produced); :class:`DistributedHardNegativeIndex` searches every shard and merges the
per-shard top-k into the global top-k. The exclusion rules are per entry, so the global top-k
is always among the per-shard top-k's: the merged result equals one index holding all entries.

Every function here raises :class:`RuntimeError` when no process group is initialised (call
:func:`torch.distributed.init_process_group` first), except :func:`offset_ids_by_rank` with an
explicit ``rank`` and ``world_size``.

The package, one file per part: ``gather.py`` (:func:`gather_batch`, :func:`all_gather_with_grad`,
:func:`all_gather_tags`), ``ids.py`` (:func:`offset_ids_by_rank`, :func:`ids_shared_across_ranks`),
``sharded_index.py`` (:class:`DistributedHardNegativeIndex`) and ``collectives.py`` (the building
blocks they share: :func:`process_group_info`, padded all-gathers, consistency checks). Import the
public names from here.

.. py:type:: ProcessGroup
   :canonical: typing.Any

   A :class:`torch.distributed.ProcessGroup`, or ``None`` for the default (WORLD) group
   (type alias).

Examples:
    >>> from mlcl_losses.tags import ViewTags
    >>> tags = ViewTags(kind=[1, 0], quality=[0, 0], source=[0, 1], image=[0, 0])
    >>> offset_ids_by_rank(tags, rank=1, world_size=2).source.tolist()
    [1, 3]
"""

from mlcl_losses.distributed.collectives import ProcessGroup as ProcessGroup  # the `group` type (documented above)
from mlcl_losses.distributed.collectives import process_group_info
from mlcl_losses.distributed.gather import GatheredBatch, all_gather_tags, all_gather_with_grad, gather_batch
from mlcl_losses.distributed.ids import ids_shared_across_ranks, offset_ids_by_rank
from mlcl_losses.distributed.sharded_index import DistributedHardNegativeIndex, DistributedSearchResult

__all__ = [
    "DistributedHardNegativeIndex",
    "DistributedSearchResult",
    "GatheredBatch",
    "all_gather_tags",
    "all_gather_with_grad",
    "gather_batch",
    "ids_shared_across_ranks",
    "offset_ids_by_rank",
    "process_group_info",
]
