"""The pipelines' command line never replaces what it was not asked to, and refuses bad input up front.

The user's own ``config.yaml``, other runs below ``--out``, the seeds' range, non-finite values, a
repeated ``--set``, a resume of another run, and Ctrl-C / failures before the first checkpoint.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from examples.common.config import ConfigError, load_config
from examples.common.rundir import CONFIG_HEADER, clear_run, foreign_runs
from examples.common.seeds import parse_seed_list
from examples.common.synthetic_cache import render_cached
from examples.eyeq import train
from examples.eyeq.train import EyeQConfig, main
from pipeline_helpers import run_tiny

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
CE = ("--method", "ce")  # the fastest method: no pre-training


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. the user's config.yaml


def test_the_users_config_yaml_is_never_replaced(tmp_path: Path, cache_dir: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "x"
    out.mkdir()
    mine = out / "config.yaml"
    mine.write_text("# my notes\n" + TINY.read_text())
    text = mine.read_text()
    for extra in ((), ("--set", "pretrain.temperature=0.2")):
        assert main(["--config", str(mine), "--out", str(out), *CE, *extra]) == 2
        err = capsys.readouterr().err
        assert f"--config {mine} is the config.yaml of --out {out}" in err
        assert "--overwrite" in err
        assert mine.read_text() == text
    # a config.yaml in OUT that no run wrote is refused too, whichever --config
    assert run_tiny(main, TINY, out, cache_dir, *CE) == 2
    assert "holds a config.yaml that no run wrote" in capsys.readouterr().err
    assert _files(out) == {"config.yaml": text.encode()}
    # --overwrite replaces it; the run's own config.yaml says where it comes from and a new run may replace it
    assert run_tiny(main, TINY, out, cache_dir, *CE, "--overwrite") == 0
    assert mine.read_text().startswith(CONFIG_HEADER + "\n")
    (out / "metrics.json").unlink()
    (out / "checkpoint.pt").unlink()
    assert run_tiny(main, TINY, out, cache_dir, *CE) == 0


# ---------------------------------------------------------------- 2. --overwrite on a folder of runs


def test_overwrite_never_reaches_other_runs_below(tmp_path: Path, cache_dir: Path, capsys) -> None:  # noqa: ANN001
    parent = tmp_path / "P"
    for name in ("a", "b"):
        assert run_tiny(main, TINY, parent / name, cache_dir, *CE) == 0
    before = _files(parent)
    capsys.readouterr()
    assert run_tiny(main, TINY, parent, cache_dir, *CE) == 2
    assert f"--out {parent} already holds a run (2 runs: a, b; " in capsys.readouterr().err
    assert run_tiny(main, TINY, parent, cache_dir, *CE, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "--overwrite replaces only the run at" in err
    assert "2 other run(s) below it (a, b)" in err
    assert _files(parent) == before


def test_clear_run_removes_a_comparison_but_not_runs_nested_in_it(tmp_path: Path) -> None:
    cmp = tmp_path / "P" / "cmp"
    own = [
        cmp / "compare.json",
        cmp / "paired_kappa.png",
        cmp / "ce" / "seed0" / "metrics.json",
        cmp / "pretrain" / "comcl" / "seed0" / "encoder.pt",
        cmp / "pretrain" / "comcl" / "seed0" / "tensorboard" / "events",
    ]
    kept = [cmp / "notes.txt", cmp / "ce" / "seed0" / "mine.txt"]
    for path in (*own, *kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"holds 1 other run\(s\) below it \(cmp\)"):
        clear_run(tmp_path / "P")  # a folder holding a comparison: nothing is half-deleted
    assert _files(tmp_path) == before
    nested = cmp / "ce" / "seed0" / "old" / "checkpoint.pt"  # a run inside a seed folder is another run
    nested.parent.mkdir()
    nested.write_text("x")
    assert foreign_runs(cmp) == [nested.parent]
    nested.unlink()
    clear_run(cmp)
    assert sorted(_files(tmp_path)) == ["P/cmp/ce/seed0/mine.txt", "P/cmp/notes.txt"]


# ---------------------------------------------------------------- 5. Ctrl-C and failures before the first checkpoint


def test_ctrl_c_before_the_first_checkpoint_keeps_nothing_and_says_so(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "runs" / "x"
    with monkeypatch.context() as m:
        m.setattr(train.CLI, "build_data", interrupted)
        assert run_tiny(main, TINY, out, cache_dir, *CE) == 130
    err = capsys.readouterr().err
    assert f"stopped before the first checkpoint, so {out} keeps nothing; run the same command" in err
    assert "--resume" not in err
    assert not out.exists()
    assert run_tiny(main, TINY, out, cache_dir, *CE) == 0  # the command it suggests works


def test_a_late_failure_leaves_no_folder_that_blocks_the_same_command(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*_args: object) -> None:
        raise ValueError("data: something is wrong")

    out = tmp_path / "x"
    implicit = ["--config", str(TINY), "--set", f"run.out={out}", "--set", f"data.synthetic.cache_dir={cache_dir}"]
    with monkeypatch.context() as m:
        m.setattr(train.CLI, "build_data", fails)
        assert main([*implicit, *CE]) == 2
    assert not out.exists()
    assert main([*implicit, *CE]) == 0
    assert (out / "metrics.json").is_file()  # the same folder, not x-2


def _sigint_handler(_job: object) -> dict[str, int]:
    return {"ignored": int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)}


def test_rendering_workers_leave_ctrl_c_to_the_parent(tmp_path: Path) -> None:
    data = render_cached(tmp_path / "c.pt", _sigint_handler, [0, 1, 2, 3], workers=2, desc="test")
    assert data["ignored"].tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- 7, 8, 11. bad values, refused before any rendering


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed-list", "0-300000000"], "--seed-list: expected at most 10000 seeds, got 300000001"),
        (["--seed-list", "5,2147483648"], "--seed-list: expected seeds below 2**31 = 2147483648, got '2147483648'"),
        (["--seed", "18446744073709551616"], "run.seed: expected an int in [0, 2**31 = 2147483648), got 1844674"),
        (["--seeds", "20000"], "--seeds: expected an int in [1, 10000]"),
        (["--set", "data.synthetic.seed=4294967296"], "data.synthetic.seed: expected an int in [0, 2**31)"),
        (["--set", "pretrain.temperature=.inf"], "pretrain.temperature: expected a finite number (not nan or inf)"),
        (["--set", "finetune.optim.lr=.nan"], "finetune.optim.lr: expected a finite number (not nan or inf), got nan"),
        (["--set", "model.width=1.0e+400"], "model.width: expected a finite number"),
        (
            ["--set", "finetune.epochs=2", "--set", "finetune.epochs=3"],
            "--set finetune.epochs: given twice ('finetune.epochs=2' and 'finetune.epochs=3'); one key, one value",
        ),
    ],
)
def test_bad_values_are_refused_before_anything_is_rendered(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "cache"
    assert run_tiny(main, TINY, tmp_path / "out", cache, *args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not cache.exists()
    assert not (tmp_path / "out").exists()


def test_seed_list_and_repeated_set_units() -> None:
    assert parse_seed_list("2147483646-2147483647") == [2147483646, 2147483647]
    with pytest.raises(ConfigError, match="given twice"):
        load_config(EyeQConfig, TINY, ["pretrain.epochs=2", " pretrain.epochs =2"])


# ---------------------------------------------------------------- 9. resume of another run names what differs


def test_resume_mismatch_names_the_keys_before_rendering(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cut"
    args = ("--set", "finetune.epochs=2", *CE)
    assert run_tiny(main, TINY, out, cache_dir, *args, "--stop-after-epochs", "1") == 0
    before = _files(out)
    cached = sorted(p.name for p in cache_dir.iterdir())
    capsys.readouterr()
    assert run_tiny(main, TINY, out, cache_dir, *args, "--resume", "--seed", "3") == 2
    err = capsys.readouterr().err
    assert "seed: 0 -> 3" in err
    assert sorted(p.name for p in cache_dir.iterdir()) == cached  # seed 3's data was not rendered
    assert run_tiny(main, TINY, out, cache_dir, *args, "--resume", "--set", "finetune.optim.lr=0.01") == 2
    assert "finetune.optim.lr: 0.05 -> 0.01" in capsys.readouterr().err
    assert {k: v for k, v in _files(out).items() if k != "config.yaml"} == {
        k: v for k, v in before.items() if k != "config.yaml"
    }
    assert run_tiny(main, TINY, out, cache_dir, *args, "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 0


def test_ctrl_c_after_overwrite_suggests_a_command_that_works(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import examples.common.pipeline as pipeline

    out = tmp_path / "x"
    two_epochs = ("--set", "finetune.epochs=2", *CE)
    assert run_tiny(main, TINY, out, cache_dir, *CE) == 0
    saved = pipeline.save_checkpoint

    def save_then_interrupt(*args: object, **kwargs: object) -> None:
        saved(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "save_checkpoint", save_then_interrupt)
        assert run_tiny(main, TINY, out, cache_dir, *two_epochs, "--overwrite") == 130
    err = capsys.readouterr().err
    assert f"run the same command with --resume --out {out}, without --overwrite" in err
    assert run_tiny(main, TINY, out, cache_dir, *two_epochs, "--resume", "--out", str(out)) == 0
    assert (out / "metrics.json").is_file()


def _render_or_interrupt(job: int) -> dict[str, int]:
    if job == 3:
        raise KeyboardInterrupt
    return {"x": job}


def test_an_interrupted_rendering_leaves_no_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "set.pt"
    with pytest.raises(KeyboardInterrupt):
        render_cached(path, _render_or_interrupt, list(range(6)), workers=1, desc="test")
    assert list(path.parent.iterdir()) == []  # nothing a later run could read as a complete set
