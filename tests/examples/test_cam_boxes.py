"""Box proposals from class activation maps (examples.common.cam_boxes)."""

from __future__ import annotations

import pytest
import torch
from examples.common.cam_boxes import AnyDiseaseLogit, CamSettings, boxes_from_map, grad_cam
from torch import nn
from torchvision.ops import box_iou

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_blob_map() -> torch.Tensor:
    cam = torch.zeros(40, 60)
    cam[5:15, 10:20] = 1.0  # strong blob
    cam[25:35, 40:55] = 0.6  # weaker blob
    cam[6:9, 12:15] = 1.2  # a peak inside the strong blob
    return cam


def test_boxes_inside_sorted_and_scaled_to_the_original_image() -> None:
    settings = CamSettings(thresholds=(0.3,), min_size=0.0)
    boxes, scores = boxes_from_map(_two_blob_map(), (400, 600), settings, confidence=0.5)
    assert boxes.shape == (2, 4)
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.25]))  # peak fraction x confidence
    torch.testing.assert_close(boxes[0], torch.tensor([100.0, 50.0, 200.0, 150.0]))  # map x 10
    torch.testing.assert_close(boxes[1], torch.tensor([400.0, 250.0, 550.0, 350.0]))
    assert bool((boxes[:, 0::2] >= 0).all())
    assert bool((boxes[:, 0::2] <= 600).all())
    assert bool((boxes[:, 1::2] <= 400).all())


def test_nms_and_several_thresholds() -> None:
    settings = CamSettings(thresholds=(0.3, 0.5, 0.9), min_size=0.0, nms_iou=0.3)
    boxes, scores = boxes_from_map(_two_blob_map(), (40, 60), settings)
    iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
    assert float(iou.max()) <= 0.3
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    loose = CamSettings(thresholds=(0.3, 0.5, 0.9), min_size=0.0, nms_iou=1.0)
    assert len(boxes_from_map(_two_blob_map(), (40, 60), loose)[0]) > len(boxes)  # NMS removed nested boxes


def test_size_limits_in_original_pixels() -> None:
    cam = torch.zeros(20, 20)
    cam[0:1, 0:1] = 1.0  # a one-cell region in the corner
    cam[10:20, 5:20] = 0.8  # a large region
    grown = boxes_from_map(cam, (200, 200), CamSettings(thresholds=(0.5,), min_size=32.0, max_size=120.0))[0]
    assert grown.shape == (1, 4)  # the large region (150 px wide) is dropped
    torch.testing.assert_close(grown[0], torch.tensor([0.0, 0.0, 32.0, 32.0]))  # grown to 32, kept inside


def test_empty_and_invalid_maps() -> None:
    boxes, scores = boxes_from_map(torch.zeros(8, 8), (64, 64), CamSettings())
    assert boxes.shape == (0, 4)
    assert scores.shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        boxes_from_map(torch.full((8, 8), float("nan")), (64, 64), CamSettings())
    with pytest.raises(ValueError, match=r"`thresholds`"):
        CamSettings(thresholds=(1.5,))
    with pytest.raises(ValueError, match=r"`layer`"):
        CamSettings(layer="")


def test_unknown_layer_names_the_encoders_modules() -> None:
    from examples.common.cam_boxes import disease_maps
    from examples.common.models import Classifier, build_encoder

    model = Classifier(build_encoder("resnet18", 0.125), 2).eval()
    with pytest.raises(ValueError, match=r"Expected `layer` to name a module of the encoder .*'layer4'"):
        disease_maps(model, torch.rand(1, 3, 32, 32), [1], CamSettings(layer="layer9"), any_disease=False)


class _TinyNet(nn.Module):
    """Two convolutions, global max pooling, a linear layer: ``(B, 3, 32, 32) -> (B, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).amax((2, 3)))


def _lesion_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey noise; class 1 images have a reddish 6 x 6 square at a random place."""
    x = 0.4 + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    corners = torch.randint(2, 24, (n, 2), generator=g)
    for i in range(n):
        if y[i] == 1:
            x0, y0 = corners[i].tolist()
            x[i, :, y0 : y0 + 6, x0 : x0 + 6] += torch.tensor([0.4, -0.2, -0.2])[:, None, None]
    boxes = torch.cat([corners, corners + 6], 1).float()
    return x.clamp(0, 1), y, boxes


def test_grad_cam_of_a_trained_model_finds_the_lesion() -> None:
    torch.manual_seed(0)
    model = _TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), 0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y, _ = _lesion_batch(32, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y, true = _lesion_batch(32, torch.Generator().manual_seed(1))
    x, true = x[y == 1], true[y == 1]
    maps, logits = grad_cam(model, model.features[2], x, torch.ones(len(x), dtype=torch.long))
    assert maps.shape == (len(x), 32, 32)
    assert bool((logits > 0).float().mean() > 0.9)  # the model has learnt the lesion
    settings = CamSettings(thresholds=(0.5,), min_size=4.0)
    hits = 0
    for cam, box in zip(maps, true, strict=True):
        found, scores = boxes_from_map(cam, (32, 32), settings)
        assert len(found) >= 1
        hits += int(float(box_iou(found[:1], box[None]).max()) >= 0.3)
    assert hits >= 0.8 * len(x), (hits, len(x))  # the top box overlaps the true lesion in most images


def test_any_disease_logit_is_the_log_odds_of_grade_at_least_one() -> None:
    base = nn.Linear(4, 5)
    x = torch.randn(3, 4)
    p = torch.softmax(base(x), 1)
    got = AnyDiseaseLogit(base)(x)[:, 0]
    torch.testing.assert_close(torch.sigmoid(got), p[:, 1:].sum(1))
