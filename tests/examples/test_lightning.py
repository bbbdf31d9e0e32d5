"""The Lightning example (examples/lightning/): a tiny CoMCL fit, checkpoints, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples.lightning.data import SyntheticFourViewData
from examples.lightning.module import CHECKPOINT_KEY, CoMCLModule
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning as L

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "lightning" / "train.py"
STEPS_PER_EPOCH = 2  # 8 images, 4 per step
PLANNED_STEPS = 3 * STEPS_PER_EPOCH


def _fit(out: Path, max_epochs: int, ckpt: Path | None = None, **module_args: object) -> CoMCLModule:
    """A tiny CPU fit: ResNet-18 at width 1/8, 24 px patches, a 64-key bank (it wraps around in 6 steps)."""
    L.seed_everything(0, verbose=False)
    data = SyntheticFourViewData(
        n_images=8, image_size=64, patch_size=24, max_lesions=2, n_healthy=1, batch_images=4, seed=3
    )
    args = {
        "width": 0.125,
        "proj_hidden": 16,
        "proj_dim": 8,
        "bank_size": 64,
        "k": 4,
        "index_backend": "torch",
        "max_steps": PLANNED_STEPS,
    } | module_args
    module = CoMCLModule(**args)  # type: ignore[arg-type]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
    assert trainer.global_step == max_epochs * STEPS_PER_EPOCH
    return module


def _pace_steps(module: CoMCLModule) -> set[int]:
    return {w.schedule.step_count for w in module.criterion.weightings.values()}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of a fit stopped after its first epoch (of three planned)."""
    out = tmp_path_factory.mktemp("interrupted")
    first = _fit(out, max_epochs=1)
    assert _pace_steps(first) == {STEPS_PER_EPOCH}
    return out / "checkpoints" / "last.ckpt"


def test_resume_continues_pace_and_index(tmp_path: Path, interrupted: Path) -> None:
    whole = _fit(tmp_path / "whole", max_epochs=3)
    assert _pace_steps(whole) == {PLANNED_STEPS}  # stepped once per optimiser step
    assert len(whole.criterion.index) == 64  # the keys of every step were enqueued; the ring buffer wrapped

    saved = torch.load(interrupted, weights_only=True)  # plain tensors and values: no unpickling needed
    assert saved[CHECKPOINT_KEY][0]["weightings.lesion._extra_state"]["step_count"] == STEPS_PER_EPOCH
    assert saved[CHECKPOINT_KEY][0]["index._extra_state"]["size"] > 0
    resumed = _fit(tmp_path / "resumed", max_epochs=3, ckpt=interrupted)

    assert _pace_steps(resumed) == {PLANNED_STEPS}
    assert resumed.criterion.state_dict().keys() == whole.criterion.state_dict().keys()
    for key, value in whole.criterion.state_dict().items():  # the index's keys, tags, pointer; the pace
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed.criterion.state_dict()[key], value, rtol=0, atol=0, msg=key)
        else:
            assert resumed.criterion.state_dict()[key] == value, key
    for name, value in whole.state_dict().items():  # query and key encoders
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_load_from_checkpoint_weights_only(interrupted: Path) -> None:
    module = CoMCLModule.load_from_checkpoint(interrupted, weights_only=True)
    saved = torch.load(interrupted, weights_only=True)["state_dict"]
    assert module.state_dict().keys() == saved.keys()
    for name, value in module.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_resume_refuses_other_hyperparameters_or_foreign_checkpoints(tmp_path: Path, interrupted: Path) -> None:
    ckpt = interrupted
    with pytest.raises(ValueError, match=r"other hyperparameters \(k: 4 there, 8 here\)"):
        _fit(tmp_path / "other", max_epochs=2, ckpt=ckpt, k=8)
    state = torch.load(ckpt, weights_only=True)
    del state[CHECKPOINT_KEY]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(state, foreign)
    with pytest.raises(ValueError, match="no 'comcl_criterion' entry"):
        _fit(tmp_path / "foreign", max_epochs=2, ckpt=foreign)


def test_module_and_data_validate_arguments() -> None:
    with pytest.raises(ValueError, match=r"`max_steps` to be an int >= 1, but got 0"):
        CoMCLModule(max_steps=0)
    with pytest.raises(ValueError, match=r"`batch_images` <= `n_images` \(4\), but got 8"):
        SyntheticFourViewData(n_images=4, batch_images=8)
    with pytest.raises(RuntimeError, match="fit the module with a Trainer first"):
        _ = CoMCLModule(width=0.125).criterion


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """Lightning's DDP strategy, two CPU processes (gloo): one index shard per process, one pace."""
    out = tmp_path / "ddp"
    tiny = ["--images", "16", "--image-size", "64", "--patch", "24", "--batch-images", "8"]
    tiny += ["--bank-size", "128", "--k", "4", "--index-backend", "torch"]
    cmd = [sys.executable, str(TRAIN), "--out", str(out), "--steps", "4", *tiny]
    run = subprocess.run(
        [*cmd, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "4 steps; pace at step 4" in run.stdout
    ckpt = out / "checkpoints" / "last.ckpt"
    shards = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert len(shards) == 2  # every process's shard, gathered into rank 0's file
    assert [s["weightings.lesion._extra_state"]["step_count"] for s in shards] == [4, 4]
    assert [s["index._extra_state"]["size"] for s in shards] == [64, 64]  # 128 keys, split over the processes
    assert not torch.equal(shards[0]["index._source"], shards[1]["index._source"])  # each kept its own keys
    refused = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, check=False)
    assert refused.returncode != 0
    assert "index shards of 2 process(es); resume it with the same number, not 1" in refused.stderr


def test_cli_with_a_timm_backbone_and_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.lightning.train import main

    tiny = ["--images", "8", "--image-size", "64", "--patch", "24", "--batch-images", "4"]
    tiny += ["--bank-size", "64", "--k", "4", "--index-backend", "torch"]
    assert main(["--out", str(tmp_path / "timm"), "--steps", "2", "--arch", "timm:test_resnet", *tiny]) == 0
    assert "2 steps; pace at step 2" in capsys.readouterr().out
    module = CoMCLModule.load_from_checkpoint(tmp_path / "timm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.hparams.arch == "timm:test_resnet"
    assert module.model.head.net[0].in_features == 96  # test_resnet's feature width
    assert main(["--out", str(tmp_path / "x"), "--arch", "timm:test_resnet", "--width", "0.5"]) == 2
    assert "`width` 1.0 with a timm backbone" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err


CLI_TINY = ["--images", "8", "--image-size", "64", "--patch", "24", "--batch-images", "4"]
CLI_TINY += ["--bank-size", "64", "--k", "4", "--index-backend", "torch"]


def test_cli_refuses_an_out_that_holds_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second run into the same --out is refused (it used to write last-v1.ckpt and print last.ckpt)."""
    from examples.lightning.train import main

    out = tmp_path / "run"
    cmd = ["--out", str(out), "--steps", "2", *CLI_TINY]
    assert main(cmd) == 0
    assert f"checkpoint: {out / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    first = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run" in err
    assert "--resume" in err
    assert "--overwrite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first  # nothing written
    (out / "notes.txt").write_text("mine")
    assert main([*cmd, "--overwrite"]) == 0
    written = capsys.readouterr().out.splitlines()[-1].removeprefix("checkpoint: ")
    assert Path(written) == out / "checkpoints" / "last.ckpt"
    assert Path(written).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first  # replaced, no last-v1.ckpt
    assert [p.name for p in (out / "lightning_logs").iterdir()] == ["version_0"]
    assert (out / "notes.txt").read_text() == "mine"  # a file the command did not write is kept
    assert main([*cmd, "--resume"]) == 0  # a finished run: nothing to do, the checkpoint named is the one read
    assert capsys.readouterr().out.splitlines()[-1] == f"checkpoint: {out / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(SystemExit):
        main([*cmd, "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "100000"], "--k must be <= --bank-size (64), got 100000"),
        (["--patch", "500"], "--patch must be <= --image-size (64), got 500"),
        (["--image-size", "16"], "--image-size must be >= 32"),
        (["--devices", "0"], "--devices must be a count >= 1, -1 or auto (all), or indices like 0,1; got '0'"),
        (["--accelerator", "tpu"], "--accelerator tpu --devices 1 --strategy auto: Lightning cannot run"),
        (["--accelerator", "quantum"], "argument --accelerator: invalid choice: 'quantum'"),
        (["--strategy", "foo"], "--strategy foo: Lightning cannot run with these here (You selected an invalid"),
        (["--seed", "-3"], "--seed must be >= 0, got -3"),
        (["--devices", "2", "--strategy", "ddp", "--k", "40"], "--k must be <= each process's bank shard of 32"),
        (["--devices", "3", "--strategy", "ddp"], "--batch-images must be divisible by the 3 processes, got 4"),
        (["--arch", "timm:vit_tiny_patch16_224"], "--arch: expected a backbone that takes --patch 24"),
        (["--out", "/dev/null"], "--out must be a directory, but /dev/null is a file"),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from examples.lightning.train import main

    try:
        code = main(["--out", str(tmp_path / "run"), "--steps", "2", *CLI_TINY, *args])
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written
