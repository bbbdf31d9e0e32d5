"""Benchmark of the hard-negative index: every backend against faiss IndexFlatIP and plain matmul + topk.

Q queries of dim 128 against banks of several sizes, k = 64 and 256, float32 and float16 banks, a
tag-filtered search, IVF recall, and the per-step update cost (add of 256 entries to a full bank).
Prints a table and writes JSON to benchmarks/results/index_<device>.json.

    python benchmarks/bench_index.py            # CPU: banks 16k, 131k, 1M; CUDA: 65k, 1M, 4M
    python benchmarks/bench_index.py --quick    # small sizes, a smoke run
    python benchmarks/bench_index.py --paired   # CPU goal only: index vs IndexFlatIP, calls alternated
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hardware import cpu_model
from mlcl_losses.index import HardNegativeIndex, faiss_available, faiss_gpu_available
from mlcl_losses.levels import Select
from mlcl_losses.tags import ViewTags

DIM = 128
PLAIN_LIMIT_BYTES = 4 << 30  # the plain baseline materialises Q x M similarities: on CPU skip it above 4 GiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int, budget_s: float = 20.0) -> dict[str, Any]:
    """Median / min seconds of ``fn`` after one warm-up; fewer repeats when one call is slow."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if first > budget_s:
        times = [first]  # too slow to repeat: the warm-up call is the measurement
    else:
        times = []
        for _ in range(max(1, min(repeat, int(budget_s // max(first, 1e-9))))):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = cpu_model()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if faiss_available():
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus()
        info["faiss_blas_threshold"] = faiss.cvar.distance_compute_blas_threshold
    else:
        info["faiss"] = "not installed"
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def clustered(n: int, gen: torch.Generator, centers: torch.Tensor) -> torch.Tensor:
    """Embeddings around random centres (IVF is meaningless on isotropic noise), L2-normalised."""
    x = centers[torch.randint(0, centers.shape[0], (n,), generator=gen)]
    x = x + 0.5 * torch.randn(n, DIM, generator=gen) / math.sqrt(DIM)
    return torch.nn.functional.normalize(x, dim=1)


def random_tags(n: int, gen: torch.Generator) -> ViewTags:
    return ViewTags(
        kind=torch.randint(0, 2, (n,), generator=gen),
        quality=torch.randint(0, 2, (n,), generator=gen),
        source=torch.randint(0, 1 << 20, (n,), generator=gen),
    )


def fill(index: HardNegativeIndex, bank: torch.Tensor, tags: ViewTags, step: int = 1 << 18) -> None:
    for start in range(0, bank.shape[0], step):
        index.add(bank[start : start + step].to(index.embeddings.device), tags[start : start + step])


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found.cpu(), exact.cpu(), strict=True))
    return hits / exact.numel()


def paired(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, Any]]:
    """Time several calls in alternation (A, B, A, B, ...) after one warm-up each.

    On a shared machine the load drifts over seconds; alternating puts every method under the
    same drift, so the ratio is fairer than timing one method's repeats after the other's.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "n": len(ts), "all_s": ts}
        for name, ts in times.items()
    }


def run_paired(args: argparse.Namespace) -> dict[str, Any]:
    """The CPU goal alone: the index (auto backend) against raw IndexFlatIP, calls alternated."""
    import faiss
    import numpy as np

    sizes, n_queries = ([4096, 16384], 512) if args.quick else ([16384, 131072, 1 << 20], 4096)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4096, DIM, generator=gen)
    queries = clustered(n_queries, gen, centers)
    xq = np.ascontiguousarray(queries.numpy())
    info = machine_info(torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    for size in sizes:
        bank = clustered(size, gen, centers)
        index = HardNegativeIndex(DIM, size, backend="auto")
        fill(index, bank, random_tags(size, gen))
        raw = faiss.IndexFlatIP(DIM)
        raw.add(bank.numpy())
        rounds = args.repeat if size < (1 << 20) else max(2, args.repeat - 1)
        for k in (64, 256):
            fns = {
                f"index auto ({index.backend_name})": lambda k=k, index=index: index.search(queries, k),
                "faiss IndexFlatIP (raw)": lambda k=k, raw=raw: raw.search(xq, k),
            }
            for name, res in paired(fns, rounds).items():
                rows.append({"method": name, "dtype": "fp32", "bank": size, "k": k, "queries": n_queries, **res})
                print(f"{name:34s} bank={size:>8d} k={k:>4d} {res['median_s'] * 1e3:10.1f} ms (paired)", flush=True)
    return {"machine": info, "queries": n_queries, "dim": DIM, "rows": rows, "complete": True, "paired": True}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.quick:
        sizes, n_queries = ([4096, 16384], 512)
    elif device.type == "cuda":
        sizes, n_queries = ([65536, 1 << 20, 1 << 22], 4096)
    else:
        sizes, n_queries = ([16384, 131072, 1 << 20], 4096)
    sizes, n_queries = args.sizes or sizes, args.queries or n_queries
    ks = [64, 256]
    # on CUDA the plain baseline may use a quarter of the free device memory (an H200: the 1M bank, not 4M)
    plain_limit = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else PLAIN_LIMIT_BYTES
    has_faiss = faiss_available()
    gpu_faiss = faiss_gpu_available() and device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4096, DIM, generator=gen)
    queries = clustered(n_queries, gen, centers)
    q_dev = queries.to(device)
    q_tags = random_tags(n_queries, gen)
    rows: list[dict[str, Any]] = []
    info = machine_info(device)

    def record(method: str, dtype: str, size: int, k: int, result: dict[str, Any], **extra: Any) -> None:
        row = {"method": method, "dtype": dtype, "bank": size, "k": k, "queries": n_queries, **result, **extra}
        rows.append(row)
        ms = row.get("median_s")
        shown = "skipped" if ms is None else f"{ms * 1e3:10.1f} ms"
        more = " ".join(f"{a}={b}" for a, b in extra.items())
        print(f"{method:34s} {dtype:5s} bank={size:>8d} k={k:>4d} {shown} {more}", flush=True)
        if args.out_path is not None:  # written row by row, so a long run that is cut short leaves its figures
            partial = {"machine": info, "queries": n_queries, "dim": DIM, "rows": rows, "complete": False}
            args.out_path.write_text(json.dumps(partial, indent=1))

    for size in sizes:
        bank = clustered(size, gen, centers)
        tags = random_tags(size, gen)
        repeat = args.repeat
        indexes: dict[str, HardNegativeIndex] = {}
        auto = HardNegativeIndex(DIM, size, device=device, backend="auto")
        fill(auto, bank, tags)
        indexes[f"index auto ({auto.backend_name})"] = auto
        if auto.backend_name != "torch":
            torch_index = HardNegativeIndex(DIM, size, device=device, backend="torch")
            torch_index.load_state_dict(auto.state_dict())
            indexes["index torch"] = torch_index
        if device.type == "cuda" or size <= args.max_cpu_fp16:  # on CPU fp16 is only a storage format
            half = HardNegativeIndex(DIM, size, device=device, backend="torch", dtype=torch.float16)
            fill(half, bank, tags)
            indexes["index torch fp16"] = half
        if gpu_faiss:
            half_faiss = HardNegativeIndex(DIM, size, device=device, backend="faiss", dtype=torch.float16)
            fill(half_faiss, bank, tags)
            indexes["index faiss-gpu fp16"] = half_faiss
        ivf = None
        if has_faiss and device.type == "cpu":
            nlist = max(16, int(2 ** round(math.log2(math.sqrt(size)))))
            ivf = HardNegativeIndex(DIM, size, backend="faiss", ivf_nlist=nlist, nprobe=args.nprobe)
            ivf.load_state_dict(auto.state_dict())
            t0 = time.perf_counter()
            ivf.search(queries[:1], 1)  # trains and fills the IVF index
            build_s = time.perf_counter() - t0
            indexes[f"index faiss IVF{nlist} nprobe={args.nprobe}"] = ivf
        raw = None
        if has_faiss and device.type == "cpu":
            import faiss

            raw = faiss.IndexFlatIP(DIM)
            raw.add(bank.numpy())

        for k in ks:
            exact_idx = None
            for name, index in indexes.items():
                dtype = "fp16" if index.embeddings.dtype == torch.float16 else "fp32"
                out: dict[str, Any] = {}

                def search(index: HardNegativeIndex = index, k: int = k, out: dict[str, Any] = out) -> None:
                    out["r"] = index.search(q_dev, k)

                res = timed(search, device, repeat)
                extra: dict[str, Any] = {}
                if exact_idx is None:
                    exact_idx = out["r"].indices
                elif "IVF" in name:
                    extra["recall"] = round(recall(out["r"].indices, exact_idx), 4)
                    extra["build_s"] = round(build_s, 2)
                record(name, dtype, size, k, res, **extra)
            if raw is not None:
                import numpy as np

                xq = np.ascontiguousarray(queries.numpy())
                record(
                    "faiss IndexFlatIP (raw)",
                    "fp32",
                    size,
                    k,
                    timed(lambda raw=raw, xq=xq, k=k: raw.search(xq, k), device, repeat),
                )
            if q_dev.shape[0] * size * 4 <= plain_limit:
                bank_dev = bank.to(device)
                record(
                    "torch matmul+topk (plain)",
                    "fp32",
                    size,
                    k,
                    timed(lambda b=bank_dev, k=k: torch.topk(q_dev @ b.T, k, dim=1), device, repeat),
                )
                if device.type == "cuda":
                    bh, qh = bank_dev.half(), q_dev.half()
                    record(
                        "torch matmul+topk (plain)",
                        "fp16",
                        size,
                        k,
                        timed(lambda qh=qh, bh=bh, k=k: torch.topk(qh @ bh.T, k), device, repeat),
                    )
                    if k == ks[0]:  # the bare product, the floor of any exact search
                        record(
                            "torch matmul only (plain)",
                            "fp16",
                            size,
                            0,
                            timed(lambda qh=qh, bh=bh: qh @ bh.T, device, repeat),
                        )
            else:
                gib = q_dev.shape[0] * size * 4 / 2**30
                record("torch matmul+topk (plain)", "fp32", size, k, {"median_s": None}, note=f"needs {gib:.0f} GiB")
        # filtered search through the default path: healthy only, never the query's source
        filt = {"negatives": Select(kind=0), "exclude_source": q_tags.source.to(device)}
        for name, index in list(indexes.items())[:2]:
            record(
                name + " +filter",
                "fp32",
                size,
                64,
                timed(lambda index=index, filt=filt: index.search(q_dev, 64, **filt), device, repeat),
            )
        # per-step update cost: add 256 entries to the full bank
        new = clustered(256, gen, centers).to(device)
        new_tags = random_tags(256, gen).to(device)
        for name, index in indexes.items():
            dtype = "fp16" if index.embeddings.dtype == torch.float16 else "fp32"
            res = timed(lambda index=index, x=new, t=new_tags: index.add(x, t), device, max(repeat, 5))
            record(name + " add(256)", dtype, size, 0, res)
        del indexes, auto, ivf, raw
    return {"machine": info, "queries": n_queries, "dim": DIM, "rows": rows, "complete": True}


def markdown(result: dict[str, Any]) -> str:
    """The rows of a result JSON as a Markdown table (median ms; recall for IVF)."""
    lines = ["| method | bank dtype | bank | k | median ms | runs | note |", "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ms = "skipped" if r.get("median_s") is None else f"{r['median_s'] * 1e3:.1f}"
        note = ", ".join(f"{key} {r[key]}" for key in ("recall", "build_s", "note") if key in r)
        k = "-" if r["k"] == 0 else r["k"]
        lines.append(f"| {r['method']} | {r['dtype']} | {r['bank']} | {k} | {ms} | {r.get('n', '')} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="bank sizes, in this order")
    parser.add_argument("--queries", type=int, default=None, help="queries per search (default 4096; --quick 512)")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-cpu-fp16", type=int, default=131072, help="largest CPU bank timed in fp16")
    parser.add_argument("--table", type=Path, default=None, help="print a result JSON as a Markdown table and exit")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="CPU only: just the index against raw IndexFlatIP, calls alternated (the CPU goal)",
    )
    args = parser.parse_args()
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return
    device = torch.device(args.device)
    print(json.dumps(machine_info(device)))
    name = f"index_{device.type}{'_paired' if args.paired else ''}{'_quick' if args.quick else ''}.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    args.out_path = out
    result = run_paired(args) if args.paired else run(args)
    result["machine"]["loadavg_at_end"] = machine_info(device).get("loadavg_at_start")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
