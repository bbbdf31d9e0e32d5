"""Encoder, projection head, momentum (key) encoder and classifier of the example pipelines.

Two backbone families, both randomly initialised by default or loaded from a local ``state_dict``
file (nothing is downloaded), both returning pooled ``(B, F)`` features with ``encoder.out_dim == F``:

- torchvision ResNets (``arch`` ``"resnet18" | "resnet34" | "resnet50"``), without their ``fc``
  layer. ``width`` scales every stage's channels, so a ResNet-18 can be made small enough for a
  CPU: width 0.25 gives stages of 16-32-64-128 channels.
- any `timm <https://huggingface.co/docs/timm>`_ model by name (``arch`` ``"timm:<name>"``, e.g.
  ``"timm:resnet50"``, ``"timm:convnext_tiny"``, ``"timm:efficientnet_b0"``), built with
  ``num_classes=0`` (timm's pooled-feature form); ``F`` is the model's ``head_hidden_size``
  (its ``num_features``, or the width of its pre-logits layer where it has one).

Both take 3-channel input; the ChestX-ray pipeline repeats its grayscale images to three channels
for either family, so a torchvision and a timm encoder see the same tensors.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from examples.common.config import ConfigError

__all__ = [
    "TIMM_PREFIX",
    "TORCHVISION_ARCHS",
    "Classifier",
    "ContrastiveModel",
    "ProjectionHead",
    "arch_problem",
    "build_encoder",
    "check_input_sizes",
    "feature_dim",
    "momentum_update",
]

TIMM_PREFIX = "timm:"

_LAYOUTS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
TORCHVISION_ARCHS = tuple(_LAYOUTS)


class _WidthResNet(ResNet):
    """torchvision's ResNet with every stage's channels scaled by ``width`` (1.0: the original)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], width: float) -> None:
        self._width = width
        self._stem = max(8, round(64 * width))
        self._first_layer = True
        super().__init__(block, layers)
        if self._stem != 64:  # rebuild the stem with the scaled width, initialised as torchvision does
            self.conv1 = nn.Conv2d(3, self._stem, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(self._stem)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.out_dim: int = self._scaled(512) * block.expansion  # the input of torchvision's fc (512 at width 1)
        self.fc = nn.Identity()

    def _scaled(self, planes: int) -> int:
        return max(8, round(planes * self._width))

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        if self._first_layer:  # the stem's width feeds the first stage
            self.inplanes = self._stem
            self._first_layer = False
        return super()._make_layer(block, self._scaled(planes), blocks, stride, dilate)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is in the `examples` extra
        raise ImportError(
            "`arch: timm:<name>` needs timm: pip install 'mlcl-losses[examples]' (or pip install timm); "
            f"the torchvision backbones {TORCHVISION_ARCHS} work without it"
        ) from err
    return timm


def arch_problem(arch: str) -> str | None:
    """What is wrong with the backbone name ``arch`` (``None``: nothing).

    Valid: one of :data:`TORCHVISION_ARCHS`, or ``"timm:<name>"`` with a model name timm knows
    (checked against timm's registry, offline).
    """
    if not isinstance(arch, str):
        return f"a string, got {type(arch).__name__}"
    if arch in _LAYOUTS:
        return None
    if not arch.startswith(TIMM_PREFIX):
        return f"one of {TORCHVISION_ARCHS} or 'timm:<model name>' (e.g. 'timm:convnext_tiny')"
    name = arch.removeprefix(TIMM_PREFIX)
    timm = _import_timm()
    if name and timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
    return f"'timm:<name>' with a model name timm knows (timm.list_models()), but {name!r} is not one{hint}"


def _read_state(path: str | os.PathLike[str], read: Callable[[Path], Any]) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"encoder weights file {str(p)!r} does not exist")
    try:
        state = read(p)
    except Exception as err:  # corrupt or non-tensor file
        raise ValueError(f"cannot read encoder weights {p} ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{p}: expected a state_dict, got {type(state).__name__}")
    return state


def _timm_encoder(name: str, weights: str | os.PathLike[str] | None) -> nn.Module:
    """timm model ``name`` without its classifier; ``weights``: a local file with timm's key names."""
    timm = _import_timm()
    encoder = timm.create_model(name, pretrained=False, num_classes=0)  # random init: nothing downloaded
    # the width of what forward() returns without a classifier: num_features, or the pre-logits layer's
    # width for models that have one (MobileNetV3: 576 -> 1024)
    encoder.out_dim = encoder.head_hidden_size
    if weights is None:
        return encoder
    # timm's reader: torch.load(weights_only=True) or safetensors; unwraps "state_dict" / "model"
    # (EMA weights when present) and strips DDP's "module." prefix
    state = _read_state(weights, lambda p: timm.models.load_state_dict(str(p), weights_only=True))
    head = encoder.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
    state = {k: v for k, v in state.items() if not (heads and k.startswith(heads))}  # the classifier is dropped
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not fit timm:{name} (timm key names expected): {err}") from err
    return encoder


def build_encoder(
    arch: str = "resnet18",
    width: float = 1.0,
    weights: str | os.PathLike[str] | None = None,
    input_sizes: Mapping[str, int] | None = None,
) -> nn.Module:
    """A backbone returning ``(B, F)`` pooled features from ``(B, 3, H, W)``; ``encoder.out_dim`` is ``F``.

    Args:
        arch: ``"resnet18" | "resnet34" | "resnet50"`` (torchvision) or ``"timm:<name>"`` (any timm
            model, e.g. ``"timm:convnext_tiny"``).
        width: channel multiplier of every stage of a torchvision ResNet; must be 1.0 with a timm
            model (pick a smaller timm model instead).
        weights: optional local file with a ``state_dict``: torchvision key names for a torchvision
            ResNet, timm key names for a timm model (e.g. saved with ``torch.save(model.state_dict())``
            or a timm ``.safetensors`` file). Classifier keys (``fc.*``, timm's ``classifier``),
            a ``"state_dict"`` wrapper and DDP's ``module.`` prefix are ignored/unwrapped. Read with
            ``weights_only=True``.
        input_sizes: the side in pixels of every input the encoder will get, by the setting that
            fixes it (e.g. ``{"pretrain.patch_size": 24, "data.image_size": 64}``): the built encoder
            is probed once with each (:func:`check_input_sizes`; no effect on a valid model's results).

    Raises:
        ValueError: unknown ``arch``; ``width`` other than 1.0 with a timm model; ``weights`` missing,
            unreadable or not matching the network.
        ConfigError: the encoder fails on one of ``input_sizes`` (a ``ValueError`` too).
    """
    problem = arch_problem(arch)
    if problem is not None:
        raise ValueError(f"Expected `arch` to be {problem}; got {arch!r}")
    if arch.startswith(TIMM_PREFIX):
        if width != 1.0:
            raise ValueError(
                f"Expected `width` 1.0 with a timm backbone ({arch}): width scales torchvision ResNets only; "
                f"choose a smaller timm model instead, but got {width}"
            )
        encoder = _timm_encoder(arch.removeprefix(TIMM_PREFIX), weights)
    else:
        encoder = _torchvision_encoder(arch, width, weights)
    if input_sizes:
        check_input_sizes(encoder, arch, input_sizes)
    return encoder


def _torchvision_encoder(arch: str, width: float, weights: str | os.PathLike[str] | None) -> nn.Module:
    block, layers = _LAYOUTS[arch]
    encoder = _WidthResNet(block, layers, width)
    if weights is not None:
        state = _read_state(weights, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights}: weights do not fit {arch} at width {width}: {err}") from err
    return encoder


def check_input_sizes(encoder: nn.Module, arch: str, sizes: Mapping[str, int], key: str = "model.arch") -> None:
    """Run ``encoder`` once on a ``(1, 3, s, s)`` zero image for every size ``s`` it will be fed.

    A backbone that cannot take an input size (a timm ViT built for 224 px, a ConvNeXt whose last
    stage has nothing left of a 24 px patch) is then a configuration error before any training,
    not a deep traceback in the first step. The probe changes nothing: it runs without gradients, in
    eval mode (BatchNorm's running statistics stay as they are; each submodule's mode is restored)
    and inside :func:`torch.random.fork_rng`, so the global CPU random state is unchanged.

    Args:
        encoder: the backbone (on the CPU, as :func:`build_encoder` returns it).
        arch: its name, for the message.
        sizes: the side in pixels of each input it will get, by the setting that fixes it
            (e.g. ``{"pretrain.patch_size": 24, "data.image_size": 64}``).
        key: the setting that names the backbone, for the message.

    Raises:
        ConfigError: ``"<key>: expected a backbone that takes <setting> <s> (s x s px inputs), got <arch>
            (<the error it raised>)"``.
    """
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for setting, size in sizes.items():
                try:
                    encoder(torch.zeros(1, 3, size, size))
                except (RuntimeError, AssertionError, ValueError, IndexError) as err:
                    reason = (str(err).strip().splitlines() or [""])[0]
                    raise ConfigError(
                        f"{key}: expected a backbone that takes {setting} {size} ({size}x{size} px inputs), "
                        f"got {arch!r}, which fails on them ({type(err).__name__}: {reason}); "
                        f"choose another backbone or another {setting}"
                    ) from None
    finally:
        for module, training in modes:
            module.training = training


class ProjectionHead(nn.Module):
    """MLP projection head ``F -> hidden -> D`` (Linear, BatchNorm, ReLU, Linear), as SimCLR/MoCo v2."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, F) -> (B, D)``."""
        return self.net(x)


def feature_dim(encoder: nn.Module) -> int:
    """``F``, the width of the ``(B, F)`` features ``encoder`` returns: its ``out_dim`` (:func:`build_encoder` sets it).

    Raises:
        TypeError: ``encoder`` has no int ``out_dim``.
    """
    dim = getattr(encoder, "out_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(
            f"Expected `encoder` to have an int `out_dim` (the width of its pooled features, as the encoders of "
            f"build_encoder have), but {type(encoder).__name__} has {dim!r}"
        )
    return dim


class ContrastiveModel(nn.Module):
    """Encoder + projection head; ``forward`` returns L2-normalised ``(B, D)`` embeddings."""

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(feature_dim(encoder), proj_hidden, proj_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, P, P) -> (B, D)``."""
        return F.normalize(self.head(self.encoder(x)), dim=1)


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` for momentum (key) encoding."""
    key = copy.deepcopy(model)
    for p in key.parameters():
        p.requires_grad_(False)
    return key


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """``key <- m * key + (1 - m) * query`` for parameters; buffers (BatchNorm stats) are copied."""
    for pk, pq in zip(key.parameters(), query.parameters(), strict=True):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)
    for bk, bq in zip(key.buffers(), query.buffers(), strict=True):
        bk.copy_(bq)


class Classifier(nn.Module):
    """Encoder + linear layer: ``(B, C, H, W) -> (B, num_classes)`` logits."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(feature_dim(encoder), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.fc(self.encoder(x))
