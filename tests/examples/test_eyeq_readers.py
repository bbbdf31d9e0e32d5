"""Tests of examples/eyeq/readers.py against fixture files in the exact published format."""

from __future__ import annotations

import doctest
from pathlib import Path

import examples.eyeq.readers as readers
import pytest
from examples.eyeq.readers import EyeQRecord, read_eyeq_labels

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


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


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


def test_docstring_examples_run() -> None:
    result = doctest.testmod(readers, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1
    assert result.failed == 0
