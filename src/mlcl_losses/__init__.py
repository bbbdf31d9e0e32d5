"""mlcl_losses: multi-level contrastive learning for low-quality medical images (CoMCL)."""

from mlcl_losses.levels import Level, Select, comcl_levels, level_masks
from mlcl_losses.tags import Kind, Quality, ViewTags

__version__ = "0.1.0"

__all__ = [
    "Kind",
    "Level",
    "Quality",
    "Select",
    "ViewTags",
    "__version__",
    "comcl_levels",
    "level_masks",
]
