"""Low-quality image simulators: fundus photographs (Shen et al. 2020) and radiographs.

All degradations take ``(C, H, W)`` or ``(B, C, H, W)`` float tensors in [0, 1], a
``severity`` in [0, 1] (0 is the identity) and a ``generator`` or ``seed``; the same seed and
input give the same output. :class:`FundusDegradation` and :class:`XrayDegradation` are
callables to hand to :class:`~mlcl_losses.views.FourViewSampler` as "the degradation to apply".

.. py:data:: FUNDUS_KINDS

   Shen et al.'s three fundus degradation kinds, in the order they are applied.

.. py:data:: FUNDUS_COMBINATIONS

   The seven non-empty subsets of :data:`FUNDUS_KINDS` (Shen et al.'s degradation types).

.. py:data:: XRAY_KINDS

   Every X-ray degradation kind, in the order they are applied.

Examples:
    >>> import torch
    >>> from mlcl_losses.degrade import degrade_fundus
    >>> img = torch.rand(3, 32, 32)
    >>> torch.equal(degrade_fundus(img, 0.6, seed=1), degrade_fundus(img, 0.6, seed=1))
    True
"""

from mlcl_losses._seeding import mix_seed
from mlcl_losses.degrade._protocol import Degradation
from mlcl_losses.degrade.fundus import (
    FUNDUS_COMBINATIONS,
    FUNDUS_KINDS,
    FundusDegradation,
    FundusKind,
    degrade_fundus,
    estimate_fov,
)
from mlcl_losses.degrade.xray import XRAY_KINDS, XrayDegradation, XrayKind, degrade_xray, jpeg_compress

__all__ = [
    "FUNDUS_COMBINATIONS",
    "FUNDUS_KINDS",
    "XRAY_KINDS",
    "Degradation",
    "FundusDegradation",
    "FundusKind",
    "XrayDegradation",
    "XrayKind",
    "degrade_fundus",
    "degrade_xray",
    "estimate_fov",
    "jpeg_compress",
    "mix_seed",
]
