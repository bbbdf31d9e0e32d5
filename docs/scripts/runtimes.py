"""Run times of the example commands: measured into a results file, written into the docs from it.

    python docs/scripts/runtimes.py measure            # run every command, write docs/runtimes.json
    python docs/scripts/runtimes.py measure eyeq demo  # only some of them (the others are kept)
    python docs/scripts/runtimes.py write              # put the figures into the pages (between markers)
    python docs/scripts/runtimes.py check              # exit 1 if a page disagrees with the file (a test runs it)

A page quotes a figure between ``<!-- runtime:NAME -->`` and ``<!-- /runtime -->``; ``write`` replaces
what is between them with the figure of job ``NAME`` (its wall time and the machine), so a rerun of
``measure`` on another machine keeps every page true. Each pipeline runs twice with a fresh, empty
data cache: the first time includes rendering the synthetic images, the second reads them from the
cache (what a user sees from the second run on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # hardware.py: the CPU model, as the benchmarks record it

from hardware import cpu_model  # noqa: E402

RESULTS = ROOT / "docs" / "runtimes.json"
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "examples").glob("*/README.md"))]
MARKER = re.compile(r"<!-- runtime:(?P<name>[a-z_]+) -->(?P<body>.*?)<!-- /runtime -->", re.S)

# name -> (command after `python`, uses the synthetic data cache)
JOBS: dict[str, tuple[list[str], bool]] = {
    "demo": (["examples/demo.py"], False),
    "eyeq": (["examples/eyeq/train.py"], True),
    "chestxray": (["examples/chestxray/train.py"], True),
}


def machine() -> str:
    """CPU model, core count, GPU (if any) and torch version of this machine, in words."""
    import torch

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu}, {gpu}, torch {torch.__version__}"


def _run(args: list[str], out: Path, cache: Path | None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of the command and its children) of one run."""
    cmd = [sys.executable, *args]
    if cache is not None:
        cmd += ["--out", str(out), "--set", f"data.synthetic.cache_dir={cache}", "--set", "run.tensorboard=false"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return round(wall, 1), round(cpu, 1)


def measure(names: list[str], machine_words: str | None = None) -> None:
    """Run the jobs ``names`` and merge their times into :data:`RESULTS` (written after each job).

    Args:
        names: keys of :data:`JOBS`.
        machine_words: how the pages name this machine (default: cores, CPU model and GPU).
    """
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"jobs": {}}
    results["machine"] = machine()
    results["machine_short"] = machine_words or results["machine"].rsplit(", torch", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            args, cached = JOBS[name]
            load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
            entry: dict[str, object] = {"command": "python " + " ".join(args), "load_average_before": load}
            if cached:
                cache = Path(tmp) / f"cache_{name}"
                entry["first_s"], entry["first_cpu_s"] = _run(args, Path(tmp) / f"{name}_1", cache)
                entry["again_s"], entry["again_cpu_s"] = _run(args, Path(tmp) / f"{name}_2", cache)
            else:
                entry["first_s"], entry["first_cpu_s"] = _run(args, Path(tmp) / name, None)
            entry["load_average_after"] = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
            entry["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            results["jobs"][name] = entry
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name}: {entry}", flush=True)


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    minutes, seconds = divmod(round(s), 60)
    return f"{minutes} min {seconds:02d} s"


def figure(name: str, results: dict) -> str:
    """The text a page shows for job ``name``: wall time(s), the machine and how busy it was."""
    job = results["jobs"][name]
    load = job.get("load_average_before")
    when = f"{job['date'][:10]}, load average {load:g}" if load is not None else job["date"][:10]
    where = f"{results['machine_short']} ({when})"
    if "again_s" in job:
        return (
            f"{_duration(job['again_s'])} of wall time, {_duration(job['again_cpu_s'])} of CPU time "
            f"({_duration(job['first_s'])} the first time, which renders and caches the synthetic data) on {where}"
        )
    return f"{_duration(job['first_s'])} of wall time, {_duration(job['first_cpu_s'])} of CPU time on {where}"


def _render(text: str, results: dict) -> str:
    return MARKER.sub(lambda m: f"<!-- runtime:{m['name']} -->{figure(m['name'], results)}<!-- /runtime -->", text)


def _load() -> dict:
    return dict(json.loads(RESULTS.read_text()))


def write() -> None:
    """Put the figures of :data:`RESULTS` into every page's markers."""
    results = _load()
    for page in PAGES:
        text = page.read_text()
        new = _render(text, results)
        if new != text:
            page.write_text(new)
            print(f"updated {page.relative_to(ROOT)}")


def check() -> list[str]:
    """Pages whose markers disagree with :data:`RESULTS` (or name an unknown job)."""
    results = _load()
    bad = []
    for page in PAGES:
        text = page.read_text()
        unknown = [m["name"] for m in MARKER.finditer(text) if m["name"] not in results["jobs"]]
        if unknown or _render(text, results) != text:
            bad.append(f"{page.relative_to(ROOT)}" + (f" (unknown jobs {unknown})" if unknown else ""))
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("names", nargs="*", help=f"jobs to run (default: all of {', '.join(JOBS)})")
    m.add_argument("--machine", default=None, help="how the pages name this machine")
    sub.add_parser("write")
    sub.add_parser("check")
    args = p.parse_args(argv)
    if args.cmd == "measure":
        unknown = [n for n in args.names if n not in JOBS]
        if unknown:
            p.error(f"unknown jobs {unknown}; expected some of {list(JOBS)}")
        measure(args.names or list(JOBS), args.machine)
    elif args.cmd == "write":
        write()
    else:
        bad = check()
        for page in bad:
            print(f"{page}: run times differ from {RESULTS.relative_to(ROOT)}; run `python {__file__} write`")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
