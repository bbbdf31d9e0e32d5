"""``python -m examples.common.propose_boxes`` end to end, on EyeQ-layout data made from a real photograph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from examples.common.boxes import read_boxes_json
from examples.common.propose_boxes import main as propose_main
from examples.eyeq.train import main as eyeq_main
from pipeline_helpers import real_photograph_eyeq
from torchvision.ops import box_iou

from mlcl_losses.degrade import FundusDegradation
from mlcl_losses.views import FourViewSampler

pytest.importorskip("skimage.data", reason="scikit-image ships the real photograph")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
SIZE = 128  # side of the fixture's images (original pixels)


def _real_args(root: Path) -> list[str]:
    return ["--set", "data.source=eyeq", "--set", f"data.eyeq.root={root}", "--set", "data.eyeq.view_image_size=96"]


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[str, int]]]:
    """A tiny ``ce`` run (no boxes needed) on the real-photograph EyeQ fixture."""
    tmp = tmp_path_factory.mktemp("propose")
    root = tmp / "EyeQ"
    rows = real_photograph_eyeq(root, size=SIZE)
    out = tmp / "ce"
    args = ["--config", str(TINY), "--out", str(out), *_real_args(root), "--set", "run.tensorboard=false"]
    assert eyeq_main([*args, "--method", "ce", "--set", "data.image_size=64", "--set", "finetune.epochs=2"]) == 0
    return root, out, rows


def test_proposals_from_a_ce_run(ce_run: tuple[Path, Path, list[tuple[str, int]]], tmp_path: Path) -> None:
    root, run, rows = ce_run
    out = tmp_path / "proposed.json"
    args = [str(run), "--out", str(out), "--layer", "layer2", "--thresholds", "0.4,0.6", "--min-size", "6"]
    assert propose_main(args) == 0
    split = read_boxes_json(out)["train"]
    grades = dict(rows)
    assert set(split.healthy) == {n for n, g in rows if g == 0}  # grade-0 images: never a lesion box
    assert all(boxes == [] for boxes in split.healthy.values())
    assert set(split.unhealthy) <= {n for n, g in rows if g >= 1}
    assert split.unhealthy, "no image got a box"
    for name, boxes in split.unhealthy.items():
        assert grades[name] >= 1
        b = torch.tensor(boxes)
        assert bool((b[:, 0::2] >= 0).all())
        assert bool((b[:, 0::2] <= SIZE).all())
        assert bool((b[:, 1::2] >= 0).all())
        assert bool((b[:, 1::2] <= SIZE).all())
        assert bool((b[:, 2:] - b[:, :2] >= 6 - 1e-4).all())  # the minimum size, in original pixels
        scores = split.scores[name]
        assert len(scores) == len(boxes) <= 8
        assert scores == sorted(scores, reverse=True)
        assert all(0 < s <= 1 for s in scores)
        iou = box_iou(b, b) - torch.eye(len(b))
        assert float(iou.max()) <= 0.3  # NMS (a single box: 0 - 1 on the diagonal)
    assert not split.labels  # EyeQ boxes are all "any DR" evidence


def test_four_views_of_the_real_photograph_with_proposed_boxes(
    ce_run: tuple[Path, Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    from examples.common.images import load_image

    root, run, _ = ce_run
    out = tmp_path / "proposed.json"
    assert propose_main([str(run), "--out", str(out), "--layer", "layer2", "--min-size", "12"]) == 0
    split = read_boxes_json(out)["train"]
    name, boxes = next(iter(split.unhealthy.items()))
    image = load_image(root / "train" / name, "RGB")
    sampler = FourViewSampler(patch_size=24, n_healthy=2)
    views = sampler(image, boxes, degradation=FundusDegradation(severity=0.7), label=1, seed=0)
    k = len(boxes)
    assert views.views.shape == (3 * k + 4, 3, 24, 24)
    assert bool(torch.isfinite(views.views).all())
    # and the pipeline pre-trains on the proposed boxes
    args = ["--config", str(TINY), "--out", str(tmp_path / "comcl"), *_real_args(root), "--set", "data.image_size=64"]
    args += ["--set", f"data.eyeq.boxes_json={out}", "--set", "run.tensorboard=false"]
    assert eyeq_main(args) == 0
    assert (tmp_path / "comcl" / "metrics.json").is_file()


def test_propose_errors(ce_run: tuple[Path, Path, list[tuple[str, int]]], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    _, run, _ = ce_run
    assert propose_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.json")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert propose_main([str(run), "--out", str(tmp_path / "b.json"), "--thresholds", "0.5,x"]) == 2
    assert "--thresholds: expected comma-separated numbers" in capsys.readouterr().err
    assert propose_main([str(run), "--out", str(tmp_path / "b.json"), "--thresholds", "1.5"]) == 2
    assert "`thresholds`" in capsys.readouterr().err
    assert propose_main([str(run), "--out", str(tmp_path / "missing" / "b.json")]) == 2
    assert "--out: directory" in capsys.readouterr().err


def test_ce_run_on_real_files_needs_no_boxes_but_comcl_does(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    root = tmp_path / "EyeQ"
    real_photograph_eyeq(root, n_train=4, n_test=2, size=64)
    args = ["--config", str(TINY), "--out", str(tmp_path / "r"), "--set", "data.source=eyeq"]
    args += ["--set", f"data.eyeq.root={root}", "--set", "data.image_size=48"]
    args += ["--set", "data.eyeq.view_image_size=64", "--set", "run.tensorboard=false"]  # one value per key
    assert eyeq_main(args) == 2
    assert "data.eyeq.boxes_json" in capsys.readouterr().err


def test_synthetic_source_with_a_real_root_is_an_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert eyeq_main(["--config", str(TINY), "--out", str(tmp_path / "r"), "--set", f"data.eyeq.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.source: is 'synthetic', but data.eyeq.root is set" in err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_synthetic_boxes_json_replaces_the_rendered_boxes(tmp_path: Path) -> None:
    from examples.common.boxes import SplitBoxes, write_boxes_json
    from examples.common.config import ConfigError, load_config
    from examples.eyeq.data import build_data
    from examples.eyeq.train import EyeQConfig

    boxes = SplitBoxes(unhealthy={"7/3": [(1.0, 2.0, 11.0, 12.0)], "7/5": [(0.0, 0.0, 4.0, 4.0), (8, 8, 20, 20)]})
    path = tmp_path / "b.json"
    write_boxes_json({"train": boxes}, path)
    overrides = [f"data.synthetic.cache_dir={tmp_path / 'cache'}", f"data.synthetic.boxes_json={path}"]
    cfg = load_config(EyeQConfig, TINY, overrides)  # tiny: data seed 7, training seed 0 draws training set 7
    records = build_data(cfg, 0).views.records
    assert records.data["boxes"][3].tolist() == [[1.0, 2.0, 11.0, 12.0]]
    assert records.data["boxes"][5].shape == (2, 4)
    assert records.data["boxes"][0].shape == (0, 4)  # no key: no lesion box
    with pytest.raises(ConfigError, match="no key of .* names a training image of data seed 9"):
        build_data(cfg, 1)  # training seed 1 draws training set 9
