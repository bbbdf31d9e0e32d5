"""Multi-process runs of the pipelines: the helpers of examples/common/ddp.py and ``torchrun`` end to end.

The end-to-end tests start ``torchrun --standalone --nproc_per_node=2`` on the tiny EyeQ config
(two CPU processes, gloo), as a user would.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from examples.common import ddp
from examples.common.checkpoint import load_checkpoint
from examples.common.pipeline import _steps
from examples.eyeq.train import main
from pipeline_helpers import read_metrics, run_tiny
from torch.utils.data import DataLoader, DistributedSampler

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples" / "eyeq" / "train.py"
TINY = REPO / "examples" / "eyeq" / "configs" / "tiny.yaml"
N_TEST = 16  # data.synthetic.n_test of the tiny config


def torchrun(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The tiny EyeQ pipeline under ``torchrun`` with two CPU processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN)]
    cmd += ["--config", str(TINY), "--out", str(out), "--set", f"data.synthetic.cache_dir={cache}"]
    cmd += ["--set", "run.tensorboard=false", *extra]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(out, cache_dir)
    return out, done.stdout


def test_two_processes_run_one_tiny_epoch_of_each_stage(two_process_run: tuple[Path, str]) -> None:
    out, stdout = two_process_run
    m = read_metrics(out)
    assert m["world_size"] == 2
    assert m["n"] == N_TEST  # every test image evaluated exactly once over the two ranks
    assert sum(g["n"] for g in m["per_quality"].values()) == N_TEST
    assert stdout.count("pretrain epoch 1/1") == 1  # only rank 0 prints
    with (out / "scalars.csv").open() as f:
        rows = Counter((r["stage"], r["epoch"], r["name"]) for r in csv.DictReader(f))
    assert rows
    assert set(rows.values()) == {1}  # only rank 0 logs
    assert {"pretrain", "finetune", "test"} <= {stage for stage, _, _ in rows}


def test_final_checkpoint_records_the_number_of_processes(two_process_run: tuple[Path, str]) -> None:
    out, _ = two_process_run
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2
    assert state["stage"] == "finetune"
    assert not list(out.glob(".checkpoint*"))  # no temporary file left behind


def test_pretraining_checkpoint_holds_one_index_shard_per_rank(tmp_path: Path, cache_dir: Path) -> None:
    torchrun(tmp_path / "cut", cache_dir, "--stop-after-epochs", "1")
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert state["stage"] == "pretrain"
    assert state["world_size"] == 2
    shards = state["criterion_shards"]
    assert len(shards) == 2
    sources = []
    for shard in shards:
        index = {k.removeprefix("index."): v for k, v in shard.items() if k.startswith("index.")}
        size = index["_extra_state"]["size"]
        assert size > 0  # each rank enqueued its own keys
        sources.append(set(index["_source"][:size].tolist()))
    # the ranks saw disjoint images, so their shards hold different patches
    assert not sources[0] & sources[1]
    # a single process cannot resume a two-process checkpoint
    code = run_tiny(main, TINY, tmp_path / "cut", cache_dir, "--resume")
    assert code == 2


@pytest.mark.slow
def test_two_process_resume_equals_uninterrupted(tmp_path: Path, cache_dir: Path) -> None:
    args = ("--set", "pretrain.epochs=2")
    torchrun(tmp_path / "full", cache_dir, *args)
    torchrun(tmp_path / "cut", cache_dir, *args, "--stop-after-epochs", "1")
    assert not (tmp_path / "cut" / "metrics.json").exists()
    torchrun(tmp_path / "cut", cache_dir, *args, "--resume")
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "cut")


# ---------------------------------------------------------------------------------------- single process


def test_helpers_are_no_ops_in_one_process() -> None:
    job = ddp.info()
    assert (job.rank, job.world_size, job.enabled, job.is_main) == (0, 1, False, True)
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    grad = model.weight.grad.clone()
    ddp.average_gradients(model)
    ddp.average_buffers(model)
    ddp.broadcast_module(model)
    ddp.check_in_sync(model, "model")
    assert torch.equal(model.weight.grad, grad)
    assert ddp.local_batch(8, "x") == 8
    assert ddp.train_sampler(range(5), 0) is None
    parts = (torch.arange(3),)
    assert ddp.gather_in_order(parts, 3) is parts
    assert ddp.mean_over_ranks({"loss": 1.5}) == {"loss": 1.5}
    assert ddp.all_gather_objects("x") == ["x"]
    with ddp.main_first():
        pass


def test_setup_without_torchrun_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.setup("cpu") == (ddp.DistInfo(), "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"run.device.*'mps'"):
        ddp.setup("mps")


@pytest.mark.parametrize(("length", "world"), [(16, 2), (17, 2), (5, 3), (2, 4)])
def test_eval_shards_cover_every_item_once(length: int, world: int) -> None:
    shards = [list(ddp.EvalShardSampler(length, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(length))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_global_batch_must_divide_among_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ddp, "info", lambda: ddp.DistInfo(0, 3))
    assert ddp.local_batch(9, "finetune.batch_size") == 3
    with pytest.raises(ValueError, match=r"finetune.batch_size: the global batch 8 must be divisible by the 3"):
        ddp.local_batch(8, "finetune.batch_size")


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(16, 8, 1), (17, 8, 1), (17, 8, 2), (16, 8, 4), (41, 6, 3), (5, 4, 4)]
)
def test_steps_per_epoch_match_the_loaders(n: int, batch: int, world: int) -> None:
    if world == 1:
        expected = len(DataLoader(range(n), batch_size=batch))
    else:
        sampler = DistributedSampler(range(n), num_replicas=world, rank=world - 1, shuffle=True, drop_last=True)
        expected = len(DataLoader(range(n), batch_size=batch // world, sampler=sampler))
    assert _steps(n, batch, ddp.DistInfo(0, world)) == expected


def test_gathered_predictions_come_back_in_dataset_order(monkeypatch: pytest.MonkeyPatch) -> None:
    n, world = 11, 3
    probs, target = torch.rand(n, 4), torch.arange(n)
    shards = [
        (probs[list(ddp.EvalShardSampler(n, r, world))], target[list(ddp.EvalShardSampler(n, r, world))])
        for r in range(world)
    ]
    monkeypatch.setattr(ddp, "info", lambda: ddp.DistInfo(1, world))
    monkeypatch.setattr(ddp, "all_gather_objects", lambda obj: shards)  # what every rank would receive
    got_probs, got_target = ddp.gather_in_order(shards[1], n)
    assert torch.equal(got_target, target)
    assert torch.equal(got_probs, probs)


def test_hard_negatives_beyond_a_rank_shard_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.common.config import PretrainConfig
    from examples.common.pretrain import build_criterion

    monkeypatch.setattr(ddp, "info", lambda: ddp.DistInfo(0, 4))
    cfg = PretrainConfig(bank_size=100, k=32)
    with pytest.raises(ValueError, match=r"pretrain.k: 32 .* shard of 25 \(bank_size 100 / 4 processes\)"):
        build_criterion("comcl", cfg, 16, 10, torch.device("cpu"))
    cfg = PretrainConfig(bank_size=100, k=25)
    assert build_criterion("comcl", cfg, 16, 10, torch.device("cpu")).index.capacity == 25


def test_fewer_test_images_than_processes_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from examples.common.config import FinetuneConfig, ModelConfig, PretrainConfig
    from examples.common.pipeline import PipelineData, RunOptions, run_pipeline

    monkeypatch.setattr(ddp, "info", lambda: ddp.DistInfo(0, 4))
    data = PipelineData(views=list(range(8)), train=list(range(8)), test=list(range(3)), num_classes=2, group_names=[])
    with pytest.raises(ValueError, match="the test set has 3 images, fewer than the 4 processes"):
        run_pipeline(
            "ce",
            ModelConfig(),
            PretrainConfig(batch_images=8),
            FinetuneConfig(batch_size=8),
            data,
            tmp_path,
            RunOptions(),
        )
