"""The GPU check: CUDA tests and GPU benchmarks in one command that fits a short GPU lease.

Stages run in order of value, each in its own process group under its own time limit, all
inside one overall budget (default 480 s, under the 600 s a device command may run):

1. ``cuda_tests``: every ``cuda``-marked test (Triton kernels compiled for the real GPU,
   the index and the loss on CUDA, a CPU index with CUDA embeddings);
2. ``loss_goal``: three CoMCL levels at N = 8192, forward + backward, against the peers;
3. ``step``: the method's share (loss + index search + weighting) of a ResNet-50 step;
4. ``index``: a 4096-query search of banks of 1M (the goal, first), 65k and 4M entries;
5. ``device_tests``: the device-parametrised tests with ``TORCH_DEVICE=cuda`` (if time is left);
6. ``loss_table``: the full loss table, N = 1024 ... 16384 (if time is left).

Every result is written to the output folder (``--out``, default ``$OUT``) as soon as its
stage ends, and ``gpu_check.json`` (stage statuses, goal figures, peers) is rewritten after
every stage, so a command killed at its limit still returns what finished. Peers that are
not installed (pytorch-metric-learning, lightly, FAISS) are reported as "not installed".

``--dry-run`` runs the same stages on the CPU at tiny sizes (the test suite does this).

Usage::

    bash benchmarks/gpu_check.sh                       # on the GPU machine: results in $OUT
    bash benchmarks/gpu_check.sh --stages index,loss_table --budget 300   # a rerun of some stages
    bash benchmarks/gpu_check.sh --dry-run --out runs/gpu_check           # the same on the CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gpu_check_results import GOALS, environment, index_figures, junit_summary, loss_figures, short, step_figures

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DEFAULT_BUDGET_S = 480.0  # one device command may run 600 s; the rest is start-up and transfers
MIN_STAGE_S = 20.0  # a stage with less time than this left is skipped


@dataclass(frozen=True)
class Sizes:
    """The problem sizes of one mode (the GPU check, or the dry run on the CPU)."""

    device: str
    loss_n: int
    loss_curve: list[int]
    loss_repeats: int
    loss_table: list[str]  # extra bench_loss arguments of the full table
    step: list[str]  # bench_step arguments
    index_banks: list[int]  # the goal bank first
    index_queries: int
    index_repeat: int


GPU = Sizes(
    device="cuda",
    loss_n=8192,
    loss_curve=[2048, 32768],
    loss_repeats=20,
    loss_table=["--repeats", "10"],
    step=["--repeats", "10"],
    index_banks=[1 << 20, 1 << 16, 1 << 22],
    index_queries=4096,
    index_repeat=5,
)
DRY = Sizes(
    device="cpu",
    loss_n=64,
    loss_curve=[],
    loss_repeats=1,
    loss_table=["--sizes", "32", "--curve", "--repeats", "1", "--methods", "pml_supcon"],
    step=["--encoder", "resnet18", "--patches", "10", "--pixels", "16", "--bank", "256", "--k", "4", "--repeats", "1"],
    index_banks=[1024],
    index_queries=32,
    index_repeat=1,
)
LOSS_METHODS = "ours_fused,ours_fused_torch,ours_reference,naive_ce,pml_supcon,pml_per_level"
DRY_LOSS_METHODS = "ours_fused"  # the GPU list is checked against bench_loss.METHODS by a test


@dataclass(frozen=True)
class Stage:
    """One stage: a command, its time limit, the result file it leaves in the output folder."""

    name: str
    what: str
    limit_s: float
    command: Callable[[Sizes, Path, Path, bool], list[str]]  # (sizes, out, scratch, dry) -> argv
    result: str | None = None  # file name in the output folder, written by the stage
    copy: str | None = None  # file in the scratch folder, copied to ``result`` when the stage ends
    env: dict[str, str] | None = None
    junit: bool = False


def cuda_test_files() -> list[str]:
    """Test files that hold ``cuda``-marked tests."""
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.cuda" in p.read_text())
    return [str(p.relative_to(ROOT)) for p in files]


def device_test_files() -> list[str]:
    """Test files with a test that takes the ``device`` fixture (TORCH_DEVICE)."""
    pattern = re.compile(r"def test_\w+\([^)]*\bdevice: torch\.device")
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if pattern.search(p.read_text()))
    return [str(p.relative_to(ROOT)) for p in files]


def _pytest(files: list[str], marker: str, scratch: Path, name: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        marker,
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={scratch / (name + '.xml')}",
        *extra,
        *files,
    ]


def _bench(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


STAGES = [
    Stage(
        "cuda_tests",
        "every cuda-marked test: Triton kernels compiled for the GPU, index and loss on CUDA",
        150,
        lambda s, out, scratch, dry: _pytest(cuda_test_files(), "cuda", scratch, "cuda_tests", []),
        junit=True,
    ),
    Stage(
        "loss_goal",
        "three CoMCL levels at the goal size, forward+backward, against the peers",
        100,
        lambda s, out, scratch, dry: _bench(
            "bench_loss.py",
            *("--device", s.device, "--sizes", str(s.loss_n), "--curve", *map(str, s.loss_curve)),
            *("--repeats", str(s.loss_repeats), "--cap", "20"),
            *("--methods", DRY_LOSS_METHODS if dry else LOSS_METHODS, "--out", str(scratch / "loss_goal.json")),
        ),
        result="loss_goal.json",
        copy="loss_goal.json",
    ),
    Stage(
        "step",
        "the method's share (loss + index search + self-paced weighting) of an encoder step",
        90,
        lambda s, out, scratch, dry: _bench(
            "bench_step.py", "--device", s.device, *s.step, "--out", str(out / "step.json")
        ),
        result="step.json",
    ),
    Stage(
        "index",
        "hard-negative index search (goal bank first) against matmul + top-k",
        140,
        lambda s, out, scratch, dry: _bench(
            "bench_index.py",
            *("--device", s.device, "--sizes", *map(str, s.index_banks), "--queries", str(s.index_queries)),
            *("--repeat", str(s.index_repeat), "--out", str(out / "index.json")),
        ),
        result="index.json",
    ),
    Stage(
        "device_tests",
        "the device-parametrised tests on the GPU (TORCH_DEVICE)",
        120,
        lambda s, out, scratch, dry: _pytest(
            device_test_files(),
            "not cuda",
            scratch,
            "device_tests",
            ["--collect-only", "-q"] if dry else ["--maxfail=20"],
        ),
        env={"TORCH_DEVICE": "cuda"},
        junit=True,
    ),
    Stage(
        "loss_table",
        "the full loss table (every size and peer)",
        150,
        lambda s, out, scratch, dry: _bench(
            "bench_loss.py", "--device", s.device, *s.loss_table, "--out", str(scratch / "loss_table.json")
        ),
        result="loss_table.json",
        copy="loss_table.json",
    ),
]
CORE = ["cuda_tests", "loss_goal", "step", "index"]


# ------------------------------------------------------------------------------------------ running


class Log:
    """Lines to stdout and to the log file, each flushed at once (a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


_running: subprocess.Popen[str] | None = None  # the stage in flight, ended if this process is told to stop


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """End the stage's process group (the stage and its workers): TERM, then KILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _on_signal(signum: int, frame: Any) -> None:
    if _running is not None:
        _kill_group(_running)
    raise SystemExit(128 + signum)


def run_stage(argv: list[str], limit_s: float, log: Callable[[str], None], env: dict[str, str]) -> dict[str, Any]:
    """Run one command in its own process group; end the group at ``limit_s``.

    Returns:
        ``{"status": "ok" | "failed (exit N)" | "timeout (> L s)", "exit": int | None, "seconds": float}``.
    """
    global _running
    t0 = time.monotonic()
    # its own process group (not session), so that the group can be ended and nothing outlives the check
    group: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **group
    )
    _running = proc
    assert proc.stdout is not None

    def pump(stream: IO[str]) -> None:
        for line in stream:
            log("  " + line.rstrip("\n"))

    reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=limit_s)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        code, status = None, f"timeout (> {limit_s:.0f} s)"
    finally:
        _running = None
    reader.join(timeout=5)
    return {"status": status, "exit": code, "seconds": round(time.monotonic() - t0, 1)}


def plan(name: str, limit_s: float, budget_s: float, elapsed_s: float) -> float | None:
    """The time limit of a stage given what is left of the budget, or None where too little is left."""
    left = budget_s - elapsed_s
    if left < min(MIN_STAGE_S, limit_s):
        return None
    return min(limit_s, left)


# ----------------------------------------------------------------------------------------- results


def figures(name: str, out: Path, scratch: Path, sizes: Sizes) -> dict[str, Any]:
    """What a finished stage measured, read back from its result file."""
    try:
        if name in ("cuda_tests", "device_tests"):
            return junit_summary(scratch / f"{name}.xml")
        path = out / {"loss_goal": "loss_goal.json", "step": "step.json", "index": "index.json"}.get(name, "")
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        if name == "loss_goal":
            return loss_figures(data, sizes.loss_n)
        if name == "step":
            return step_figures(data)
        if name == "index":
            return index_figures(data, sizes.index_banks[0])
    except (OSError, ValueError, KeyError, ET.ParseError) as err:
        return {"unreadable": f"{type(err).__name__}: {err}"}
    return {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    parser.add_argument(
        "--limit-scale",
        type=float,
        default=1.0,
        help="multiply the budget and every stage limit (the test suite's dry run on a loaded CI runner uses 3)",
    )
    names = [s.name for s in STAGES]
    parser.add_argument("--stages", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {names}")
    if args.budget <= 0:
        parser.error(f"--budget: expected seconds > 0, got {args.budget}")
    if not args.limit_scale > 0:
        parser.error(f"--limit-scale: expected a factor > 0, got {args.limit_scale}")
    args.budget *= args.limit_scale
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY if args.dry_run else GPU
    log = Log(out / "gpu_check.log")
    signal.signal(signal.SIGTERM, _on_signal)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    summary: dict[str, Any] = {
        "mode": "dry-run (CPU, tiny sizes)" if args.dry_run else "gpu",
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "environment": environment(),
        "goals": GOALS,
        "stages": [],
    }
    log(f"gpu_check {summary['mode']}: budget {args.budget:.0f} s, out {out}")
    log(json.dumps(summary["environment"]))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        scratch = Path(tmp)
        for stage in STAGES:
            if stage.name not in chosen:
                continue
            record: dict[str, Any] = {"name": stage.name, "what": stage.what}
            summary["stages"].append(record)
            limit = plan(stage.name, stage.limit_s * args.limit_scale, args.budget, time.monotonic() - t0)
            if limit is None:
                record["status"] = "skipped (budget)"
                log(f"=== {stage.name}: skipped, {args.budget - (time.monotonic() - t0):.0f} s of the budget left")
                write_json(out / "gpu_check.json", summary)
                continue
            command = stage.command(sizes, out, scratch, args.dry_run)
            stage_env = {**env, **(stage.env or {})} if not args.dry_run else env
            record.update(status="running", limit_s=round(limit, 1), command=command[1:])
            write_json(out / "gpu_check.json", summary)
            log(f"=== {stage.name} (limit {limit:.0f} s): {stage.what}")
            record.update(run_stage(command, limit, log, stage_env))
            if stage.copy is not None and (scratch / stage.copy).is_file() and stage.result is not None:
                shutil.copyfile(scratch / stage.copy, out / stage.result)
            if stage.result is not None and (out / stage.result).is_file():
                record["result_file"] = stage.result
            record["figures"] = figures(stage.name, out, scratch, sizes)
            if args.dry_run and "goal" in record["figures"]:
                record["figures"]["goal"]["met"] = None  # tiny sizes on a CPU: the goals do not apply
            log(f"=== {stage.name}: {record['status']} after {record['seconds']:.0f} s {short(record)}")
            write_json(out / "gpu_check.json", summary)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    write_json(out / "gpu_check.json", summary)
    log("")
    log(f"| stage | status | s | figures ({summary['mode']}) |")
    log("|---|---|---:|---|")
    for record in summary["stages"]:
        log(f"| {record['name']} | {record['status']} | {record.get('seconds', '-')} | {short(record)} |")
    log(f"wrote {out / 'gpu_check.json'}")
    return 0 if all(r["status"] in ("ok", "skipped (budget)") for r in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
