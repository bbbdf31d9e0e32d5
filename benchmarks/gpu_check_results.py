"""Reading the GPU check's results back: environment and peers, pytest's JUnit XML, the goal figures.

Used by ``gpu_check.py``; the functions read what the stages wrote (and `nvidia-smi`), and run nothing on the GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PEERS = {"pytorch_metric_learning": "pytorch-metric-learning", "lightly": "lightly", "faiss": None}
GOALS = {"loss_ms": 2.0, "loss_peak_mib": 64.0, "method_share": 0.05, "index_over_matmul": 2.0}


def _version(module: str, dist: str | None) -> str:
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
    except (ImportError, ValueError):  # ValueError: None in sys.modules
        return "not installed"
    for name in [dist] if dist else ["faiss-gpu", "faiss-cpu", "faiss"]:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def environment() -> dict[str, Any]:
    """Versions and the GPU, read without initialising CUDA in this process."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    for dist in ("torch", "triton", "torchvision"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    info["peers"] = {module: _version(module, dist) for module, dist in PEERS.items()}
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        query = "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm"
        done = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True, check=False)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    info["cpu_count"] = os.cpu_count()
    return info


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and failures of a pytest JUnit XML; collection errors for a missing peer are "not installed"."""
    if not path.exists():
        return {"junit": "missing"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"junit": "unreadable"}
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed, not_installed = [], []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is None:
                continue
            text = (node.get("message") or "") + "\n" + (node.text or "")
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            missing = re.search(r"No module named '([\w.]+)'", text)
            if missing and missing.group(1).split(".")[0] in PEERS:
                not_installed.append(f"{name} ({missing.group(1)} not installed)")
            else:
                failed.append(f"{name}: {(node.get('message') or '').strip()[:300]}")
    return {**counts, "failed": failed, "not_installed": not_installed}


def _rows(data: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in data.get("rows", []) if all(r.get(k) == v for k, v in match.items())]


def loss_figures(data: dict[str, Any], n: int) -> dict[str, Any]:
    """Each method at the goal size; the fused loss against the goal (ms, MiB)."""
    by_method = {}
    for r in _rows(data, n=n):
        if r.get("curve_only"):
            continue
        by_method[r["method"]] = (
            {"wall_ms": round(r["wall_ms"], 3), "peak_mib": round(r["peak_mib"], 1)} if r["status"] == "ok" else r
        )
    fused = by_method.get("ours_fused", {})
    out: dict[str, Any] = {"n": n, "methods": by_method}
    if "wall_ms" in fused:
        out["goal"] = {
            "wall_ms": fused["wall_ms"],
            "peak_mib": fused["peak_mib"],
            "met": fused["wall_ms"] <= GOALS["loss_ms"] and fused["peak_mib"] <= GOALS["loss_peak_mib"],
            "target": f"<= {GOALS['loss_ms']} ms and <= {GOALS['loss_peak_mib']} MiB",
        }
    return out


def step_figures(data: dict[str, Any]) -> dict[str, Any]:
    share = data.get("method_share_of_step")
    keys = ("encoder", "step_with_method_ms", "method_fwd_bwd_ms", "step_without_loss_ms", "loss_share_of_step")
    out: dict[str, Any] = {key: data.get(key) for key in keys}
    if share is not None:
        out["goal"] = {"method_share": round(share, 4), "met": share <= GOALS["method_share"], "target": "<= 5 %"}
    return out


def index_figures(data: dict[str, Any], bank: int) -> dict[str, Any]:
    """The fp16 index at k = 256 against the bare fp16 matmul on the goal bank."""
    search = _rows(data, method="index torch fp16", bank=bank, k=256)
    matmul = _rows(data, method="torch matmul only (plain)", dtype="fp16", bank=bank)
    topk = _rows(data, method="torch matmul+topk (plain)", dtype="fp16", bank=bank, k=256)
    out: dict[str, Any] = {"bank": bank, "complete": data.get("complete")}
    for key, rows in (("index_fp16_k256_ms", search), ("matmul_fp16_ms", matmul), ("matmul_topk_fp16_k256_ms", topk)):
        if rows and rows[0].get("median_s") is not None:
            out[key] = round(1e3 * rows[0]["median_s"], 3)
    if "index_fp16_k256_ms" in out and "matmul_fp16_ms" in out:
        ratio = out["index_fp16_k256_ms"] / out["matmul_fp16_ms"]
        out["goal"] = {"over_matmul": round(ratio, 2), "met": ratio <= GOALS["index_over_matmul"], "target": "<= 2x"}
    return out


def short(stage: dict[str, Any]) -> str:
    """One line of figures for the closing table."""
    f = stage.get("figures", {})
    if "tests" in f:
        text = f"{f['tests']} tests, {f['failures']} failed, {f['errors']} errors, {f['skipped']} skipped"
        return text + (f"; not installed: {len(f['not_installed'])}" if f["not_installed"] else "")
    goal = f.get("goal")
    if goal is None:
        return ""
    shown = ", ".join(f"{k} {v}" for k, v in goal.items() if k not in ("met", "target"))
    verdict = {True: "met", False: "NOT met", None: "not evaluated in a dry run"}[goal["met"]]
    return f"{shown} (goal {goal['target']}: {verdict})"
