"""Four-view construction: lesion and healthy patches at high and low quality (``docs/glossary.md``).

For each lesion box of an image and for each healthy patch, :class:`FourViewSampler` cuts

=====  =======================================================  ==========  ==========
view   content                                                  ``kind``    ``quality``
=====  =======================================================  ==========  ==========
V1a    lesion patch from the image, augmentation a              LESION      HIGH
V1b    the same lesion patch, augmentation b                    LESION      HIGH
V2     the same lesion patch cut from the degraded copy         LESION      LOW
V3     healthy patch from the image                             HEALTHY     HIGH
V4     the same healthy patch from the degraded copy            HEALTHY     LOW
=====  =======================================================  ==========  ==========

All views of one lesion box (V1a, V1b, V2) share a ``source`` id; so do V3 and V4 of one
healthy patch. Views are returned grouped by view: ``[V1a × K, V1b × K, V2 × K, V3 × M, V4 × M]``
for ``K`` lesion boxes and ``M`` healthy patches.

Patches have a fixed size ``P``; a box smaller than ``P`` is placed at a random (jittered)
position inside its patch, and a box larger than ``P`` is cut with a square region that
contains all of it and resized to ``P`` (never cut). :class:`FourViewDataset` and
:func:`collate_four_views` give batches ``(views (B, C, P, P), tags (B,))`` with unique
source ids, reproducible for a given ``(base_seed, epoch, index)`` whatever the number of
DataLoader workers.

The package, one file per part: ``sampler.py`` (:class:`FourViewSampler`, :class:`FourViews`,
:func:`crop_square`: cutting the views from an image and its degraded copy), ``augment.py``
(:class:`LightAugment`), ``dataset.py`` (:class:`FourViewRecord`, :class:`FourViewDataset`,
:func:`collate_four_views`: records, per-item seeding, batching). Import the public names from
here.
"""

from mlcl_losses.views.augment import LightAugment
from mlcl_losses.views.dataset import FourViewDataset, FourViewRecord, collate_four_views
from mlcl_losses.views.sampler import FourViews, FourViewSampler, crop_square

__all__ = [
    "FourViewDataset",
    "FourViewRecord",
    "FourViewSampler",
    "FourViews",
    "LightAugment",
    "collate_four_views",
    "crop_square",
]
