"""A trained grading model read back from a pipeline run, for box proposals and prediction.

A run's ``checkpoint.pt`` holds the fine-tuned classifier (``finetune.model``) and the run's
configuration (``config``; runs written before it was stored have ``config.yaml`` beside the
checkpoint instead). :func:`load_trained` rebuilds the classifier from that configuration
(architecture, width, number of classes) and returns it with what is needed to feed it images:
the pipeline, the input size and the channel handling. The file is read with
:func:`~examples.common.checkpoint.load_checkpoint` (``weights_only=True``, digest checked): it cannot
run code, and a corrupted file is refused.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from examples.common.checkpoint import CheckpointError, load_checkpoint
from examples.common.images import load_image
from examples.common.models import Classifier, build_encoder
from mlcl_losses.synthetic import CHESTXRAY14_LABELS

__all__ = ["PIPELINES", "TrainedModel", "load_trained", "read_checkpoint"]

#: pipeline name -> (data section key of its real dataset, input channels of its images).
PIPELINES = {"eyeq": ("eyeq", 3), "chestxray": ("chestxray14", 1)}


@dataclass
class TrainedModel:
    """A fine-tuned classifier and how to feed it.

    Attributes:
        model: the :class:`~examples.common.models.Classifier` in eval mode, on the CPU.
        pipeline: ``"eyeq"`` (single-label DR grade) or ``"chestxray"`` (14 labels, multi-label).
        image_size: side of the square input the model was trained on (``data.image_size``).
        channels: channels of the pipeline's images: 3 (colour fundus) or 1 (grayscale X-ray,
            repeated to the encoder's three channels).
        class_names: the grades (``"0"``..``"4"``) or the 14 label names.
        config: the run's configuration (plain dict).
        path: the checkpoint file.
        epoch: fine-tuning epochs the classifier has done.
        epochs: fine-tuning epochs of the run's configuration (``epoch < epochs``: an interrupted run).
    """

    model: Classifier
    pipeline: str
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    config: dict[str, Any]
    path: Path
    epoch: int = 0
    epochs: int = 0

    @property
    def finished(self) -> bool:
        """Whether the classifier did every fine-tuning epoch of its run."""
        return self.epoch >= self.epochs

    @property
    def multilabel(self) -> bool:
        """Whether outputs are independent labels (sigmoid) rather than one class (softmax)."""
        return self.pipeline == "chestxray"

    def load(self, path: str | os.PathLike[str], size: int | None = None) -> Tensor:
        """Read an image file as the model's ``(3, S, S)`` float input in [0, 1].

        Colour fundus photographs must have 3 channels; X-rays 1 (or 3 equal ones, as some PNG
        exports store them). The grey value of an X-ray is repeated in the encoder's three channels.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file cannot be decoded, or has the wrong number of channels for the pipeline.
        """
        return load_model_input(path, self.channels, size or self.image_size)

    def probabilities(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` -> ``(B, C)`` class probabilities (softmax) or label probabilities (sigmoid)."""
        with torch.no_grad():
            logits = self.model(images)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, 1)


def load_model_input(path: str | os.PathLike[str], channels: int, size: int) -> Tensor:
    """An image file as a ``(3, size, size)`` float tensor, channel count checked (:meth:`TrainedModel.load`)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning: a clear refusal
            with Image.open(p) as img:
                bands = img.getbands()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(
            f"image {p} is too large to decode safely ({e}); resize it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if it is trusted"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {p} ({type(e).__name__}: {e})") from e
    if bands == ("P",):
        bands = ("R", "G", "B")  # a palette image decodes to colour
    if channels == 3:
        if bands not in (("R", "G", "B"), ("R", "G", "B", "A")) and len(bands) != 3:
            raise ValueError(
                f"{p}: expected a colour fundus photograph with 3 channels (RGB), got {len(bands)} ({''.join(bands)}); "
                "a grayscale image can be given to this model only as RGB with the grey value repeated in R, G and B"
            )
        return load_image(p, "RGB", size)
    if len(bands) == 1:
        return load_image(p, "L", size).expand(3, -1, -1).contiguous()
    if len(bands) in (3, 4):
        rgb = load_image(p, "RGB", size)
        if torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2]):
            return rgb
    raise ValueError(
        f"{p}: expected a grayscale X-ray (1 channel, or 3 equal ones), got {len(bands)} channels ({''.join(bands)})"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Read and verify a run's checkpoint (:func:`~examples.common.checkpoint.load_checkpoint`: weights-only,
    SHA-256 digest checked); ``path`` is the file or the run directory.

    Raises:
        CheckpointError: no checkpoint there, or a file that is not a (current) checkpoint of the pipelines.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        below = sorted(
            {c.parent for c in p.parent.glob("*/checkpoint.pt")}
            | {c.parent for c in p.parent.glob("*/*/checkpoint.pt")}
        )
        if below:
            shown = ", ".join(str(d) for d in below[:6]) + (f" and {len(below) - 6} more" if len(below) > 6 else "")
            raise CheckpointError(
                f"no checkpoint at {p}; runs below it (a comparison's METHOD/seedN): {shown}; give one of them"
            )
        raise CheckpointError(f"no checkpoint at {p}")
    return p, load_checkpoint(p, map_location="cpu")


def _config(p: Path, state: dict[str, Any]) -> dict[str, Any]:
    if isinstance(state.get("config"), dict):
        return state["config"]
    yaml_path = p.parent / "config.yaml"
    if not yaml_path.is_file():
        raise CheckpointError(f"{p} holds no configuration and there is no {yaml_path} beside it")
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{yaml_path}: expected a mapping of sections, got {type(cfg).__name__}")
    return cfg


def pipeline_of(config: dict[str, Any]) -> str:
    """``"eyeq"`` or ``"chestxray"``, from the data section of a run's configuration."""
    data = config.get("data") or {}
    found = [name for name, (key, _) in PIPELINES.items() if key in data]
    if len(found) != 1:
        raise CheckpointError(f"cannot tell the pipeline of a configuration with data keys {sorted(data)}")
    return found[0]


def load_trained(path: str | os.PathLike[str], expect: str | None = None) -> TrainedModel:
    """The fine-tuned classifier of a finished (or fine-tuning) run.

    Args:
        path: the run directory or its ``checkpoint.pt``.
        expect: ``"eyeq"`` or ``"chestxray"`` to refuse a checkpoint of the other pipeline.

    Raises:
        CheckpointError: no readable checkpoint, one still in pre-training (no classifier yet), one of
            the other pipeline, or weights that do not fit the stored architecture.
    """
    if expect is not None and expect not in PIPELINES:
        raise ValueError(f"Expected `expect` in {tuple(PIPELINES)} or None, but got {expect!r}")
    p, state = read_checkpoint(path)
    config = _config(p, state)
    pipeline = pipeline_of(config)
    if expect is not None and pipeline != expect:
        raise CheckpointError(f"{p} is a checkpoint of the {pipeline} pipeline, not of {expect}")
    if state.get("stage") != "finetune" or "finetune" not in state:
        raise CheckpointError(
            f"{p} holds {state.get('stage')!r} state (epoch {state.get('epoch')}): no fine-tuned classifier yet; "
            "let the run reach fine-tuning"
        )
    weights = state["finetune"]["model"]
    num_classes = int(weights["fc.weight"].shape[0])
    model_cfg = config.get("model") or {}
    encoder = build_encoder(model_cfg.get("arch", "resnet18"), float(model_cfg.get("width", 1.0)))
    model = Classifier(encoder, num_classes)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{p}: weights do not fit the stored model configuration {model_cfg}: {err}") from err
    model.eval()
    if pipeline == "eyeq":
        names = tuple(str(g) for g in range(num_classes))
    else:
        names = tuple(CHESTXRAY14_LABELS)
        if len(names) != num_classes:
            raise CheckpointError(f"{p}: {num_classes} outputs, expected the {len(names)} ChestX-ray14 labels")
    size = int(config["data"]["image_size"])
    epochs = int((config.get("finetune") or {}).get("epochs", 0))
    epoch = int(state.get("epoch", epochs))
    return TrainedModel(model, pipeline, size, PIPELINES[pipeline][1], names, config, p, epoch, epochs)
