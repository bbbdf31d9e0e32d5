"""Throughput of the synthetic look-alike datasets (rendering and degradation), one thread.

The goal is at least 50 images/s at 256 px on one core. Each dataset renders its first ``--n``
images in a worker process (one torch thread, pinned to the first core the script may use), one
image at a time, in ``--processes`` fresh processes one after the other. The script reports images
per second of CPU time (``time.process_time``) over all of them and per process: the same code can
run persistently faster in one process than in the next (by up to 20 % here), so one process
proves little.

With ``--against SRC`` (the ``src`` folder of another checkout, e.g. a ``git worktree`` of an
earlier commit), each process of this checkout has a twin importing that version, and the two
render the same images in alternation (first one, then the other), so that both see the same drift
of the machine's speed (it changes within a second here).

Usage::

    python benchmarks/bench_synthetic.py                 # 3 processes x 200 images per dataset
    python benchmarks/bench_synthetic.py --quick         # 1 process x 40 images
    git worktree add /tmp/prev HEAD~1 && python benchmarks/bench_synthetic.py --against /tmp/prev/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench_index import machine_info

DATASETS = ("SyntheticFundus", "SyntheticChestXray")
WARMUP = 5


def serve(name: str, n: int, size: int, seed: int) -> None:
    """Worker: render the next sample per line on stdin; answer its CPU seconds."""
    import mlcl_losses.synthetic as synthetic

    if hasattr(os, "sched_setaffinity"):  # every worker on the same core: cores of a VM differ in speed
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    data = getattr(synthetic, name)(n + WARMUP, size=size, seed=seed)
    for i in range(WARMUP):  # samples after the timed ones: caches, lazy imports
        data[n + i]
    print("ready", flush=True)
    for i, _ in enumerate(sys.stdin):
        start = time.process_time()
        data[i]
        print(time.process_time() - start, flush=True)


class Worker:
    """A :func:`serve` process importing ``mlcl_losses`` from ``src``."""

    def __init__(self, src: Path, name: str, args: argparse.Namespace) -> None:
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)])}
        code = f"import bench_synthetic as b; b.serve({name!r}, {args.n}, {args.size}, {args.seed})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("worker pipes missing")
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker for {name} from {src} failed to start")

    def render_next(self) -> float:
        self.stdin.write("next\n")
        self.stdin.flush()
        return float(self.stdout.readline())

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info(torch.device("cpu"))
    versions = {"this checkout": Path(__file__).resolve().parents[1] / "src"}
    if args.against is not None:
        versions[f"against {args.against}"] = args.against
    results: dict[str, dict[str, Any]] = {version: {} for version in versions}
    for name in DATASETS:
        seconds: dict[str, list[float]] = {version: [] for version in versions}  # per worker process
        for _ in range(args.processes):
            workers = {version: Worker(src, name, args) for version, src in versions.items()}
            spent = dict.fromkeys(versions, 0.0)
            for i in range(args.n):
                order = list(workers) if i % 2 == 0 else list(reversed(workers))  # neither always runs first
                for version in order:
                    spent[version] += workers[version].render_next()
            for version, worker in workers.items():
                worker.close()
                seconds[version].append(spent[version])
        for version, spent_per_process in seconds.items():
            per_process = [args.n / t for t in spent_per_process]
            rate = args.n * len(per_process) / sum(spent_per_process)
            results[version][name] = {"images_per_s": rate, "per_process": per_process}
            rates = ", ".join(f"{r:.1f}" for r in per_process)
            print(f"{name} ({version}): {rate:.1f} images/s (per process: {rates})")
    return {
        "machine": info,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": args.size,
        "images_per_process": args.n,
        "results": results,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"| dataset ({result['size']} px, 1 thread) | version | images/s | per worker process |",
        "|---|---|---:|---|",
    ]
    for name in DATASETS:
        for version, per_set in result["results"].items():
            res = per_set[name]
            rates = ", ".join(f"{r:.1f}" for r in res["per_process"])
            lines.append(f"| {name} | {version} | {res['images_per_s']:.1f} | {rates} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="images per dataset (and version)")
    parser.add_argument("--processes", type=int, default=3, help="fresh worker processes per dataset and version")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="40 images, one process")
    parser.add_argument("--against", type=Path, default=None, help="src folder of another version to time too")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthetic_cpu.json")
    args = parser.parse_args()
    if args.quick:
        args.n, args.processes = 40, 1
    result = run(args)
    print(markdown(result))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
