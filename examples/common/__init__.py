"""Pieces shared by the example pipelines (EyeQ, ChestX-ray14).

``datasets`` (readers for the real EyeQ and ChestX-ray14 formats), ``config`` (typed YAML config with
``--set`` overrides), ``models`` (ResNet encoder of any width, projection head, momentum copy),
``pretrain`` / ``finetune`` / ``evaluate`` (the stages), ``pipeline`` (one run with checkpoints and
resume), ``task`` (loss, prediction and metrics of a single- or multi-label task), ``checkpoint``,
``runlog`` (CSV / JSON / TensorBoard, progress bars), ``rundir`` (which directories hold a run),
``report`` (the plot of one run), ``compare`` (method comparison), ``cli`` (the command line of
``train.py``) and ``views`` (data helpers: lesion boxes, four-view dataset, rendering cache).
"""

__all__ = [
    "checkpoint",
    "cli",
    "compare",
    "config",
    "datasets",
    "evaluate",
    "finetune",
    "models",
    "pipeline",
    "pretrain",
    "report",
    "rundir",
    "runlog",
    "task",
    "views",
]
