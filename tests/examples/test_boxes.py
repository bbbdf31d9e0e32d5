"""Tests of examples/common/boxes.py: the lesion-box JSON, the authors' pickle and the converter command."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import examples.common.boxes as boxes_module
import numpy as np
import pytest
from examples.common.boxes import SplitBoxes, convert_pickle_boxes, read_boxes_json, write_boxes_json

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def authors_pickle() -> dict:
    """The CoMCL authors' layout; val as a plain {path: boxes} mapping, as their loader reads it."""
    return {
        "train": {
            "healthy": {"data/train/10_left.jpeg": [(0, 0, 64, 64), (100, 120, 164, 184)]},
            "unhealthy": {
                "data/train/10_right.jpeg": [(10, 20, 30, 45)],
                "data/train/13_left.jpeg": [np.array([1.5, 2.5, 9.0, 10.0], dtype=np.float32)],
            },
        },
        "val": {"data/val/15_left.jpeg": [[5, 5, 50, 60]]},
    }


def test_convert_pickle_round_trip(tmp_path: Path) -> None:
    pkl = tmp_path / "lesions.pkl"
    pkl.write_bytes(pickle.dumps(authors_pickle()))
    out = tmp_path / "lesions.json"
    boxes = convert_pickle_boxes(pkl, out, allow_pickle=True)
    assert set(boxes) == {"train", "val"}
    assert boxes["train"].healthy["data/train/10_left.jpeg"] == [(0.0, 0.0, 64.0, 64.0), (100.0, 120.0, 164.0, 184.0)]
    assert boxes["train"].unhealthy["data/train/13_left.jpeg"] == [(1.5, 2.5, 9.0, 10.0)]
    assert boxes["val"] == SplitBoxes(healthy={}, unhealthy={"data/val/15_left.jpeg": [(5.0, 5.0, 50.0, 60.0)]})
    doc = json.loads(out.read_text())
    assert doc["format"] == "mlcl_losses.lesion_boxes"
    assert doc["version"] == 2
    assert doc["splits"]["train"]["unhealthy"]["data/train/10_right.jpeg"] == [[10.0, 20.0, 30.0, 45.0]]
    assert read_boxes_json(out) == boxes
    again = tmp_path / "again.json"
    write_boxes_json(read_boxes_json(out), again)
    assert again.read_text() == out.read_text()


def test_convert_pickle_refused_without_flag(tmp_path: Path) -> None:
    pkl = tmp_path / "lesions.pkl"
    pkl.write_bytes(pickle.dumps(authors_pickle()))
    out = tmp_path / "lesions.json"
    for flag in (False, "yes", 1):
        with pytest.raises(ValueError, match=r"unpickling runs|runs arbitrary code") as info:
            convert_pickle_boxes(pkl, out, allow_pickle=flag)  # type: ignore[arg-type]
        assert "allow_pickle=True" in str(info.value)
        assert "--allow-pickle" in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("box", "needle"),
    [
        pytest.param((30, 20, 10, 45), "x2 > x1", id="x-reversed"),
        pytest.param((10, 20, 30, 20), "y2 > y1", id="zero-height"),
        pytest.param((10, 20, 30), "4 numbers", id="three-numbers"),
        pytest.param((10, "20", 30, 40), "finite numbers", id="string"),
        pytest.param((10, 20, float("inf"), 40), "finite numbers", id="inf"),
        pytest.param((True, 20, 30, 40), "finite numbers", id="bool"),
    ],
)
def test_convert_pickle_invalid_box_names_file_and_key(tmp_path: Path, box: tuple, needle: str) -> None:
    tree = authors_pickle()
    tree["train"]["unhealthy"]["data/train/99_left.jpeg"] = [(1, 1, 2, 2), box]
    pkl = tmp_path / "bad.pkl"
    pkl.write_bytes(pickle.dumps(tree))
    with pytest.raises(
        ValueError, match=r"bad\.pkl: split 'train', group 'unhealthy', image 'data/train/99_left\.jpeg', box 1"
    ) as info:
        convert_pickle_boxes(pkl, tmp_path / "out.json", allow_pickle=True)
    assert needle in str(info.value)


def test_convert_pickle_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        convert_pickle_boxes(tmp_path / "missing.pkl", tmp_path / "o.json", allow_pickle=True)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"garbage\.pkl: cannot unpickle"):
        convert_pickle_boxes(garbage, tmp_path / "o.json", allow_pickle=True)
    wrong = tmp_path / "list.pkl"
    wrong.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"list\.pkl: expected a mapping"):
        convert_pickle_boxes(wrong, tmp_path / "o.json", allow_pickle=True)


def test_read_boxes_json_validates(tmp_path: Path) -> None:
    def doc(splits: object, fmt: str = "mlcl_losses.lesion_boxes", version: int = 1) -> str:
        return json.dumps({"format": fmt, "version": version, "splits": splits})

    ok = write(tmp_path / "ok.json", doc({"train": {"healthy": {}, "unhealthy": {"a.jpeg": [[0, 0, 1, 1]]}}}))
    assert read_boxes_json(ok)["train"].unhealthy == {"a.jpeg": [(0.0, 0.0, 1.0, 1.0)]}
    bad_box = write(tmp_path / "badbox.json", doc({"val": {"healthy": {"b.jpeg": [[0, 0, 0, 1]]}, "unhealthy": {}}}))
    with pytest.raises(
        ValueError, match=r"badbox\.json: split 'val', group 'healthy', image 'b\.jpeg', box 0: .*x2 > x1"
    ):
        read_boxes_json(bad_box)
    flat = write(tmp_path / "flat.json", doc({"val": {"b.jpeg": [[0, 0, 1, 1]]}}))
    with pytest.raises(ValueError, match="expected keys 'healthy' and 'unhealthy'"):
        read_boxes_json(flat)
    with pytest.raises(ValueError, match="expected `format`"):
        read_boxes_json(write(tmp_path / "fmt.json", doc({}, fmt="other")))
    with pytest.raises(ValueError, match=r"expected `version` in \(1, 2\), got 3"):
        read_boxes_json(write(tmp_path / "ver.json", doc({}, version=3)))
    scored_v1 = doc({"train": {"healthy": {}, "unhealthy": {"a.jpeg": [{"box": [0, 0, 1, 1], "score": 0.5}]}}})
    with pytest.raises(ValueError, match=r"box 0: expected a box \[x1, y1, x2, y2\]"):
        read_boxes_json(write(tmp_path / "scored_v1.json", scored_v1))  # version 1 has no scores
    with pytest.raises(ValueError, match="not a lesion-box JSON"):
        read_boxes_json(write(tmp_path / "junk.json", "{"))


def test_boxes_json_version_2_scores_and_labels_round_trip(tmp_path: Path) -> None:
    boxes = {
        "train": SplitBoxes(
            healthy={"h.png": [(0.0, 0.0, 8.0, 8.0)]},
            unhealthy={"a.png": [(1.0, 2.0, 5.0, 6.0), (3.0, 3.0, 9.5, 7.0)], "b.png": [(0.0, 0.0, 4.0, 4.0)]},
            scores={"a.png": [0.9, 0.25]},
            labels={"a.png": ["Nodule", "Mass"]},
        )
    }
    out = tmp_path / "v2.json"
    write_boxes_json(boxes, out)
    doc = json.loads(out.read_text())
    assert doc["version"] == 2
    assert doc["splits"]["train"]["unhealthy"]["a.png"][1] == {
        "box": [3.0, 3.0, 9.5, 7.0],
        "score": 0.25,
        "label": "Mass",
    }
    assert doc["splits"]["train"]["unhealthy"]["b.png"] == [[0.0, 0.0, 4.0, 4.0]]  # unscored boxes stay 4 numbers
    assert read_boxes_json(out) == boxes


def test_boxes_json_version_1_still_read(tmp_path: Path) -> None:
    v1 = {"format": "mlcl_losses.lesion_boxes", "version": 1, "splits": {"train": {"unhealthy": {"a": [[0, 0, 2, 3]]}}}}
    path = write(tmp_path / "v1.json", json.dumps(v1))
    assert read_boxes_json(path) == {"train": SplitBoxes(unhealthy={"a": [(0.0, 0.0, 2.0, 3.0)]})}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"box": [0, 0, 1, 1], "score": float("nan")}, "expected `score` to be a finite number"),
        ({"box": [0, 0, 1, 1], "score": True}, "expected `score` to be a finite number"),
        ({"box": [0, 0, 1, 1], "label": ""}, "expected `label` to be a non-empty string"),
        ({"box": [0, 0, 1, 1], "confidence": 0.5}, "expected keys 'box' and optionally 'score', 'label'"),
        ({"score": 0.5}, "expected keys 'box'"),
    ],
    ids=["nan-score", "bool-score", "empty-label", "unknown-key", "no-box"],
)
def test_boxes_json_version_2_validates(tmp_path: Path, entry: dict, message: str) -> None:
    doc = {"format": "mlcl_losses.lesion_boxes", "version": 2, "splits": {"t": {"unhealthy": {"a": [entry]}}}}
    with pytest.raises(ValueError, match=rf"split 't', group 'unhealthy', image 'a', box 0: {message}"):
        read_boxes_json(write(tmp_path / "bad.json", json.dumps(doc)))


def test_boxes_json_version_2_every_box_or_none_scored(tmp_path: Path) -> None:
    doc = {
        "format": "mlcl_losses.lesion_boxes",
        "version": 2,
        "splits": {"t": {"unhealthy": {"a": [{"box": [0, 0, 1, 1], "score": 0.3}, [0, 0, 2, 2]]}}},
    }
    with pytest.raises(ValueError, match="image 'a': either every box or no box has a score"):
        read_boxes_json(write(tmp_path / "mixed.json", json.dumps(doc)))
    with pytest.raises(ValueError, match="1 scores for 2 boxes"):
        write_boxes_json(
            {"t": SplitBoxes(unhealthy={"a": [(0, 0, 1, 1), (0, 0, 2, 2)]}, scores={"a": [0.5]})}, tmp_path / "o.json"
        )
    with pytest.raises(ValueError, match="scores or labels of an image without lesion boxes: 'b'"):
        write_boxes_json({"t": SplitBoxes(unhealthy={"a": []}, scores={"b": [0.5]})}, tmp_path / "o.json")


def test_cli_convert_boxes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkl = tmp_path / "lesions.pkl"
    pkl.write_bytes(pickle.dumps(authors_pickle()))
    out = tmp_path / "lesions.json"
    assert boxes_module.main(["convert-boxes", str(pkl), str(out)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not out.exists()
    assert boxes_module.main(["convert-boxes", str(pkl), str(out), "--allow-pickle"]) == 0
    assert "train: 1 healthy images (2 boxes), 2 unhealthy images (2 boxes)" in capsys.readouterr().out
    assert read_boxes_json(out)["val"].unhealthy


@pytest.mark.slow
def test_cli_as_module(tmp_path: Path) -> None:
    """The documented command line, in a subprocess from the repository root."""
    pkl = tmp_path / "lesions.pkl"
    pkl.write_bytes(pickle.dumps(authors_pickle()))
    out = tmp_path / "lesions.json"
    cmd = [sys.executable, "-m", "examples.common.boxes", "convert-boxes", str(pkl), str(out), "--allow-pickle"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert read_boxes_json(out)["train"].healthy
