"""Tests of examples/common/datasets.py against fixture files in the exact published formats."""

from __future__ import annotations

import doctest
import json
import pickle
import subprocess
import sys
from pathlib import Path

import examples.common.datasets as ds
import numpy as np
import pytest
import torch
from examples.common.datasets import (
    CHESTXRAY14_LABELS,
    ChestRecord,
    EyeQRecord,
    SplitBoxes,
    assert_patient_disjoint,
    convert_pickle_boxes,
    load_image,
    multi_hot,
    multi_hot_matrix,
    read_bbox_list,
    read_boxes_json,
    read_data_entry,
    read_eyeq_labels,
    read_split,
    write_boxes_json,
)
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]

# Byte-for-byte style of the published files (HzFu/EyeQ data/Label_EyeQ_train.csv: pandas export
# with an unnamed index column, LF line ends).
EYEQ_TRAIN = (
    ",image,quality,DR_grade\n"
    "0,10009_left.jpeg,0,0\n"
    "1,10009_right.jpeg,0,0\n"
    "2,10014_left.jpeg,2,0\n"
    "6,10017_left.jpeg,1,4\n"
    "7,1002_left.jpeg,2,3\n"
)

# Data_Entry_2017.csv as released in 2017: the header ends with a comma, rows have 11 fields.
DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)
DATA_ENTRY_ROWS = (
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n"
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171\n"
    "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143\n"
    "00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168\n"
    "00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,5,13,60,M,AP,3056,2544,0.139,0.139\n"
)

# BBox_List_2017.csv: header with the split box column and three trailing empty names, 6-field rows.
BBOX_LIST = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661\n"
    "00014716_007.png,Atelectasis,686.101694915254,131.543498411017,185.491525423729,313.491525423729\n"
    "00020259_002.png,Infiltrate,611.555555555556,535.077934027778,249.173333333333,199.111111111111\n"
    "00013118_008.png,Effusion,100,200,30,40\n"
)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------
# EyeQ
# ------------------------------------------------------------------------------------------------


def test_eyeq_reads_real_format(tmp_path: Path) -> None:
    records = read_eyeq_labels(write(tmp_path / "Label_EyeQ_train.csv", EYEQ_TRAIN))
    assert records == [
        EyeQRecord("10009_left.jpeg", 0, 0),
        EyeQRecord("10009_right.jpeg", 0, 0),
        EyeQRecord("10014_left.jpeg", 2, 0),
        EyeQRecord("10017_left.jpeg", 1, 4),
        EyeQRecord("1002_left.jpeg", 2, 3),
    ]


def test_eyeq_crlf_bom_and_no_index_column(tmp_path: Path) -> None:
    crlf = "\ufeff" + EYEQ_TRAIN.replace("\n", "\r\n")
    assert len(read_eyeq_labels(write(tmp_path / "a.csv", crlf))) == 5
    no_index = "image,quality,DR_grade\n1_right.jpeg,1,0\n"
    assert read_eyeq_labels(write(tmp_path / "b.csv", no_index)) == [EyeQRecord("1_right.jpeg", 1, 0)]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        pytest.param("5,x.jpeg,3,0", "`quality` in 0..2, got 3", id="quality-out-of-range"),
        pytest.param("5,x.jpeg,0,5", "`DR_grade` in 0..4, got 5", id="grade-out-of-range"),
        pytest.param("5,x.jpeg,-1,0", "got -1", id="quality-negative"),
        pytest.param("5,x.jpeg,good,0", "integer `quality`, got 'good'", id="quality-not-int"),
        pytest.param("5,x.jpeg,0,1.5", "integer `DR_grade`, got '1.5'", id="grade-float"),
        pytest.param("5,x.jpeg,0", "expected 4 fields", id="missing-column"),
        pytest.param("5,,0,0", "empty `image`", id="empty-image"),
    ],
)
def test_eyeq_malformed_row_names_file_line_value(tmp_path: Path, row: str, needle: str) -> None:
    path = write(tmp_path / "Label_EyeQ_test.csv", EYEQ_TRAIN + row + "\n")
    with pytest.raises(ValueError, match="Label_EyeQ_test.csv:7: ") as info:
        read_eyeq_labels(path)
    assert needle in str(info.value)


def test_eyeq_bad_header_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bad\.csv:1: .*missing DR_grade"):
        read_eyeq_labels(write(tmp_path / "bad.csv", ",image,quality\n0,a.jpeg,0\n"))
    with pytest.raises(ValueError, match="is empty"):
        read_eyeq_labels(write(tmp_path / "empty.csv", ""))
    missing = tmp_path / "nope" / "Label_EyeQ_train.csv"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        read_eyeq_labels(missing)


# ------------------------------------------------------------------------------------------------
# ChestX-ray14
# ------------------------------------------------------------------------------------------------


def test_labels_official_order() -> None:
    assert CHESTXRAY14_LABELS == (
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural_Thickening",
        "Hernia",
    )


def test_data_entry_reads_real_format(tmp_path: Path) -> None:
    records = read_data_entry(write(tmp_path / "Data_Entry_2017.csv", DATA_ENTRY_HEADER + DATA_ENTRY_ROWS))
    assert [r.image for r in records][:3] == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    first = records[0]
    assert first == ChestRecord(
        image="00000001_000.png",
        labels=("Cardiomegaly",),
        patient_id=1,
        follow_up=0,
        age=58,
        gender="M",
        view_position="PA",
        original_size=(2682, 2749),
        pixel_spacing=(0.143, 0.143),
    )
    assert records[1].labels == ("Cardiomegaly", "Emphysema")
    assert records[2].labels == ()  # No Finding
    # labels come back in the official order, whatever the file's order
    assert records[5].labels == ("Infiltration", "Pneumothorax", "Emphysema", "Pleural_Thickening")
    assert records[5].patient_id == 13
    assert records[5].follow_up == 5


def test_data_entry_2020_header_and_short_rows(tmp_path: Path) -> None:
    text = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\r\n"
        "00000001_000.png,Cardiomegaly,0,1,057Y,F,PA,2682,2749,0.143,0.143\r\n"
        "00000002_000.png,No Finding,0,2,81,M,AP\r\n"
    )
    a, b = read_data_entry(write(tmp_path / "Data_Entry_2017_v2020.csv", text))
    assert a.age == 57
    assert a.gender == "F"
    assert a.original_size == (2682, 2749)
    assert b.original_size is None
    assert b.pixel_spacing is None
    assert b.view_position == "AP"


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        pytest.param("00000009_000.png,Pneumonitis,0,9,50,M,PA,1,1,0.1,0.1", "'Pneumonitis'", id="unknown-label"),
        pytest.param("00000009_000.png,Infiltrate,0,9,50,M,PA,1,1,0.1,0.1", "'Infiltrate'", id="bbox-spelling"),
        pytest.param("00000009_000.png,No Finding|Mass,0,9,50,M,PA,1,1,0.1,0.1", "No Finding", id="no-finding-mixed"),
        pytest.param("00000009_000.png,Mass|Mass,0,9,50,M,PA,1,1,0.1,0.1", "repeated", id="repeated-label"),
        pytest.param("00000009_000.png,,0,9,50,M,PA,1,1,0.1,0.1", "unknown label ''", id="empty-labels"),
        pytest.param("00000009_000.png,Mass,0,nine,50,M,PA,1,1,0.1,0.1", "`Patient ID`, got 'nine'", id="bad-patient"),
        pytest.param("00000009_000.png,Mass,0,9", "at least 7 fields", id="short-row"),
        pytest.param("00000001_000.png,Mass,0,9,50,M,PA,1,1,0.1,0.1", "already listed on line 2", id="duplicate"),
    ],
)
def test_data_entry_malformed(tmp_path: Path, row: str, needle: str) -> None:
    path = write(tmp_path / "Data_Entry_2017.csv", DATA_ENTRY_HEADER + DATA_ENTRY_ROWS + row + "\n")
    with pytest.raises(ValueError, match="Data_Entry_2017.csv:8: ") as info:
        read_data_entry(path)
    assert needle in str(info.value)


def test_data_entry_bad_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv:1: expected the Data_Entry_2017\.csv header"):
        read_data_entry(write(tmp_path / "Data_Entry_2017.csv", "Image Index,Finding Labels\na.png,Mass\n"))


def test_multi_hot(tmp_path: Path) -> None:
    records = read_data_entry(write(tmp_path / "d.csv", DATA_ENTRY_HEADER + DATA_ENTRY_ROWS))
    y = multi_hot_matrix(records)
    assert y.shape == (6, 14)
    assert y.dtype == torch.float32
    assert y[2].sum() == 0  # No Finding
    assert y[1].nonzero().flatten().tolist() == [1, 10]  # Cardiomegaly, Emphysema
    torch.testing.assert_close(y[4], multi_hot(["Nodule", "Mass"]))
    with pytest.raises(ValueError, match="'Infiltrate'"):
        multi_hot(["Infiltrate"])


def test_bbox_list_reads_split_header_and_maps_infiltrate(tmp_path: Path) -> None:
    boxes = read_bbox_list(write(tmp_path / "BBox_List_2017.csv", BBOX_LIST))
    assert list(boxes) == ["00013118_008.png", "00014716_007.png", "00020259_002.png"]
    (label, (x, y, w, h)), second = boxes["00013118_008.png"]
    assert label == "Atelectasis"
    assert (x, y, w, h) == pytest.approx((225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661))
    assert second == ("Effusion", (100.0, 200.0, 30.0, 40.0))
    assert boxes["00020259_002.png"][0][0] == "Infiltration"


def test_bbox_list_rows_with_trailing_empty_fields(tmp_path: Path) -> None:
    text = BBOX_LIST.replace("\n", ",,,\n").replace("[x,y,w,h],,,,,,", "[x,y,w,h],,,")
    boxes = read_bbox_list(write(tmp_path / "BBox_List_2017.csv", text))
    assert sum(len(v) for v in boxes.values()) == 4


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        pytest.param("a.png,Pneumonitis,1,2,3,4", "'Pneumonitis'", id="unknown-label"),
        pytest.param("a.png,Mass,1,2,3", "expected 6 fields", id="short-row"),
        pytest.param("a.png,Mass,1,2,0,4", "w > 0", id="zero-width"),
        pytest.param("a.png,Mass,1,y,3,4", "number `y`, got 'y'", id="not-a-number"),
        pytest.param("a.png,Mass,1,2,3,nan", "finite `h`", id="nan"),
        pytest.param("a.png,Mass,1,2,3,4,5", "nothing after", id="extra-field"),
    ],
)
def test_bbox_list_malformed(tmp_path: Path, row: str, needle: str) -> None:
    path = write(tmp_path / "BBox_List_2017.csv", BBOX_LIST + row + "\n")
    with pytest.raises(ValueError, match="BBox_List_2017.csv:6: ") as info:
        read_bbox_list(path)
    assert needle in str(info.value)


def test_read_split(tmp_path: Path) -> None:
    path = write(tmp_path / "test_list.txt", "00000003_000.png\n00000003_001.png\n\n00000003_002.png")
    assert read_split(path) == ["00000003_000.png", "00000003_001.png", "00000003_002.png"]
    with pytest.raises(ValueError, match=r"dup\.txt:3: .*already listed on line 1"):
        read_split(write(tmp_path / "dup.txt", "a.png\nb.png\na.png\n"))
    with pytest.raises(ValueError, match=r"two\.txt:1: expected one image name per line"):
        read_split(write(tmp_path / "two.txt", "a.png b.png\n"))
    with pytest.raises(FileNotFoundError, match="train_val_list.txt"):
        read_split(tmp_path / "train_val_list.txt")


def test_patient_disjoint(tmp_path: Path) -> None:
    records = read_data_entry(write(tmp_path / "d.csv", DATA_ENTRY_HEADER + DATA_ENTRY_ROWS))
    train = read_split(write(tmp_path / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000002_000.png\n"))
    test = read_split(write(tmp_path / "test_list.txt", "00000003_000.png\n00000004_000.png\n"))
    assert_patient_disjoint(records, train, test)  # no error
    with pytest.raises(ValueError, match=r"1 patient\(s\) .* e\.g\. patient 1 \('00000001_000\.png' in train, "):
        assert_patient_disjoint(records, ["00000001_000.png"], ["00000001_001.png", "00000003_000.png"])
    with pytest.raises(ValueError, match="in both the train and the test list"):
        assert_patient_disjoint(records, ["00000001_000.png"], ["00000001_000.png"])
    with pytest.raises(ValueError, match="'zzz.png' of the test list is not in the data entry"):
        assert_patient_disjoint(records, train, ["zzz.png"])


# ------------------------------------------------------------------------------------------------
# lesion boxes
# ------------------------------------------------------------------------------------------------


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
    assert ds.main(["convert-boxes", str(pkl), str(out)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not out.exists()
    assert ds.main(["convert-boxes", str(pkl), str(out), "--allow-pickle"]) == 0
    assert "train: 1 healthy images (2 boxes), 2 unhealthy images (2 boxes)" in capsys.readouterr().out
    assert read_boxes_json(out)["val"].unhealthy


@pytest.mark.slow
def test_cli_as_module(tmp_path: Path) -> None:
    """The documented command line, in a subprocess from the repository root."""
    pkl = tmp_path / "lesions.pkl"
    pkl.write_bytes(pickle.dumps(authors_pickle()))
    out = tmp_path / "lesions.json"
    cmd = [sys.executable, "-m", "examples.common.datasets", "convert-boxes", str(pkl), str(out), "--allow-pickle"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert read_boxes_json(out)["train"].healthy


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------


def test_load_image_rgb_gray_and_resize(tmp_path: Path) -> None:
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[2, 3] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "f.png")
    x = load_image(tmp_path / "f.png")
    assert x.shape == (3, 6, 8)
    assert x.dtype == torch.float32
    assert x[:, 2, 3].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    assert x[0, 0, 0] == 1.0
    g = load_image(tmp_path / "f.png", mode="L", size=(3, 4))
    assert g.shape == (1, 3, 4)
    assert float(g.min()) >= 0.0
    assert float(g.max()) <= 1.0
    assert load_image(tmp_path / "f.png", size=5).shape == (3, 5, 5)


def test_load_image_gray_to_rgb_and_16_bit(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 128, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", mode="RGB")
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x, torch.full((3, 4, 4), 128 / 255))
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(tmp_path / "x16.png")
    y = load_image(tmp_path / "x16.png", mode="L")
    assert y.shape == (1, 4, 5)
    torch.testing.assert_close(y, torch.ones(1, 4, 5))


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"cannot decode image .*corrupt\.png"):
        load_image(tmp_path / "corrupt.png")
    buf = tmp_path / "full.jpeg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buf)
    (tmp_path / "truncated.jpeg").write_bytes(buf.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.jpeg"):
        load_image(tmp_path / "truncated.jpeg")
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="Expected `mode`"):
        load_image(tmp_path / "ok.png", mode="CMYK")  # type: ignore[arg-type]
    for size in (0, (2, 0), (2.0, 3), True, (1, 2, 3)):
        with pytest.raises(ValueError, match="`size`"):
            load_image(tmp_path / "ok.png", size=size)  # type: ignore[arg-type]


def test_docstring_examples_run() -> None:
    result = doctest.testmod(ds, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2
    assert result.failed == 0


def test_label_list_matches_the_synthetic_data() -> None:
    """The readers keep their own copy (so the converter CLI starts without torch); it must not drift."""
    from mlcl_losses.synthetic import CHESTXRAY14_LABELS

    assert ds.CHESTXRAY14_LABELS == CHESTXRAY14_LABELS
