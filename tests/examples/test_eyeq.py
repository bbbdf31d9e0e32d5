"""End-to-end tests of the EyeQ pipeline (examples/eyeq/train.py) on the tiny config."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from examples.common.boxes import SplitBoxes, write_boxes_json
from examples.common.checkpoint import load_checkpoint
from examples.eyeq.train import main
from PIL import Image
from pipeline_helpers import assert_clear_error, read_metrics, run_tiny, set_args

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
METRIC_KEYS = {"accuracy", "kappa", "macro_f1", "auc"}


def _run(out: Path, cache: Path, *extra: str) -> int:
    return run_tiny(main, TINY, out, cache, *extra)


_metrics = read_metrics


def _check_metrics(m: dict) -> None:
    assert METRIC_KEYS <= set(m)
    assert set(m["per_quality"]) == {"good", "usable", "reject"}
    for group in m["per_quality"].values():
        assert METRIC_KEYS <= set(group)


def test_smoke_full_pipeline(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "--set", f"data.synthetic.cache_dir={cache_dir}"]) == 0
    printed = capsys.readouterr()
    for line in ("config         ", "method         comcl", "seed           0", "device         cpu", "torch threads"):
        assert line in printed.out  # the header
    assert f"output         {out}" in printed.out
    assert "train accuracy" in printed.out
    assert "\r" not in printed.err  # no progress bars in redirected output
    assert (out / "summary.png").stat().st_size > 1000
    _check_metrics(_metrics(out))
    assert (out / "checkpoint.pt").is_file()
    assert (out / "config.yaml").is_file()
    assert (out / "scalars.csv").read_text().count("pretrain") > 0
    assert any((out / "tensorboard").iterdir())


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path: Path, cache_dir: Path) -> None:
    # 1 pre-training epoch + 2 fine-tuning epochs; interrupt after 2 epochs (mid fine-tuning)
    args = ["--set", "finetune.epochs=2"]
    assert _run(tmp_path / "full", cache_dir, *args) == 0
    assert _run(tmp_path / "cut", cache_dir, *args, "--stop-after-epochs", "2") == 0
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert _run(tmp_path / "cut", cache_dir, *args, "--resume") == 0
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")
    timing = json.loads((tmp_path / "cut" / "timing.json").read_text())
    assert {"pretrain_s", "finetune_s", "evaluate_s"} <= set(timing)  # the first session's time is kept


@pytest.mark.slow
def test_resume_mid_pretraining_equals_uninterrupted(tmp_path: Path, cache_dir: Path) -> None:
    # the hard-negative index, the momentum encoder and the self-paced pace come back from the checkpoint
    args = ["--set", "pretrain.epochs=2", "--set", "finetune.epochs=1"]
    assert _run(tmp_path / "full", cache_dir, *args) == 0
    assert _run(tmp_path / "cut", cache_dir, *args, "--stop-after-epochs", "1") == 0
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert state["stage"] == "pretrain"
    assert state["epoch"] == 1
    criterion = state["pretrain"]["criterion"]
    assert any(k.startswith("index.") for k in criterion)
    assert any(k.startswith("weightings.") for k in criterion)
    assert _run(tmp_path / "cut", cache_dir, *args, "--resume") == 0
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")


@pytest.mark.slow
def test_compare_all_methods(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "cmp"
    assert _run(out, cache_dir, "--compare") == 0
    results = json.loads((out / "compare.json").read_text())
    assert list(results) == ["ce", "simclr", "supcon", "comcl_no_spl", "comcl_no_quality", "comcl"]
    for m in results.values():
        _check_metrics(m)
    assert "CoMCL (full)" in (out / "compare.md").read_text()
    assert (out / "compare_kappa.png").stat().st_size > 1000


def test_seeds_report_mean_and_std(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "seeds"
    assert _run(out, cache_dir, "--method", "ce", "--seeds", "2") == 0
    results = json.loads((out / "compare.json").read_text())
    assert results["ce"]["seeds"] == [0, 1]
    assert "std" in results["ce"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "/nonexistent/cfg.yaml"], "does not exist"),
        (["--set", "pretrain.epoch=2"], "did you mean 'epochs'"),
        (["--set", "finetune.batch_size=0"], "finetune.batch_size: expected an int >= 1"),
        (["--set", "pretrain.epochs=five"], "--set pretrain.epochs=five: pretrain.epochs: expected"),
        (
            ["--set", "data.source=eyeq", "--set", "data.eyeq.root=/nonexistent/EyeQ"],
            "data.eyeq.root: directory '/nonexistent/EyeQ' does not exist",
        ),
        (["--resume"], "no checkpoint to resume from"),
        (["--compare", "--methods", "ce,nope"], "--methods"),
    ],
    ids=[
        "missing-config",
        "unknown-key",
        "bad-value",
        "bad-type-from-set",
        "missing-data-root",
        "resume-without-checkpoint",
        "bad-method",
    ],
)
def test_clear_errors(tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(main, TINY, tmp_path / "o", args, lambda: capsys.readouterr().err, message)


def test_malformed_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {epochs: 1\n")
    assert main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


# ---------------------------------------------------------------- real EyeQ format


def _fixture_eyeq(root: Path) -> dict[str, SplitBoxes]:
    """A tiny dataset in the published EyeQ layout: CSVs, PNG/JPEG images, lesion-box JSON."""
    g = torch.Generator().manual_seed(0)
    rows = {"train": [], "test": []}
    boxes = SplitBoxes()
    for split, n in (("train", 8), ("test", 6)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            name = f"{100 + i}_{'left' if i % 2 else 'right'}.{'jpeg' if i % 2 else 'png'}"
            w, h = (80, 72) if i % 3 else (72, 72)
            img = (torch.rand(h, w, 3, generator=g) * 200 + 20).to(torch.uint8).numpy()
            Image.fromarray(img).save(root / split / name)
            grade, quality = i % 5, i % 3
            rows[split].append(f"{i},{name},{quality},{grade}")
            if split == "train" and grade > 0:
                boxes.unhealthy[f"EyeQ/train/{name}"] = [(10.0, 12.0, 22.0, 20.0), (40.0, 30.0, 47.0, 41.0)]
            elif split == "train":
                boxes.healthy[name] = [(30.0, 30.0, 50.0, 50.0)]
    for split in ("train", "test"):
        (root / f"Label_EyeQ_{split}.csv").write_text(",image,quality,DR_grade\n" + "\n".join(rows[split]) + "\n")
    return {"train": boxes}


def _real_args(root: Path) -> list[str]:
    return set_args("data.source=eyeq", f"data.eyeq.root={root}", "data.eyeq.view_image_size=64", "data.image_size=48")


def _real_run(tmp_path: Path, root: Path, boxes: str) -> list[str]:
    """A tiny run on the fixture EyeQ at ``root`` into ``tmp_path / "run"``, boxes from ``data.eyeq.<boxes>``."""
    return ["--config", str(TINY), "--out", str(tmp_path / "run"), *_real_args(root), "--set", f"data.eyeq.{boxes}"]


def test_real_eyeq_format(tmp_path: Path) -> None:
    root = tmp_path / "EyeQ"
    write_boxes_json(_fixture_eyeq(root), tmp_path / "boxes.json")
    out = tmp_path / "run"
    boxes = f"boxes_json={tmp_path / 'boxes.json'}"
    assert main([*_real_run(tmp_path, root, boxes), "--set", "run.tensorboard=false"]) == 0
    m = _metrics(out)
    _check_metrics(m)
    assert m["n"] == 6


def test_real_eyeq_pickle_needs_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "EyeQ"
    boxes = _fixture_eyeq(root)["train"]
    with (tmp_path / "boxes.pkl").open("wb") as f:
        pickle.dump({"train": {"healthy": boxes.healthy, "unhealthy": boxes.unhealthy}}, f)
    args = _real_run(tmp_path, root, f"boxes_pickle={tmp_path / 'boxes.pkl'}")
    args += ["--set", "run.tensorboard=false", "--method", "simclr"]
    assert main(args) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*args, "--allow-pickle"]) == 0
    assert (tmp_path / "boxes.json").is_file()  # converted next to the pickle
    _check_metrics(_metrics(tmp_path / "run"))


def test_real_eyeq_missing_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "EyeQ"
    write_boxes_json(_fixture_eyeq(root), tmp_path / "boxes.json")
    next((root / "test").iterdir()).unlink()
    args = _real_run(tmp_path, root, f"boxes_json={tmp_path / 'boxes.json'}")
    assert main(args) == 2
    assert "are not in" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["boxes_json=''", "boxes_pickle=' '"], ids=["empty-json", "blank-pickle"])
def test_real_eyeq_empty_box_path(tmp_path: Path, setting: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty box path is a configuration error naming the key (it reached read_boxes_json(None))."""
    root = tmp_path / "EyeQ"
    _fixture_eyeq(root)
    assert main(_real_run(tmp_path, root, setting)) == 2
    key = setting.split("=")[0]
    assert f"data.eyeq.{key}: expected null or a file path" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["default", "tiny", "real_gpu", "real_cpu"])
def test_shipped_configs_load(name: str) -> None:
    from examples.common.config import load_config
    from examples.eyeq.train import EyeQConfig

    cfg = load_config(EyeQConfig, REPO / "examples" / "eyeq" / "configs" / f"{name}.yaml")
    if name == "real_cpu":
        assert (cfg.data.source, cfg.run.device) == ("eyeq", "cpu")
        assert cfg.data.image_size <= 128
    if name == "real_gpu":
        assert (cfg.model.arch, cfg.pretrain.patch_size, cfg.pretrain.temperature) == ("resnet50", 128, 0.07)
        assert (cfg.pretrain.optim.lr, cfg.pretrain.optim.momentum, cfg.pretrain.optim.nesterov) == (0.02, 0.9, True)
        assert (cfg.pretrain.optim.weight_decay, cfg.pretrain.optim.schedule) == (5e-4, "cosine")
