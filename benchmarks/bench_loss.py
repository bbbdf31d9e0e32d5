"""Forward+backward time and peak memory of the multi-level loss against its peers, in one run.

Each (method, N) case runs in a fresh subprocess, so that CPU peak memory is the process's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
inputs exist and one warm-up run) minus its resident set before the timed runs; on CUDA it
is ``torch.cuda.max_memory_allocated`` above the inputs. A case that raises out-of-memory,
is killed, or passes the time cap is reported as such.

Usage::

    python benchmarks/bench_loss.py                 # CPU sizes 256, 1024, 2048 (+ fused-only curve)
    python benchmarks/bench_loss.py --device cuda   # 1024, 4096, 8192, 16384
    python benchmarks/bench_loss.py --bank-capacities   # only: memory of the loss with an index, 64k ... 4M slots
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hardware import cpu_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEMPERATURE = 0.1
DIM = 128

METHODS = {
    "pml_ntxent": "PML NTXentLoss (1 level)",
    "pml_supcon": "PML SupConLoss (1 level)",
    "lightly_ntxent": "lightly NTXentLoss (1 level)",
    "pml_per_level": "3 x PML NTXentLoss (indices_tuple)",
    "naive_ce": "naive N x N cross-entropy (1 level)",
    "ours_reference": "ours, reference (3 levels)",
    "ours_fused": "ours, fused (3 levels; Triton on CUDA)",
    "ours_fused_torch": "ours, fused, torch tiles (3 levels; CUDA only)",
    # the pipelines' configuration (quantile self-paced pace on every level) and DCL / HCL (issue #17)
    "ours_reference_pace": "ours, reference, quantile pace (3 levels)",
    "ours_fused_pace": "ours, fused, quantile pace (3 levels)",
    "ours_reference_dcl": "ours, reference, DCL tau+=0.1 (3 levels)",
    "ours_fused_dcl": "ours, fused, DCL tau+=0.1 (3 levels)",
    "ours_reference_hcl": "ours, reference, HCL beta=1 tau+=0.1 (3 levels)",
    "ours_fused_hcl": "ours, fused, HCL beta=1 tau+=0.1 (3 levels)",
}
#: keyword arguments of the option rows, by method suffix
OPTION_ROWS = {"dcl": {"tau_plus": 0.1}, "hcl": {"tau_plus": 0.1, "beta": 1.0}}


def comcl_tags(n: int, device: torch.device) -> Any:
    """Four views per source (docs/glossary.md): V1a, V1b, V2 per lesion source; V3, V4 per healthy source."""
    from mlcl_losses import ViewTags

    lesion = n // 5
    while (n - 3 * lesion) % 2:
        lesion -= 1
    healthy = (n - 3 * lesion) // 2
    kind, quality, source = [], [], []
    for s in range(lesion):
        kind += [1, 1, 1]
        quality += [0, 0, 1]
        source += [s] * 3
    for s in range(healthy):
        kind += [0, 0]
        quality += [0, 1]
        source += [lesion + s] * 2
    return ViewTags(kind=kind, quality=quality, source=source).to(device)


def build(method: str, n: int, device: torch.device) -> Any:
    """Return a closure computing the loss (forward) from embeddings ``z``."""
    from mlcl_losses import comcl_levels, level_masks
    from mlcl_losses.functional import multilevel_info_nce

    tags = comcl_tags(n, device)
    levels = comcl_levels()
    if method == "pml_ntxent":
        from pytorch_metric_learning.losses import NTXentLoss

        loss_fn = NTXentLoss(temperature=TEMPERATURE)
        return lambda z: loss_fn(z, tags.source)
    if method == "pml_supcon":
        from pytorch_metric_learning.losses import SupConLoss

        loss_fn = SupConLoss(temperature=TEMPERATURE)
        return lambda z: loss_fn(z, tags.source)
    if method == "lightly_ntxent":
        from lightly.loss import NTXentLoss as LightlyNTXent

        loss_fn = LightlyNTXent(temperature=TEMPERATURE)
        half = n // 2
        return lambda z: loss_fn(z[:half], z[half : 2 * half])
    if method == "pml_per_level":
        from pytorch_metric_learning.losses import NTXentLoss

        loss_fn = NTXentLoss(temperature=TEMPERATURE)

        def per_level(z: torch.Tensor) -> torch.Tensor:
            total = z.sum() * 0.0
            for lm in level_masks(tags, levels):  # the masks a PML user has to build
                a1, p = lm.positives.nonzero(as_tuple=True)
                a2, neg = lm.negatives.nonzero(as_tuple=True)
                total = total + loss_fn(z, indices_tuple=(a1, p, a2, neg))
            return total

        return per_level
    if method == "naive_ce":
        eye = torch.eye(n, dtype=torch.bool, device=device)
        same = (tags.source[:, None] == tags.source[None, :]) & ~eye
        target = same.float().argmax(dim=1)  # one positive per row

        def naive(z: torch.Tensor) -> torch.Tensor:
            zn = torch.nn.functional.normalize(z, dim=1)
            logits = (zn @ zn.T / TEMPERATURE).masked_fill(eye, float("-inf"))
            return torch.nn.functional.cross_entropy(logits, target)

        return naive
    if method.endswith(("_pace", "_dcl", "_hcl")):
        from mlcl_losses import PaceSchedule, SelfPacedWeighting

        impl = "fused" if method.startswith("ours_fused") else "reference"
        suffix = method.rsplit("_", 1)[1]
        if suffix == "pace":  # as examples/common/config.py: hard regulariser, quantile pace from 0.8
            spl = SelfPacedWeighting("hard", PaceSchedule.quantile(start=0.8, end=1.0, steps=1000))
            opts: dict[str, Any] = {"negative_weights": spl}
        else:
            opts = OPTION_ROWS[suffix]
        return lambda z: multilevel_info_nce(z, tags, levels, TEMPERATURE, impl=impl, **opts)[0]
    if method in ("ours_reference", "ours_fused", "ours_fused_torch"):
        impl = "reference" if method == "ours_reference" else "fused"
        backend = "torch" if method == "ours_fused_torch" else "auto"
        return lambda z: multilevel_info_nce(z, tags, levels, TEMPERATURE, impl=impl, backend=backend)[0]
    raise ValueError(f"unknown method {method!r}")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(
    method: str, n: int, device_name: str, repeats: int, step_cap_s: float, mem_cap_gib: float
) -> dict[str, Any]:
    """One case in this (fresh) process: time and peak memory of forward+backward."""
    device = torch.device(device_name)
    if device.type == "cpu" and mem_cap_gib > 0:  # a peer that would exhaust a shared machine fails here
        import resource

        limit = int(mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.manual_seed(0)
    z0 = torch.randn(n, DIM, device=device)
    fn = build(method, n, device)

    def step() -> None:
        z = z0.clone().requires_grad_()
        loss = fn(z)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        t0 = time.perf_counter()
        step()  # warm-up (first-call initialisation)
        first = time.perf_counter() - t0
        if first > step_cap_s:
            return {"status": f"timeout (one step > {step_cap_s:.0f} s)"}
        if first * (repeats + 1) > step_cap_s:  # slow peer: fewer repeats, still at least one
            repeats = max(1, int(step_cap_s / first) - 1)
        else:
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _rss_kib("VmRSS") * 1024
        walls, cpus = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
    except (torch.OutOfMemoryError, MemoryError) as err:
        return {"status": "oom", "error": str(err)[:200]}
    except RuntimeError as err:
        if "allocate" not in str(err):
            raise
        return {"status": f"oom (> {mem_cap_gib:g} GiB)", "error": str(err)[:200]}
    walls.sort()
    cpus.sort()
    return {
        "status": "ok",
        "wall_ms": 1e3 * walls[len(walls) // 2],
        "wall_min_ms": 1e3 * walls[0],
        "cpu_ms": 1e3 * cpus[len(cpus) // 2],
        "peak_mib": max(peak, 0) / 2**20,
    }


def _spawn(
    method: str, n: int, device: str, repeats: int, cap_s: float, threads: int, mem_cap_gib: float, env: dict
) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), "--device", device, "--repeats", str(repeats)]
    cmd += ["--threads", str(threads), "--cap", str(cap_s), "--mem-cap", str(mem_cap_gib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * cap_s + 60, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (case > {3 * cap_s + 60:.0f} s)"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        status = "oom (killed)" if proc.returncode in (-9, 137) else f"error: {tail[0][:120]}"
        return {"status": status}
    return json.loads(proc.stdout.strip().splitlines()[-1])


PEERS = {"pml_": "pytorch_metric_learning", "lightly_": "lightly"}  # method prefix -> module


def peer_version(module: str) -> str | None:
    """The installed version of a peer library, or None where it is not installed (e.g. a GPU image)."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except ImportError:
        return None


def missing_peer(method: str) -> str | None:
    """The peer module ``method`` needs and that is not installed, else None."""
    module = next((m for prefix, m in PEERS.items() if method.startswith(prefix)), None)
    return module if module is not None and peer_version(module) is None else None


def run_case(
    method: str, n: int, device: str, repeats: int, cap_s: float, threads: int = 0, mem_cap_gib: float = 4.0
) -> dict[str, Any]:
    """Time in one fresh process (default allocator), peak memory in another (CPU: fixed glibc thresholds)."""
    missing = missing_peer(method)
    if missing is not None:
        return {"status": f"not installed ({missing})"}
    timed = _spawn(method, n, device, repeats, cap_s, threads, mem_cap_gib, dict(os.environ))
    if timed["status"] != "ok" or device.startswith("cuda"):
        return timed
    # With glibc's default dynamic mmap threshold, memory freed by the warm-up stays resident and hides
    # the peak; fixed thresholds return freed blocks to the OS, so VmHWM - VmRSS is the step's own peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    mem = _spawn(method, n, device, 1, cap_s, threads, mem_cap_gib, env)
    timed["peak_mib"] = mem.get("peak_mib", float("nan"))
    return timed


def machine(device: str) -> dict[str, Any]:
    """CPU, versions (a peer that is missing: "not installed") and GPU of this run."""
    cpu = cpu_model()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{module: peer_version(module) or "not installed" for module in PEERS.values()},
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def plot(curve: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [c[0] for c in curve]
    mib = [c[1] for c in curve]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ns, mib, "o-", label="fused (measured)")
    slope = mib[-1] / ns[-1]
    ax.plot(ns, [slope * n for n in ns], "--", color="grey", label="linear through last point")
    ax.set_xlabel("N (embeddings)")
    ax.set_ylabel("peak memory above inputs (MiB)")
    ax.set_title("multilevel_info_nce, fused, 3 levels, D=128", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------ memory of the loss with an index, by capacity
BANK_N, BANK_K = 65, 64  # fixed N * k: 65 views (13 lesion boxes' V1a/V1b/V2, V3/V4 of 13 healthy patches)
BANK_CAPACITIES = [1 << 16, 1 << 18, 1 << 20, 1 << 22]  # 64k ... 4M slots


def bank_worker(capacity: int, device_name: str) -> dict[str, Any]:
    """Peak memory above the inputs with a full index of ``capacity`` slots (fresh process): of the loss given
    the search's candidates into the whole buffer (``multilevel_info_nce``), and of a whole step (search + loss)."""
    from mlcl_losses import HardNegativeIndex, MultiLevelContrastiveLoss, ViewTags, comcl_levels
    from mlcl_losses.functional import multilevel_info_nce

    device = torch.device(device_name)
    torch.manual_seed(0)
    index = HardNegativeIndex(dim=DIM, capacity=capacity, device=device, backend="auto")
    for start in range(0, capacity, 1 << 18):
        m = min(1 << 18, capacity - start)
        kind, quality = torch.randint(0, 2, (2, m))
        index.add(
            torch.randn(m, DIM, device=device), ViewTags(kind, quality, start + BANK_N + torch.arange(m)).to(device)
        )
    levels = comcl_levels()
    criterion = MultiLevelContrastiveLoss(levels, temperature=TEMPERATURE, index=index, k=BANK_K)
    tags, z0 = comcl_tags(BANK_N, device), torch.randn(BANK_N, DIM, device=device)
    candidates = []
    for level in levels:  # each level's hits, as slots of the whole buffer
        cand = torch.full((BANK_N, BANK_K), -1, dtype=torch.long, device=device)
        rows = level.anchors(tags).nonzero()[:, 0]
        cand[rows] = index.search(z0[rows], BANK_K, negatives=level, exclude_source=tags.source[rows]).indices
        candidates.append(cand)
    bank = (index.embeddings, index.tags)
    steps = {
        "loss": lambda z: multilevel_info_nce(z, tags, levels, TEMPERATURE, bank=bank, candidates=candidates)[0],
        "step": lambda z: criterion(z, tags)[0],
    }
    out: dict[str, Any] = {"status": "ok", "index_mib": capacity * DIM * 4 / 2**20, "backend": index.backend_name}
    for name, fn in steps.items():
        fn(z0.clone().requires_grad_()).backward()  # warm-up, twice (first-call initialisation, steady state)
        fn(z0.clone().requires_grad_()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _rss_kib("VmRSS") * 1024
        fn(z0.clone().requires_grad_()).backward()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
        out[f"{name}_peak_mib"] = max(peak - base, 0) / 2**20
    return out


def bank_memory_row(capacities: list[int], device: str, out: Path) -> None:
    """Peak memory of a loss step above its inputs against the index's capacity, at fixed N * k (flat: O(N k D))."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    rows = []
    for capacity in capacities:
        cmd = [sys.executable, __file__, "--bank-worker", str(capacity), "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        res = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"status": tail[0][:160]}
        rows.append({"capacity": capacity, **res})
        shown = (
            f"loss {res['loss_peak_mib']:7.1f} MiB; step (search + loss) {res['step_peak_mib']:7.1f} MiB"
            if res["status"] == "ok"
            else res["status"]
        )
        print(f"capacity={capacity:8d} (N={BANK_N}, k={BANK_K}, D={DIM}) {shown}", flush=True)
    info = machine(device)
    out.write_text(json.dumps({"machine": info, "n": BANK_N, "k": BANK_K, "dim": DIM, "rows": rows}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="*")
    parser.add_argument("--curve", type=int, nargs="*", help="extra sizes for the fused memory curve")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap", type=float, default=30.0, help="time cap (s) of one step and of the timed repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0: torch default)")
    parser.add_argument("--mem-cap", type=float, default=4.0, help="GiB of heap per CPU case (0: no limit)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/loss_<device>.json)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--bank-capacities", type=int, nargs="*", help="only the index-capacity memory row (no values: 64k ... 4M)"
    )
    parser.add_argument("--bank-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bank_worker:
        print(json.dumps(bank_worker(args.bank_worker, args.device)))
        return
    if args.bank_capacities is not None:
        RESULTS.mkdir(exist_ok=True)
        tag = "cuda" if args.device.startswith("cuda") else "cpu"
        out = args.out or RESULTS / f"loss_bank_memory_{tag}.json"
        bank_memory_row(args.bank_capacities or BANK_CAPACITIES, args.device, out)
        return
    if args.worker:
        print(
            json.dumps(worker(args.worker[0], int(args.worker[1]), args.device, args.repeats, args.cap, args.mem_cap))
        )
        return
    cuda = args.device.startswith("cuda")
    sizes = args.sizes or ([1024, 4096, 8192, 16384] if cuda else [256, 1024, 2048])
    curve_sizes = args.curve if args.curve is not None else ([2048, 32768] if cuda else [512, 4096, 8192])
    info = machine(args.device)
    info["threads_per_case"] = args.threads or torch.get_num_threads()
    info["step_cap_s"], info["mem_cap_gib"] = args.cap, args.mem_cap
    rows: list[dict[str, Any]] = []
    methods = [m for m in METHODS if cuda or m != "ours_fused_torch"]  # on CPU the fused path is the torch tiles
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(chosen) - set(METHODS))
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        methods = [m for m in methods if m in chosen]
    for n in sizes:
        for method in methods:
            res = run_case(method, n, args.device, args.repeats, args.cap, args.threads, args.mem_cap)
            rows.append({"method": method, "n": n, **res})
            shown = (
                f"{res['wall_ms']:9.1f} ms wall {res['cpu_ms']:9.1f} ms cpu {res['peak_mib']:8.1f} MiB"
                if res["status"] == "ok"
                else res["status"]
            )
            print(f"N={n:6d} {METHODS[method]:40s} {shown}", flush=True)
    for n in curve_sizes:
        if n in sizes:
            continue
        res = run_case("ours_fused", n, args.device, args.repeats, args.cap, args.threads, args.mem_cap)
        rows.append({"method": "ours_fused", "n": n, "curve_only": True, **res})
        print(f"N={n:6d} {METHODS['ours_fused']:40s} {res.get('peak_mib', res['status'])} MiB (curve)", flush=True)

    print()
    print(table(rows, sizes))
    RESULTS.mkdir(exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    out = args.out or RESULTS / f"loss_{tag}.json"
    out.write_text(json.dumps({"machine": info, "dim": DIM, "temperature": TEMPERATURE, "rows": rows}, indent=1))
    curve = sorted((r["n"], r["peak_mib"]) for r in rows if r["method"] == "ours_fused" and r["status"] == "ok")
    if len(curve) >= 2:
        plot(curve, RESULTS / f"loss_memory_{tag}.png" if args.out is None else args.out.with_suffix(".png"))
    print(f"\nwrote {out}")


def table(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    """Markdown table: one row per method, wall ms / peak MiB per N."""
    head = "| method | " + " | ".join(f"N={n}: ms (cpu ms), MiB" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for method, label in METHODS.items():
        if not any(r["method"] == method for r in rows):
            continue  # not run on this device
        cells = []
        for n in sizes:
            r = next((r for r in rows if r["method"] == method and r["n"] == n and not r.get("curve_only")), None)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{r['wall_ms']:.1f} ({r['cpu_ms']:.1f}), {r['peak_mib']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
