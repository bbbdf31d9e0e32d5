"""Pieces shared by the example pipelines (EyeQ, ChestX-ray14).

``csv_rows`` and ``images`` (CSV and image reading the real datasets' readers share; the readers
live beside their dataset, ``examples/eyeq/readers.py`` and ``examples/chestxray/readers.py``),
``config`` (typed YAML config with ``--set`` overrides), ``models`` (ResNet encoder of any width,
projection head, momentum copy), ``pretrain`` / ``finetune`` / ``evaluate`` (the stages),
``pipeline`` (one run with checkpoints and resume), ``task`` (loss, prediction and metrics of a
single- or multi-label task), ``checkpoint``, ``runlog`` (CSV / JSON / TensorBoard, progress bars),
``rundir`` (which directories hold a run), ``report`` (the plot of one run), ``compare`` (method
comparison), ``cli`` (the command line of ``train.py``), ``views`` (four-view records: per-epoch
lesion-box caps, synthetic and real records) and ``synthetic_cache`` (the synthetic sets rendered
once and cached).

Real data without lesion boxes: ``boxes`` (the box JSON, versions 1 and 2, and the ``convert-boxes``
command for the authors' pickle), ``cam_boxes`` (Grad-CAM maps to scored boxes), ``propose_boxes``
(the command), ``box_quality`` (recall / precision against known boxes), ``detector`` (Faster R-CNN
on COCO JSON), ``trained`` (a run's classifier read back) and ``predict`` (the command applying it
to new images).
"""

__all__ = [
    "box_quality",
    "boxes",
    "cam_boxes",
    "checkpoint",
    "cli",
    "compare",
    "config",
    "csv_rows",
    "detector",
    "evaluate",
    "finetune",
    "images",
    "models",
    "pipeline",
    "predict",
    "pretrain",
    "propose_boxes",
    "report",
    "rundir",
    "runlog",
    "synthetic_cache",
    "task",
    "trained",
    "views",
]
