"""mlcl_losses: multi-level contrastive learning for low-quality medical images (CoMCL).

The pieces of CoMCL (Hou et al., MICCAI 2024, https://arxiv.org/abs/2404.04887) for an
existing PyTorch training loop: view tags, multi-level pairs, the multi-level contrastive
loss, self-paced weighting and a hard-negative index.
"""

from mlcl_losses.distributed import DistributedHardNegativeIndex, offset_ids_by_rank
from mlcl_losses.functional import LevelStats, multilevel_info_nce
from mlcl_losses.index import HardNegativeIndex, SearchResult
from mlcl_losses.levels import Level, Select, comcl_levels, level_masks
from mlcl_losses.loss import MultiLevelContrastiveLoss
from mlcl_losses.self_paced import PaceSchedule, SelfPacedWeighting, self_paced_weights
from mlcl_losses.tags import Kind, Quality, ViewTags
from mlcl_losses.views import (
    FourViewDataset,
    FourViewRecord,
    FourViews,
    FourViewSampler,
    LightAugment,
    collate_four_views,
)

__version__ = "0.1.0"

__all__ = [
    "DistributedHardNegativeIndex",
    "FourViewDataset",
    "FourViewRecord",
    "FourViewSampler",
    "FourViews",
    "HardNegativeIndex",
    "Kind",
    "Level",
    "LevelStats",
    "MultiLevelContrastiveLoss",
    "PaceSchedule",
    "LightAugment",
    "Quality",
    "SearchResult",
    "Select",
    "SelfPacedWeighting",
    "ViewTags",
    "__version__",
    "collate_four_views",
    "comcl_levels",
    "level_masks",
    "multilevel_info_nce",
    "offset_ids_by_rank",
    "self_paced_weights",
]
