"""The GPU check (benchmarks/gpu_check.sh): its dry run end to end on the CPU, its budget and stage limits.

The check itself runs only on a lent GPU machine, rarely; the dry run runs the same stages at tiny
sizes on the CPU here, so that the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import each other by name, as when run
import bench_loss  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_results  # noqa: E402

DEVICE_COMMAND_LIMIT_S = 600  # one command on the GPU machine
FILES_BACK = 8  # files that come back from $OUT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TORCH_DEVICE")}
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--limit-scale", "3", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    return done, out


@pytest.mark.slow
def test_dry_run_runs_every_stage(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"].startswith("dry-run")
    assert [s["name"] for s in summary["stages"]] == [s.name for s in gpu_check.STAGES]
    assert {s["name"]: s["status"] for s in summary["stages"]} == {s.name: "ok" for s in gpu_check.STAGES}
    assert set(summary["environment"]["peers"]) == {"pytorch_metric_learning", "lightly", "faiss"}
    by_name = {s["name"]: s for s in summary["stages"]}
    tests = by_name["cuda_tests"]["figures"]
    assert tests["tests"] >= 1
    assert tests["failures"] == 0
    assert tests["errors"] == 0
    assert by_name["loss_goal"]["figures"]["goal"]["met"] is None  # tiny sizes: no verdict


@pytest.mark.slow
def test_dry_run_leaves_every_result_in_out(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= FILES_BACK, files  # the device tool returns at most 8 files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files
    assert {"gpu_check.json", "gpu_check.log", "loss_goal.json", "step.json", "index.json", "loss_table.json"} <= set(
        files
    )
    loss = json.loads((out / "loss_goal.json").read_text())
    fused = [r for r in loss["rows"] if r["method"] == "ours_fused" and r["n"] == gpu_check.DRY.loss_n]
    assert fused
    assert fused[0]["status"] == "ok"
    assert fused[0]["wall_ms"] > 0
    step = json.loads((out / "step.json").read_text())
    assert step["encoder"] == "resnet18"
    assert step["method_share_of_step"] > 0
    assert step["index_backend"] is not None
    index = json.loads((out / "index.json").read_text())
    assert index["complete"]
    assert {r["bank"] for r in index["rows"]} == set(gpu_check.DRY.index_banks)
    log = (out / "gpu_check.log").read_text()
    assert "| stage | status |" in log  # the closing table, also in the log


def test_core_stages_fit_one_device_command() -> None:
    limits = {s.name: s.limit_s for s in gpu_check.STAGES}
    assert [s.name for s in gpu_check.STAGES][: len(gpu_check.CORE)] == gpu_check.CORE  # ordered by value
    assert sum(limits[name] for name in gpu_check.CORE) <= gpu_check.DEFAULT_BUDGET_S
    assert gpu_check.DEFAULT_BUDGET_S <= DEVICE_COMMAND_LIMIT_S - 100  # room for start-up and transfers
    assert all(limit <= gpu_check.DEFAULT_BUDGET_S for limit in limits.values())


def test_readme_gives_each_stage_its_limit() -> None:
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    documented = {m[0]: float(m[1]) for m in re.findall(r"^\| `(\w+)` \|.*\| (\d+) s \|$", readme, re.M)}
    assert documented == {s.name: s.limit_s for s in gpu_check.STAGES}


def test_goal_stage_asks_for_methods_that_exist() -> None:
    for methods in (gpu_check.LOSS_METHODS, gpu_check.DRY_LOSS_METHODS):
        assert set(methods.split(",")) <= set(bench_loss.METHODS)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        pytest.param(0.0, 150.0, id="own-limit"),
        pytest.param(400.0, 80.0, id="shrunk-to-budget"),
        pytest.param(470.0, None, id="too-little-left"),
    ],
)
def test_plan_keeps_stages_inside_the_budget(elapsed: float, expected: float | None) -> None:
    assert gpu_check.plan("cuda_tests", 150.0, 480.0, elapsed) == expected


def _state(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except FileNotFoundError:
        return None
    return None


def test_a_stage_past_its_limit_is_ended_with_its_workers(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('worker', worker.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    lines: list[str] = []
    result = gpu_check.run_stage([sys.executable, "-c", script], 3.0, lines.append, dict(os.environ))
    assert result["status"] == "timeout (> 3 s)"
    assert result["exit"] is None
    pid = int(next(line for line in lines if "worker" in line).split()[1])  # output before the limit is kept
    for _ in range(50):  # the worker got SIGTERM with its group; give the kernel a moment
        if _state(pid) in (None, "Z"):
            break
        time.sleep(0.1)
    assert _state(pid) in (None, "Z")


def test_a_failing_stage_is_reported_with_its_exit_code() -> None:
    result = gpu_check.run_stage([sys.executable, "-c", "raise SystemExit(3)"], 60.0, lambda line: None, {})
    assert result["status"] == "failed (exit 3)"
    assert result["exit"] == 3


def test_junit_summary_tells_missing_peers_from_failures(tmp_path: Path) -> None:
    (tmp_path / "test_needs_faiss.py").write_text("raise ModuleNotFoundError(\"No module named 'faiss'\")\n")
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert 1 == 2\n\ndef test_passes():\n    pass\n")
    xml = tmp_path / "out.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        + [f"--junitxml={xml}", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    summary = gpu_check_results.junit_summary(xml)
    assert len(summary["not_installed"]) == 1
    assert "faiss not installed" in summary["not_installed"][0]
    assert len(summary["failed"]) == 1
    assert "test_fails" in summary["failed"][0]


def test_peers_that_are_missing_are_reported_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "lightly", None)
    info = bench_loss.machine("cpu")
    assert info["pytorch_metric_learning"] == "not installed"
    assert info["lightly"] == "not installed"
    result = bench_loss.run_case("pml_supcon", 8, "cpu", repeats=1, cap_s=5.0)
    assert result == {"status": "not installed (pytorch_metric_learning)"}
    assert bench_loss.missing_peer("lightly_ntxent") == "lightly"
    assert bench_loss.missing_peer("ours_fused") is None
