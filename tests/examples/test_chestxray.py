"""End-to-end tests of the ChestX-ray14 pipeline (examples/chestxray/train.py) on the tiny config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from examples.chestxray.data import LABELS, image_quality
from examples.chestxray.train import main
from examples.common.boxes import SplitBoxes, write_boxes_json
from examples.common.config import FinetuneConfig
from examples.common.evaluate import multilabel_metrics
from examples.common.task import MultiLabelTask
from PIL import Image
from pipeline_helpers import assert_clear_error, assert_run_files_known, read_metrics, run_tiny, set_args

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "chestxray" / "configs" / "tiny.yaml"
METRIC_KEYS = {"mean_auc", "per_label_auc", "per_quality"}


def _run(out: Path, cache: Path, *extra: str) -> int:
    return run_tiny(main, TINY, out, cache, *extra)


_metrics = read_metrics


def _check_metrics(m: dict) -> None:
    assert METRIC_KEYS <= set(m)
    assert list(m["per_label_auc"]) == list(LABELS)
    assert set(m["per_quality"]) == {"good", "usable", "reject"}
    for group in m["per_quality"].values():
        assert {"mean_auc", "per_label_auc", "labels_scored", "labels_skipped"} <= set(group)
        scored = [v for v in group["per_label_auc"].values() if v is not None]
        assert len(scored) == group["labels_scored"] == len(LABELS) - len(group["labels_skipped"])


# ---------------------------------------------------------------- metrics


def test_multilabel_metrics_skip_absent_labels() -> None:
    names = ["a", "b", "c"]
    target = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    probs = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.5, 0.3], [0.8, 0.4, 0.1], [0.1, 0.3, 0.9]])
    m = multilabel_metrics(probs, target, names)
    assert m["per_label_auc"]["a"] == pytest.approx(1.0)
    assert math.isnan(m["per_label_auc"]["b"])  # no positive
    assert math.isnan(m["per_label_auc"]["c"])  # no negative
    assert m["mean_auc"] == pytest.approx(1.0)  # the mean of the scorable label only
    assert m["labels_skipped"] == ["b", "c"]
    assert math.isnan(multilabel_metrics(probs, torch.zeros(4, 3), names)["mean_auc"])
    with pytest.raises(ValueError, match=r"must both be \(N, 3\)"):
        multilabel_metrics(probs[:, :2], target[:, :2], names)


def test_multilabel_task_loss_and_accuracy() -> None:
    task = MultiLabelTask(["a", "b"], torch.tensor([2.0, 1.0]))
    logits = torch.tensor([[1.0, -1.0], [-2.0, 0.5]])
    target = task.prepare_target(torch.tensor([[1, 0], [1, 1]]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor([2.0, 1.0]))
    cfg = FinetuneConfig()
    torch.testing.assert_close(task.loss(logits, target, cfg), expected)
    assert task.correct(logits, target) == (3, 4)
    torch.testing.assert_close(task.activation(logits), torch.sigmoid(logits))
    assert task.plot.ylabel == "mean AUC over the 2 labels"
    with pytest.raises(ValueError, match="pos_weight"):
        MultiLabelTask(["a", "b"], torch.ones(3))


# ---------------------------------------------------------------- synthetic pipeline


def test_smoke_full_pipeline(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "--set", f"data.synthetic.cache_dir={cache_dir}"]) == 0
    _check_metrics(_metrics(out))
    assert (out / "checkpoint.pt").is_file()
    assert (out / "config.yaml").is_file()
    scalars = (out / "scalars.csv").read_text()
    assert "pretrain" in scalars
    assert "test,1," in scalars
    assert any((out / "tensorboard").iterdir())


def test_resume_equals_uninterrupted(tmp_path: Path, cache_dir: Path) -> None:
    # 1 pre-training epoch + 2 fine-tuning epochs; interrupt after 2 epochs (mid fine-tuning)
    args = ["--set", "finetune.epochs=2", "--set", "loss.pos_weight=true"]
    assert _run(tmp_path / "full", cache_dir, *args) == 0
    assert _run(tmp_path / "cut", cache_dir, *args, "--stop-after-epochs", "2") == 0
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert _run(tmp_path / "cut", cache_dir, *args, "--resume") == 0
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")


@pytest.mark.slow
def test_compare_and_seeds(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "cmp"
    assert _run(out, cache_dir, "--compare", "--methods", "ce,supcon,comcl", "--seeds", "2") == 0
    results = json.loads((out / "compare.json").read_text())
    assert list(results) == ["ce", "supcon", "comcl"]
    for m in results.values():
        assert m["seeds"] == [0, 1]
        assert {"mean_auc", "per_label_auc", "per_quality", "std", "auc_drop"} <= set(m)
    table = (out / "compare.md").read_text()
    assert "CoMCL (full)" in table
    assert "BCE only" in table
    assert "±" in table
    assert (out / "compare_auc.png").stat().st_size > 1000
    assert (out / "paired_mean_auc.png").is_file()
    assert_run_files_known(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "/nonexistent/cfg.yaml"], "does not exist"),
        (["--set", "pretrain.epoch=2"], "did you mean 'epochs'"),
        (["--set", "loss.max_pos_weight=0.5"], "loss.max_pos_weight: expected a number >= 1"),
        (
            ["--set", "data.source=chestxray14", "--set", "data.chestxray14.root=/nonexistent/cxr"],
            "data.chestxray14.root: directory '/nonexistent/cxr' does not exist",
        ),
        (["--resume"], "no checkpoint to resume from"),
        (["--compare", "--methods", "ce,nope"], "--methods"),
    ],
    ids=["missing-config", "unknown-key", "bad-value", "missing-data-root", "resume-without-checkpoint", "bad-method"],
)
def test_clear_errors(tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(main, TINY, tmp_path / "o", args, lambda: capsys.readouterr().err, message)


# ---------------------------------------------------------------- real ChestX-ray14 format

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)
# (image, labels, patient); patients 1-4 train, 5-6 test
ENTRIES = [
    ("00000001_000.png", "Cardiomegaly", 1),
    ("00000001_001.png", "Cardiomegaly|Effusion", 1),
    ("00000002_000.png", "No Finding", 2),
    ("00000003_000.png", "Infiltration|Mass", 3),
    ("00000004_000.png", "No Finding", 4),
    ("00000004_001.png", "Nodule", 4),
    ("00000005_000.png", "Cardiomegaly", 5),
    ("00000005_001.png", "No Finding", 5),
    ("00000006_000.png", "Effusion|Infiltration", 6),
    ("00000006_001.png", "Mass", 6),
]
TRAIN = [e[0] for e in ENTRIES if e[2] <= 4]
TEST = [e[0] for e in ENTRIES if e[2] > 4]
BBOX = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    "00000001_000.png,Cardiomegaly,30.5,40.25,50.0,40.0\n"
    "00000003_000.png,Infiltrate,10,12,30,28\n"
    "00000003_000.png,Mass,60,70,20,20\n"
    "00000006_000.png,Effusion,20,20,40,40\n"  # a test image: not used for pre-training
)


def _fixture_chestxray(root: Path, entries: list[tuple[str, str, int]] = ENTRIES) -> None:
    (root / "images").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name, _labels, _pid in entries:
        pixels = (torch.rand(128, 128, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(root / "images" / name)
    rows = "".join(
        f"{name},{labels},{int(name[9:12])},{pid},{40 + pid},M,PA,2500,2048,0.171,0.171\n"
        for name, labels, pid in entries
    )
    (root / "Data_Entry_2017.csv").write_text(DATA_ENTRY_HEADER + rows)
    (root / "BBox_List_2017.csv").write_text(BBOX)
    (root / "train_val_list.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "test_list.txt").write_text("\n".join(TEST) + "\n")


def _real_args(root: Path) -> list[str]:
    return set_args(
        "data.source=chestxray14",
        f"data.chestxray14.root={root}",
        "data.chestxray14.view_image_size=64",
        "run.tensorboard=false",
    )


def test_real_chestxray14_format(tmp_path: Path) -> None:
    root = tmp_path / "cxr"
    _fixture_chestxray(root)
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), *_real_args(root)]) == 0
    m = _metrics(out)
    _check_metrics(m)
    assert sum(g["n"] for g in m["per_quality"].values()) == m["n"] == len(TEST)


def test_real_detector_json_boxes(tmp_path: Path) -> None:
    root = tmp_path / "cxr"
    _fixture_chestxray(root)
    boxes = {
        "train": SplitBoxes(
            healthy={"images/00000002_000.png": [(5.0, 5.0, 40.0, 40.0)]},
            unhealthy={"images/00000004_001.png": [(50.0, 50.0, 80.0, 90.0)]},
        )
    }
    write_boxes_json(boxes, root / "boxes.json")
    out = tmp_path / "run"
    args = [
        *_real_args(root),
        "--set",
        "data.chestxray14.bbox_list=null",
        "--set",
        "data.chestxray14.boxes_json=boxes.json",
    ]
    assert main(["--config", str(TINY), "--out", str(out), "--method", "supcon", *args]) == 0
    _check_metrics(_metrics(out))


def test_real_train_and_test_patients_disjoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cxr"
    _fixture_chestxray(root)
    # the shipped fixture is disjoint
    from examples.chestxray.readers import assert_patient_disjoint, read_data_entry, read_split

    records = read_data_entry(root / "Data_Entry_2017.csv")
    assert_patient_disjoint(records, read_split(root / "train_val_list.txt"), read_split(root / "test_list.txt"))
    # a test list holding an image of a training patient is refused before anything trains
    (root / "test_list.txt").write_text("\n".join([*TEST, "00000001_001.png"]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(t for t in TRAIN if t != "00000001_001.png") + "\n")
    assert main(["--config", str(TINY), "--out", str(tmp_path / "o"), *_real_args(root)]) == 2
    err = capsys.readouterr().err
    assert "patient 1" in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "images" / "00000005_000.png").unlink(), "1 image(s) of the test list are not in"),
        (
            lambda r: (r / "BBox_List_2017.csv").write_text(BBOX + "00000001_000.png,Tumour,1,2,3,4\n"),
            "unknown `Finding Label` 'Tumour'",
        ),
        (
            lambda r: (r / "BBox_List_2017.csv").write_text(BBOX + "00000001_000.png,Mass,1,2,-3,4\n"),
            "w > 0 and h > 0",
        ),
        (
            lambda r: (r / "Data_Entry_2017.csv").write_text(
                (r / "Data_Entry_2017.csv").read_text().replace("Cardiomegaly|Effusion", "Cardiomegaly|Flu")
            ),
            "unknown label 'Flu'",
        ),
        (lambda r: (r / "Data_Entry_2017.csv").write_text("Image,Label\n"), "expected the Data_Entry_2017.csv header"),
        (lambda r: (r / "test_list.txt").unlink(), "test_list.txt"),
        (
            lambda r: (r / "BBox_List_2017.csv").write_text(BBOX.splitlines()[0] + "\n" + BBOX.splitlines()[-1] + "\n"),
            "no image of train_val_list.txt has a lesion box",
        ),
    ],
    ids=[
        "missing-image",
        "bad-box-label",
        "bad-box-size",
        "bad-entry-label",
        "bad-entry-header",
        "missing-split",
        "no-train-boxes",
    ],
)
def test_real_malformed_input(tmp_path: Path, mutate, message: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    root = tmp_path / "cxr"
    _fixture_chestxray(root)
    mutate(root)
    assert main(["--config", str(TINY), "--out", str(tmp_path / "o"), *_real_args(root)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_real_quality_is_fixed_per_image() -> None:
    probs = (0.5, 0.3, 0.2)
    q = [image_quality(f"{i:08d}_000.png", 2000, probs) for i in range(300)]
    assert q == [image_quality(f"{i:08d}_000.png", 2000, probs) for i in range(300)]
    counts = [q.count(k) for k in range(3)]
    assert all(c > 30 for c in counts)


@pytest.mark.parametrize("name", ["default", "tiny", "real_gpu", "real_cpu"])
def test_shipped_configs_load(name: str) -> None:
    from examples.chestxray.train import ChestXrayConfig
    from examples.common.config import load_config

    cfg = load_config(ChestXrayConfig, REPO / "examples" / "chestxray" / "configs" / f"{name}.yaml")
    assert cfg.run.method == "comcl"
    if name == "real_cpu":
        assert (cfg.data.source, cfg.run.device) == ("chestxray14", "cpu")
        assert cfg.data.image_size <= 128


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("boxes_json=''", "null or a file path"),
        ("bbox_list=' '", "null or a file path"),
        ("data_entry=''", "a file or folder path"),
        ("images=''", "a file or folder path"),
    ],
)
def test_empty_real_data_paths_are_config_errors(setting: str, expected: str) -> None:
    from examples.chestxray.train import ChestXrayConfig
    from examples.common.config import ConfigError, load_config

    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"data\.chestxray14\.{key}: expected {expected}"):
        load_config(ChestXrayConfig, None, [f"data.chestxray14.{setting}"])


def test_synthetic_source_with_a_real_root_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.chestxray.train import main as chest_main

    tiny = REPO / "examples" / "chestxray" / "configs" / "tiny.yaml"
    args = ["--config", str(tiny), "--out", str(tmp_path / "r"), "--set", f"data.chestxray14.root={tmp_path}"]
    assert chest_main(args) == 2
    assert "data.source: is 'synthetic', but data.chestxray14.root is set" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_real_ce_run_then_proposed_boxes_per_positive_label(tmp_path: Path) -> None:
    from examples.common.boxes import read_boxes_json
    from examples.common.propose_boxes import main as propose_main

    root = tmp_path / "cxr"
    _fixture_chestxray(root)
    run = tmp_path / "ce"
    args = ["--config", str(TINY), "--out", str(run), *_real_args(root), "--set", "data.chestxray14.bbox_list=null"]
    assert main([*args, "--method", "ce"]) == 0  # a ce run needs no boxes at all
    out = tmp_path / "proposed.json"
    assert propose_main([str(run), "--out", str(out), "--layer", "layer2", "--min-size", "8"]) == 0
    split = read_boxes_json(out)["train"]
    positives = {name: set(labels.split("|")) - {"No Finding"} for name, labels, _ in ENTRIES if name in TRAIN}
    assert set(split.healthy) == {n for n, p in positives.items() if not p}  # No Finding: listed healthy, no box
    assert split.unhealthy, "no image got a box"
    for name, boxes in split.unhealthy.items():
        assert positives[name]
        assert set(split.labels[name]) <= positives[name]  # each box is evidence of one of its own labels
        assert len(split.scores[name]) == len(boxes)
        b = torch.tensor(boxes)
        assert bool((b >= 0).all())
        assert bool((b <= 128).all())
        assert bool((b[:, 2:] - b[:, :2] >= 8 - 1e-4).all())
