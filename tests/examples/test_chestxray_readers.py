"""Tests of examples/chestxray/readers.py against fixture files in the exact published formats."""

from __future__ import annotations

import doctest
from pathlib import Path

import examples.chestxray.readers as readers
import pytest
import torch
from examples.chestxray.readers import (
    ChestRecord,
    assert_patient_disjoint,
    multi_hot,
    multi_hot_matrix,
    read_bbox_list,
    read_data_entry,
    read_split,
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


def test_docstring_examples_run() -> None:
    result = doctest.testmod(readers, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1
    assert result.failed == 0
