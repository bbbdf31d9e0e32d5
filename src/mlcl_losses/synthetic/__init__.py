"""Synthetic look-alikes of fundus photographs and chest radiographs, with boxes and quality labels.

Both datasets are indexable sequences whose sample ``i`` depends only on ``(seed, i)``;
each sample holds the (possibly degraded) image, the clean image, lesion/finding boxes and
an EyeQ-style quality label (0 Good, 1 Usable, 2 Reject). A sample becomes a
:class:`~mlcl_losses.views.FourViewRecord` for :class:`~mlcl_losses.views.FourViewDataset` in one
line (``FourViewRecord(image=s.clean_image, boxes=s.boxes, label=s.grade, quality=s.quality)``);
:func:`view_records` / :class:`ViewRecords`, which did this lazily, are deprecated.

.. py:data:: FUNDUS_LESIONS

   Lesion kind names; ``FundusSample.lesion_kinds`` holds indices into this tuple.

.. py:data:: CHESTXRAY14_LABELS

   The 14 ChestX-ray14 labels in the official order (``Data_Entry_2017.csv``).
"""

from mlcl_losses.synthetic._records import ViewRecords, view_records
from mlcl_losses.synthetic.fundus import FUNDUS_LESIONS, FundusSample, SyntheticFundus, render_fundus
from mlcl_losses.synthetic.xray import CHESTXRAY14_LABELS, ChestXraySample, SyntheticChestXray, render_chest_xray

__all__ = [
    "CHESTXRAY14_LABELS",
    "FUNDUS_LESIONS",
    "ChestXraySample",
    "FundusSample",
    "SyntheticChestXray",
    "SyntheticFundus",
    "ViewRecords",
    "render_chest_xray",
    "render_fundus",
    "view_records",
]
