"""Encoder, projection head, momentum (key) encoder and classifier of the example pipelines.

The encoder is a torchvision ResNet without its ``fc`` layer, randomly initialised by default or
loaded from a ``state_dict`` file (no download). ``width`` scales every stage's channels, so a
ResNet-18 can be made small enough for a CPU: width 0.25 gives stages of 16-32-64-128 channels.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["Classifier", "ContrastiveModel", "ProjectionHead", "build_encoder", "momentum_update"]

_LAYOUTS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


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
        self.out_dim = self.fc.in_features if width == 1.0 else self._scaled(512) * block.expansion
        self.fc = nn.Identity()  # type: ignore[assignment]

    def _scaled(self, planes: int) -> int:
        return max(8, round(planes * self._width))

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[no-untyped-def]
        if self._first_layer:  # the stem's width feeds the first stage
            self.inplanes = self._stem
            self._first_layer = False
        return super()._make_layer(block, self._scaled(planes), blocks, stride, dilate)


def build_encoder(
    arch: str = "resnet18", width: float = 1.0, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """A ResNet trunk returning ``(B, F)`` pooled features; ``encoder.out_dim`` is ``F``.

    Args:
        arch: ``"resnet18" | "resnet34" | "resnet50"``.
        width: channel multiplier of every stage.
        weights: optional file with a ``state_dict`` (torchvision key names; ``fc.*`` keys and a
            ``"state_dict"`` wrapper are accepted and ignored/unwrapped).

    Raises:
        ValueError: unknown ``arch``; ``weights`` missing, unreadable or not matching the network.
    """
    if arch not in _LAYOUTS:
        raise ValueError(f"Expected `arch` in {tuple(_LAYOUTS)}, but got {arch!r}")
    block, layers = _LAYOUTS[arch]
    encoder = _WidthResNet(block, layers, width)
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise ValueError(f"encoder weights file {str(p)!r} does not exist")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt or non-tensor file
            raise ValueError(f"cannot read encoder weights {p} ({type(err).__name__}: {err})") from err
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{p}: expected a state_dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{p}: weights do not fit {arch} at width {width}: {err}") from err
    return encoder


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


class ContrastiveModel(nn.Module):
    """Encoder + projection head; ``forward`` returns L2-normalised ``(B, D)`` embeddings."""

    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.out_dim, proj_hidden, proj_dim)  # type: ignore[arg-type]

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
        self.fc = nn.Linear(encoder.out_dim, num_classes)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.fc(self.encoder(x))
