"""Run directories of the pipelines: nothing destroyed without --overwrite, failed commands change nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from examples.common.rundir import clear_run, holds_run, next_free_dir
from examples.common.runlog import show_progress
from examples.eyeq.train import main
from pipeline_helpers import run_tiny

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
CE = ("--method", "ce")  # the fastest method: no pre-training


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (TensorBoard aside) with its bytes."""
    files = [p for p in sorted(d.rglob("*")) if p.is_file() and "tensorboard" not in p.parts]
    return {str(p.relative_to(d)): p.read_bytes() for p in files}


def _implicit(out: Path, cache: Path, *extra: str) -> int:
    """A run without --out: run.out set in the config (what the README's main command does)."""
    return main(
        [
            "--config",
            str(TINY),
            "--set",
            f"run.out={out}",
            "--set",
            f"data.synthetic.cache_dir={cache}",
            "--set",
            "run.tensorboard=false",
            *extra,
        ]
    )


def test_rundir_helpers(tmp_path: Path) -> None:
    base = tmp_path / "runs" / "eyeq"
    assert next_free_dir(base) == base
    base.mkdir(parents=True)
    (base / "config.yaml").write_text("x")  # a run killed before its first checkpoint: nothing to lose
    assert not holds_run(base)
    (base / "checkpoint.pt").write_bytes(b"x")
    assert next_free_dir(base) == tmp_path / "runs" / "eyeq-2"
    sub = tmp_path / "runs" / "eyeq-2" / "ce" / "seed0"
    sub.mkdir(parents=True)
    (sub / "metrics.json").write_text("{}")
    assert holds_run(tmp_path / "runs" / "eyeq-2")  # a comparison's method subdirectory
    assert next_free_dir(base) == tmp_path / "runs" / "eyeq-3"
    encoder = tmp_path / "runs" / "eyeq-3" / "pretrain" / "comcl" / "seed0" / "encoder.pt"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(b"x")  # a comparison's pre-trained encoder
    assert next_free_dir(base) == tmp_path / "runs" / "eyeq-4"
    (base / "notes.txt").write_text("mine")
    clear_run(base)
    assert sorted(p.name for p in base.iterdir()) == ["notes.txt"]  # only the run's own files go
    cmp = tmp_path / "runs" / "eyeq-3"
    (cmp / "compare.md").write_text("table")
    clear_run(cmp)
    assert not holds_run(cmp)
    assert list(cmp.iterdir()) == []  # the emptied subdirectories are gone


def test_explicit_out_holding_a_run_is_refused(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert run_tiny(main, TINY, out, cache_dir, *CE) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert run_tiny(main, TINY, out, cache_dir, *CE, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run" in err
    assert "--resume" in err
    assert "--overwrite" in err
    assert _snapshot(out) == before  # nothing changed, the checkpoint above all

    # resuming a finished run says so and changes nothing
    assert run_tiny(main, TINY, out, cache_dir, *CE, "--resume") == 0
    assert "finished run" in capsys.readouterr().out
    assert _snapshot(out) == before

    # --overwrite replaces it
    assert run_tiny(main, TINY, out, cache_dir, *CE, "--seed", "1", "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    rows = (out / "scalars.csv").read_text().splitlines()
    assert len(rows) == len(set(rows))  # no rows of the old run left behind


def test_implicit_out_goes_to_a_new_numbered_dir(tmp_path: Path, cache_dir: Path, capsys) -> None:
    base = tmp_path / "runs" / "eyeq"
    assert _implicit(base, cache_dir, *CE) == 0
    before = _snapshot(base)
    capsys.readouterr()
    assert _implicit(base, cache_dir, *CE) == 0
    out = capsys.readouterr().out
    assert f"{base} holds an earlier run; writing this one to {base}-2" in out
    assert _snapshot(base) == before
    assert (tmp_path / "runs" / "eyeq-2" / "metrics.json").is_file()


def test_ctrl_c_names_the_folder_and_the_command_that_continues(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the first epoch's checkpoint: exit 130, no traceback, the folder actually written
    (here the numbered one) and ``--resume --out`` that folder, which then finishes the run."""
    import examples.common.pipeline as pipeline

    base = tmp_path / "runs" / "eyeq"
    assert _implicit(base, cache_dir, *CE) == 0  # so that the next run goes to eyeq-2
    saved = pipeline.save_checkpoint

    def save_then_interrupt(*args: object, **kwargs: object) -> None:
        saved(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_checkpoint", save_then_interrupt)
    capsys.readouterr()
    two_epochs = ("--set", "finetune.epochs=2", *CE)
    assert _implicit(base, cache_dir, *two_epochs) == 130
    err = capsys.readouterr().err
    fresh = tmp_path / "runs" / "eyeq-2"
    assert f"interrupted: {fresh} keeps what finished" in err
    assert f"--resume --out {fresh}" in err
    assert "Traceback" not in err
    assert (fresh / "checkpoint.pt").is_file()
    assert not (fresh / "metrics.json").exists()

    monkeypatch.setattr(pipeline, "save_checkpoint", saved)
    assert _implicit(base, cache_dir, *two_epochs, "--resume", "--out", str(fresh)) == 0
    assert (fresh / "metrics.json").is_file()


def test_compare_follows_the_same_rule(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    sub = out / "ce" / "seed0"
    sub.mkdir(parents=True)
    (sub / "checkpoint.pt").write_bytes(b"an earlier comparison's run")
    before = _snapshot(out)
    assert run_tiny(main, TINY, out, cache_dir, "--compare", "--methods", "ce") == 2
    err = capsys.readouterr().err
    assert "already holds a run (1 run: the folder itself; 1 file in all)" in err
    assert "--overwrite" in err
    assert _snapshot(out) == before


def test_failed_resume_changes_nothing(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert run_tiny(main, TINY, out, cache_dir, "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert not out.exists()


def test_corrupted_checkpoint_is_refused_and_changes_nothing(tmp_path: Path, cache_dir: Path, capsys) -> None:
    cut = tmp_path / "cut"
    args = ("--set", "finetune.epochs=2", *CE)
    assert run_tiny(main, TINY, cut, cache_dir, *args, "--stop-after-epochs", "1") == 0
    bad = tmp_path / "bad"
    shutil.copytree(cut, bad)
    data = bytearray((bad / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the payload (the model's weights)
    (bad / "checkpoint.pt").write_bytes(bytes(data))
    before = _snapshot(bad)
    capsys.readouterr()
    assert run_tiny(main, TINY, bad, cache_dir, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert str(bad / "checkpoint.pt") in err
    assert "corrupted" in err or "cannot read" in err
    assert _snapshot(bad) == before
    # the intact copy resumes, and its timing keeps both sessions' fine-tuning time
    assert run_tiny(main, TINY, cut, cache_dir, *args, "--resume") == 0
    timing = json.loads((cut / "timing.json").read_text())
    assert {"finetune_s", "evaluate_s"} <= set(timing)


def test_no_progress_bars_in_redirected_output(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Tty:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("sys.stderr", _Tty(False))
    assert not show_progress()
    monkeypatch.setattr("sys.stderr", _Tty(True))
    assert show_progress()
    monkeypatch.setenv("RANK", "1")
    assert not show_progress()


def test_out_that_is_a_file_is_refused(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "run"):
        capsys.readouterr()
        assert run_tiny(main, TINY, out, cache_dir, *CE) == 2
        err = capsys.readouterr().err
        assert f"Expected --out to be a directory, but {afile} is a file" in err
    assert afile.read_text() == "mine"
