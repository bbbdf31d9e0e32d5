"""The predict command: a tiny trained run applied to image files, folders and CSVs (real photographs included)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from examples.chestxray.predict import main as chest_predict
from examples.chestxray.train import main as chest_main
from examples.common.predict import main as predict_main
from examples.common.trained import read_checkpoint
from examples.eyeq.predict import main as eyeq_predict
from examples.eyeq.train import main as eyeq_main
from PIL import Image
from pipeline_helpers import read_metrics, real_photograph_eyeq, run_tiny

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the real photographs")

REPO = Path(__file__).resolve().parents[2]
EYEQ_TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
CHEST_TINY = REPO / "examples" / "chestxray" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def eyeq_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny ``ce`` run on EyeQ-layout files made from the real photograph ``skimage.data.retina()``."""
    tmp = tmp_path_factory.mktemp("predict_eyeq")
    root = tmp / "EyeQ"
    real_photograph_eyeq(root, n_train=8, n_test=5, size=96)
    out = tmp / "run"
    args = ["--config", str(EYEQ_TINY), "--out", str(out), "--method", "ce", "--set", "run.tensorboard=false"]
    args += ["--set", "data.source=eyeq", "--set", f"data.eyeq.root={root}", "--set", "data.eyeq.view_image_size=64"]
    assert eyeq_main([*args, "--set", "data.image_size=64"]) == 0
    return root, out


@pytest.fixture(scope="module")
def chest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("predict_chest")
    out = tmp / "run"
    assert run_tiny(chest_main, CHEST_TINY, out, tmp / "cache", "--method", "ce") == 0
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predict_reproduces_the_runs_test_metrics(eyeq_run: tuple[Path, Path], tmp_path: Path) -> None:
    from examples.common.evaluate import grouped_metrics

    root, run = eyeq_run
    out = tmp_path / "pred.csv"
    assert eyeq_predict([str(run), str(root / "test"), "--out", str(out)]) == 0
    rows = _read_csv(out)
    table = [line.split(",") for line in (root / "Label_EyeQ_test.csv").read_text().split()[1:]]
    labels = {name: (int(grade), int(quality)) for _, name, quality, grade in table}
    names = [Path(r["image"]).name for r in rows]
    assert names == sorted(labels)  # a folder: its images, sorted by name
    for r in rows:
        probs = [float(r[f"p_grade_{g}"]) for g in range(5)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert float(r["confidence"]) == pytest.approx(max(probs))
        assert probs[int(r["grade"])] == max(probs)
    # the run's own test metrics, recomputed from the predictions: same model, input size and preprocessing
    probs = torch.tensor([[float(r[f"p_grade_{g}"]) for g in range(5)] for r in rows])
    target = torch.tensor([labels[n][0] for n in names])
    groups = torch.tensor([labels[n][1] for n in names])
    again = grouped_metrics(probs, target, groups, ("Good", "Usable", "Reject"), 5)
    expected = read_metrics(run)
    for key in ("accuracy", "kappa", "macro_f1", "auc"):
        assert again[key] == pytest.approx(expected[key], abs=1e-5, nan_ok=True), key


def test_predict_on_the_full_size_real_photograph_file_csv_and_json(
    eyeq_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = eyeq_run
    photo = tmp_path / "retina.png"
    Image.fromarray(skimage_data.retina()).save(photo)  # 1411 x 1411, resized to the model's 64 px
    listing = tmp_path / "list.csv"
    listing.write_text("id,path\n0,retina.png\n1,retina.png\n")
    single, from_csv = tmp_path / "one.json", tmp_path / "list.csv.json"
    assert predict_main([str(run / "checkpoint.pt"), str(photo), "--out", str(single)]) == 0
    assert predict_main([str(run), str(listing), "--out", str(from_csv)]) == 0
    one = json.loads(single.read_text())
    assert one["meta"]["pipeline"] == "eyeq"
    assert one["meta"]["image_size"] == 64
    assert len(one["predictions"]) == 1
    rows = json.loads(from_csv.read_text())["predictions"]
    assert len(rows) == 2
    for row in rows:
        for key in ("grade", "confidence", *(f"p_grade_{g}" for g in range(5))):
            assert row[key] == pytest.approx(one["predictions"][0][key], abs=1e-5)  # batch of 2 vs 1


def test_predict_chestxray_on_a_grayscale_image(chest_run: Path, tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(skimage_data.microaneurysms()).save(gray)  # 1 channel: repeated to the encoder's 3
    rgb_gray = tmp_path / "gray_rgb.png"
    Image.fromarray(skimage_data.microaneurysms()).convert("RGB").save(rgb_gray)  # 3 equal channels
    out = tmp_path / "p.csv"
    folder = tmp_path
    assert chest_predict([str(chest_run), str(folder), "--out", str(out)]) == 0
    rows = _read_csv(out)
    assert len(rows) == 2
    from mlcl_losses.synthetic import CHESTXRAY14_LABELS

    assert list(rows[0]) == ["image", "confidence", *CHESTXRAY14_LABELS, "notes"]
    assert rows[0]["notes"] == rows[1]["notes"] == ""  # real X-ray details, larger than the input
    for key in CHESTXRAY14_LABELS:
        assert 0.0 < float(rows[0][key]) < 1.0
        assert float(rows[0][key]) == pytest.approx(float(rows[1][key]), abs=1e-5)  # same grey image


def test_predict_notes_blank_and_small_images(
    eyeq_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scores are still given, but a blank file, a tiny one and both are noted; a real photograph is not."""
    _, run = eyeq_run
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(skimage_data.retina()).save(folder / "a_retina.png")
    Image.new("RGB", (3, 3)).save(folder / "b_black_3px.png")  # blank and small
    Image.new("RGB", (200, 120), (255, 255, 255)).save(folder / "c_white.png")  # blank only
    Image.fromarray(skimage_data.retina()[::100, ::100]).save(folder / "d_retina_15px.png")  # small only
    out = tmp_path / "p.csv"
    assert eyeq_predict([str(run), str(folder), "--out", str(out)]) == 0
    notes = {Path(r["image"]).name: r["notes"] for r in _read_csv(out)}
    assert notes["a_retina.png"] == ""
    assert notes["b_black_3px.png"] == "blank: every pixel of the input has one value; small: 3x3 px upscaled to 64x64"
    assert notes["c_white.png"] == "blank: every pixel of the input has one value"
    assert notes["d_retina_15px.png"] == "small: 15x15 px upscaled to 64x64"
    printed = capsys.readouterr().out
    assert "warning: 3 image(s) noted in the `notes` column" in printed
    assert "a_retina.png" not in printed


def test_predict_errors(eyeq_run: tuple[Path, Path], chest_run: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    _, run = eyeq_run
    out = tmp_path / "p.csv"

    def error(fn, *args: str) -> str:  # noqa: ANN001
        assert fn([*args, "--out", str(out)]) == 2
        return capsys.readouterr().err

    gray = tmp_path / "gray.png"
    Image.fromarray(skimage_data.microaneurysms()).save(gray)
    assert "expected a colour fundus photograph with 3 channels (RGB), got 1" in error(
        eyeq_predict, str(run), str(gray)
    )
    colour = tmp_path / "colour.png"
    Image.fromarray(skimage_data.retina()[::8, ::8]).save(colour)
    assert "expected a grayscale X-ray (1 channel, or 3 equal ones), got 3" in error(
        chest_predict, str(chest_run), str(colour)
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert f"cannot decode image {broken}" in error(eyeq_predict, str(run), str(broken))
    assert "is a checkpoint of the chestxray pipeline, not of eyeq" in error(eyeq_predict, str(chest_run), str(colour))
    assert "is a checkpoint of the eyeq pipeline, not of chestxray" in error(chest_predict, str(run), str(gray))
    assert "no checkpoint at" in error(predict_main, str(tmp_path), str(colour))
    assert "INPUT: no such file or folder" in error(predict_main, str(run), str(tmp_path / "none.png"))
    listing = tmp_path / "bad.csv"
    listing.write_text("path\nmissing.png\n")
    assert "line 2: image not found" in error(predict_main, str(run), str(listing))
    assert predict_main([str(run), str(colour), "--out", str(tmp_path / "p.txt")]) == 2
    assert "--out: expected a .csv or .json file" in capsys.readouterr().err
    assert not out.exists()  # nothing written on an error


def test_predict_refuses_a_run_still_in_pretraining(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    assert run_tiny(eyeq_main, EYEQ_TINY, out, tmp_path / "cache", "--stop-after-epochs", "1") == 0
    assert read_checkpoint(out)[1]["stage"] == "pretrain"
    photo = tmp_path / "retina.png"
    Image.fromarray(skimage_data.retina()[::8, ::8]).save(photo)
    assert predict_main([str(out), str(photo), "--out", str(tmp_path / "p.csv")]) == 2
    assert "no fine-tuned classifier yet" in capsys.readouterr().err


def test_predict_never_replaces_its_input_or_the_runs_files(
    eyeq_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    _, run = eyeq_run
    photo = tmp_path / "retina.png"
    Image.fromarray(skimage_data.retina()[::8, ::8]).save(photo)
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{photo}\n")
    text = listing.read_text()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert predict_main([str(run), str(listing), "--out", str(listing), "--overwrite"]) == 2
    assert "--out: expected a file other than INPUT" in capsys.readouterr().err
    assert listing.read_text() == text
    for target in (run / "metrics.json", run / "new.json", run / "checkpoint.pt" / ".." / "p.csv"):
        assert predict_main([str(run / "checkpoint.pt"), str(photo), "--out", str(target), "--overwrite"]) == 2
        assert "--out: expected a file outside the run directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    out = tmp_path / "pred.csv"
    out.write_text("mine")
    assert predict_main([str(run), str(photo), "--out", str(out)]) == 2
    assert f"--out: '{out}' already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "mine"
    assert predict_main([str(run), str(photo), "--out", str(out), "--overwrite"]) == 0
    assert len(_read_csv(out)) == 1


def test_predict_skips_unusable_images_with_a_note(
    eyeq_run: tuple[Path, Path],
    tmp_path: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    _, run = eyeq_run
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(skimage_data.retina()).resize((30, 30)).save(folder / "a_good.png")  # 900 px, under the limit
    (folder / "b_broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 40)).save(folder / "c_bomb.png")  # 1600 px, over the (lowered) limit
    Image.new("RGB", (50, 50)).save(folder / "d_bigger_bomb.png")  # over twice the limit: PIL's error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = tmp_path / "p.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's raw DecompressionBombWarning must not escape
        assert predict_main([str(run), str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: 3 image(s) skipped" in printed
    rows = json.loads(out.read_text())["predictions"]
    assert [Path(r["image"]).name for r in rows] == ["a_good.png", "b_broken.jpg", "c_bomb.png", "d_bigger_bomb.png"]
    assert rows[0]["grade"] is not None
    assert rows[1]["notes"].startswith("skipped: cannot decode image")
    assert rows[1]["grade"] is None
    assert rows[1]["p_grade_0"] is None
    assert "too large to decode safely" in rows[2]["notes"]
    assert "too large to decode safely" in rows[3]["notes"]
    csv_out = tmp_path / "p.csv"
    assert predict_main([str(run), str(folder), "--out", str(csv_out)]) == 0
    assert _read_csv(csv_out)[1]["grade"] == ""
    # nothing usable: exit 2, nothing written
    (folder / "a_good.png").unlink()
    none_out = tmp_path / "none.csv"
    assert predict_main([str(run), str(folder), "--out", str(none_out)]) == 2
    assert "INPUT: no image could be used" in capsys.readouterr().err
    assert not none_out.exists()


def test_predict_run_argument_errors_say_what_to_give(eyeq_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    _, run = eyeq_run
    photo = tmp_path / "retina.png"
    Image.fromarray(skimage_data.retina()[::8, ::8]).save(photo)
    out = str(tmp_path / "p.csv")
    assert predict_main([str(run / "config.yaml"), str(photo), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: it is not a checkpoint" in err
    assert "weights_only" not in err
    cmp = tmp_path / "cmp"
    for sub in ("ce/seed0", "ce/seed1"):
        (cmp / sub).mkdir(parents=True)
        (cmp / sub / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    assert predict_main([str(cmp), str(photo), "--out", out]) == 2
    assert f"runs below it (a comparison's METHOD/seedN): {cmp / 'ce/seed0'}, {cmp / 'ce/seed1'}" in (
        capsys.readouterr().err
    )


def test_predict_warns_about_an_interrupted_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    cut = ("--method", "ce", "--set", "finetune.epochs=2", "--stop-after-epochs", "1")
    assert run_tiny(eyeq_main, EYEQ_TINY, out, tmp_path / "cache", *cut) == 0
    photo = tmp_path / "retina.png"
    Image.fromarray(skimage_data.retina()[::8, ::8]).save(photo)
    capsys.readouterr()
    assert predict_main([str(out), str(photo), "--out", str(tmp_path / "p.json")]) == 0
    assert "after fine-tuning epoch 1 of 2 (an interrupted run)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "p.json").read_text())["meta"]
    assert meta["run_state"] == {"stage": "finetune", "epoch": 1, "epochs": 2, "finished": False}
