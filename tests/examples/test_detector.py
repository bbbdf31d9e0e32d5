"""The lesion detector (examples.common.detector): COCO JSON in, two training steps, box JSON out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.common.boxes import read_boxes_json
from examples.common.detector import load_detector, main, read_coco
from PIL import Image

SIZE = 64
NAMES = ["exudate", "haemorrhage"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _coco(root: Path, n: int = 6) -> Path:
    """``n`` generated 64 px images (RGB and grayscale) with bright and dark squares, and their COCO JSON."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        img = rng.normal(120, 10, (SIZE, SIZE, 3)).clip(0, 255)
        for k, (category, value) in enumerate(((7, 240), (3, 40))):
            x, y = rng.integers(4, SIZE - 16, 2)
            img[y : y + 10, x : x + 10] = value
            annotations.append(
                {"id": 2 * i + k, "image_id": 100 + i, "category_id": category, "bbox": [int(x), int(y), 10, 10]}
            )
        name = f"img{i}.png"
        pil = Image.fromarray(img.astype(np.uint8))
        (pil.convert("L") if i % 3 == 0 else pil).save(root / "images" / name)
        images.append({"id": 100 + i, "file_name": name, "width": SIZE, "height": SIZE})
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": NAMES[0]}, {"id": 3, "name": NAMES[1]}],
    }
    path = root / "coco.json"
    path.write_text(json.dumps(doc))
    return path


def test_read_coco(tmp_path: Path) -> None:
    images, names = read_coco(_coco(tmp_path), tmp_path / "images")
    assert names == ["haemorrhage", "exudate"]  # sorted by category id: label 1 is id 3
    assert len(images) == 6
    assert images[0].boxes.shape == (2, 4)
    assert images[0].labels.tolist() == [2, 1]
    torch.testing.assert_close(images[0].boxes[:, 2:] - images[0].boxes[:, :2], torch.full((2, 2), 10.0))


def test_train_two_steps_and_predict_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = _coco(tmp_path)
    model_path = tmp_path / "detector.pt"
    args = ["train", "--coco", str(coco), "--images", str(tmp_path / "images"), "--out", str(model_path)]
    assert main([*args, "--backbone", "resnet18", "--image-size", "64", "--steps", "2", "--batch-size", "2"]) == 0
    assert "trained 2 steps on 6 images" in capsys.readouterr().out
    model, cfg = load_detector(model_path)  # weights-only
    assert cfg["categories"] == ["haemorrhage", "exudate"]
    assert not model.training
    out = tmp_path / "detected.json"
    assert (
        main(["predict", str(model_path), str(tmp_path / "images"), "--out", str(out), "--score-threshold", "0"]) == 0
    )
    split = read_boxes_json(out)["train"]
    assert split.unhealthy, "no detection at all"
    for name, boxes in split.unhealthy.items():
        assert name.startswith("img")
        b = torch.tensor(boxes)
        assert bool((b >= 0).all())
        assert bool((b <= SIZE).all())
        assert len(boxes) <= 8
        assert split.scores[name] == sorted(split.scores[name], reverse=True)
        assert set(split.labels[name]) <= set(NAMES)


def test_detector_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = _coco(tmp_path)
    doc = json.loads(coco.read_text())
    doc["annotations"][0]["bbox"] = [1, 2, 0, 5]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    args = ["train", "--coco", str(bad), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "d.pt")]
    assert main(args) == 2
    assert "annotation 0: expected `bbox` [x, y, width, height] with width, height > 0" in capsys.readouterr().err
    doc["annotations"][0]["bbox"] = [1, 2, 3, 5]
    doc["annotations"][0]["category_id"] = 99
    bad.write_text(json.dumps(doc))
    assert main(args) == 2
    assert "category_id 99 is not in `categories`" in capsys.readouterr().err
    (tmp_path / "images" / "img1.png").unlink()
    assert (
        main(["train", "--coco", str(coco), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "d.pt")]) == 2
    )
    assert "image 101 not found" in capsys.readouterr().err
    not_a_detector = tmp_path / "x.pt"
    torch.save({"format": "something else"}, not_a_detector)
    assert main(["predict", str(not_a_detector), str(tmp_path / "images"), "--out", str(tmp_path / "o.json")]) == 2
    assert "is not a detector of examples.common.detector" in capsys.readouterr().err
