"""Pieces shared by the example pipelines (EyeQ now, ChestX-ray14 next).

``datasets`` (readers for the real EyeQ and ChestX-ray14 formats), ``config`` (typed YAML config with
``--set`` overrides), ``models`` (ResNet encoder of any width, projection head, momentum copy),
``pretrain`` / ``finetune`` / ``evaluate`` (the stages), ``pipeline`` (one run with checkpoints and
resume), ``checkpoint``, ``runlog`` (CSV / JSON / TensorBoard) and ``compare`` (method comparison).
"""

__all__ = [
    "checkpoint",
    "compare",
    "config",
    "datasets",
    "evaluate",
    "finetune",
    "models",
    "pipeline",
    "pretrain",
    "runlog",
]
