"""The fused-versus-reference twin along a real (tiny) pre-training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from examples.common import pretrain
from examples.eyeq.path_divergence import main, plot

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"


def test_fused_and_reference_paths_agree_at_every_step(tmp_path: Path, cache_dir: Path) -> None:
    build = pretrain.build_criterion
    sets = ["--set", "run.tensorboard=false", "--set", f"data.synthetic.cache_dir={cache_dir}"]
    sets += ["--set", "pretrain.loss_impl=fused", "--set", "run.torch_threads=1"]
    assert main(["--config", str(TINY), "--out", str(tmp_path / "fused"), *sets]) == 0
    assert pretrain.build_criterion is build  # the pipeline's factory is restored
    steps = json.loads((tmp_path / "fused" / "steps.json").read_text(encoding="utf-8"))["steps"]
    assert len(steps) >= 2
    for s in steps:
        assert s["loss"] == pytest.approx(s["twin_loss"], rel=1e-5)
        assert 0.0 <= s["grad_rel_diff"] < 1e-5
    metrics = json.loads((tmp_path / "fused" / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["method"] == "comcl"
    # a second folder with the same records: identical runs do not drift
    shutil.copytree(tmp_path / "fused", tmp_path / "again")
    png = tmp_path / "divergence.png"
    assert main(["--plot", str(tmp_path / "fused"), str(tmp_path / "again"), "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    same = plot(tmp_path / "fused", tmp_path / "again", png)
    assert same["steps"] == len(steps)
    assert same["first_step_runs_differ_by_0.1pct"] is None
    assert same["mean_abs_loss_gap_by_tenth"] == [0.0] * 10
    assert same["max_grad_rel_diff"] == max(s["grad_rel_diff"] for s in steps)
    drifted = json.loads((tmp_path / "again" / "steps.json").read_text(encoding="utf-8"))
    drifted["steps"][1]["loss"] *= 1.01  # a run that left the other's trajectory at step 1
    (tmp_path / "again" / "steps.json").write_text(json.dumps(drifted), encoding="utf-8")
    assert plot(tmp_path / "fused", tmp_path / "again", png)["first_step_runs_differ_by_0.1pct"] == 1
    assert main(["--config", str(TINY), "--out", str(tmp_path / "fused")]) == 2  # never overwrites a folder
    assert main(["--plot", str(tmp_path / "fused"), str(tmp_path / "nothing"), "--out", str(png)]) == 2
    bad = tmp_path / "bad"  # a failed pipeline run: its error, no traceback, no steps.json
    assert main(["--config", str(tmp_path / "nope.yaml"), "--out", str(bad)]) == 2
    assert not (bad / "steps.json").exists()


def test_plot_names_what_is_wrong_with_its_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    steps = [
        {"loss": 1.0, "twin_loss": 1.0, "grad_rel_diff": 1e-7},
        {"loss": 0.9, "twin_loss": 0.9, "grad_rel_diff": 2e-7},
    ]
    (run / "steps.json").write_text(json.dumps({"steps": steps}), encoding="utf-8")
    png = tmp_path / "plots" / "paths.png"
    assert main(["--plot", str(run), str(run), "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x", encoding="utf-8")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "steps.json").write_text("{oops", encoding="utf-8")
    cases = [
        ([str(tmp_path / "nonexist"), str(run)], png, f"{tmp_path / 'nonexist'} does not exist"),
        ([str(run), str(tmp_path / "file")], png, f"{tmp_path / 'file'} is not a directory"),
        ([str(run), str(tmp_path / "empty")], png, f"{tmp_path / 'empty'} has no steps.json"),
        ([str(run), str(tmp_path / "bad")], png, "is not the steps.json of a run of this script"),
        ([str(run), str(run)], tmp_path / "plots", f"--out: expected the PNG file to write, but {tmp_path / 'plots'}"),
        (
            [str(run), str(run)],
            tmp_path / "file" / "p.png",
            f"--out: expected a PNG file in a directory, but {tmp_path / 'file'}",
        ),
    ]
    for dirs, out, message in cases:
        assert main(["--plot", *dirs, "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
