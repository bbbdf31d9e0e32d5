"""Fused versus reference loss path along one real pre-training run: equal steps, diverging trajectories.

Runs the EyeQ pipeline's CoMCL pre-training (``--config``, one method, one seed) with a *twin*
criterion beside the real one: the same levels, options, self-paced pace and hard-negative index
contents, but the other loss path (``loss_impl: reference`` when the run's is ``fused`` or
``auto``, ``fused`` when it is ``reference``). At every step both see the identical batch, keys and
step count; the twin's loss and its gradient with respect to the embeddings are compared with the
real criterion's (which drives training). So the per-step columns say whether the two paths compute
the same function, and running this twice, with ``--set pretrain.loss_impl=fused`` and ``=reference``,
says how far two runs that differ only in float32 rounding drift apart::

    python examples/eyeq/path_divergence.py --config examples/eyeq/configs/benchmark.yaml \\
        --out runs/path_fused --set pretrain.loss_impl=fused --set run.torch_threads=1
    python examples/eyeq/path_divergence.py ... --out runs/path_reference --set pretrain.loss_impl=reference

Writes ``OUT/steps.json``: per step the driving loss, the twin's loss and the relative L2 difference
of their gradients; the pipeline's own run (metrics, checkpoint) is written in ``OUT/run``. Then::

    python examples/eyeq/path_divergence.py --plot runs/path_fused runs/path_reference --out path_divergence.png

plots both runs' loss per step and the per-step gradient differences, and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.common import pretrain  # noqa: E402
from mlcl_losses import MultiLevelContrastiveLoss  # noqa: E402


class TwinCriterion(nn.Module):
    """The pipeline's criterion (drives training) and its other-path twin, evaluated on the same input."""

    def __init__(self, real: MultiLevelContrastiveLoss, twin: MultiLevelContrastiveLoss) -> None:
        super().__init__()
        self.real, self.twin = real, twin
        self.steps: list[dict[str, float]] = []

    def forward(self, z: Tensor, tags: Any, keys: Tensor | None = None) -> tuple[Tensor, Any]:
        probe = z.detach().clone().requires_grad_(True)
        twin_loss, _ = self.twin(probe, tags, keys=keys)  # enqueues the same keys into the twin's index
        (twin_grad,) = torch.autograd.grad(twin_loss, probe)
        probe = z.detach().clone().requires_grad_(True)
        real_loss, _ = self.real(probe, tags)  # the same call on a detached copy: its gradient
        (real_grad,) = torch.autograd.grad(real_loss, probe)
        loss, stats = self.real(z, tags, keys=keys)  # the call that trains (and enqueues)
        diff = (real_grad.double() - twin_grad.double()).norm() / twin_grad.double().norm().clamp_min(1e-300)
        self.steps.append(
            {"loss": float(loss.detach()), "twin_loss": float(twin_loss.detach()), "grad_rel_diff": float(diff)}
        )
        return loss, stats

    def step(self, n: int = 1) -> None:
        self.real.step(n)
        self.twin.step(n)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # the checkpoint holds the real criterion only
        return self.real.state_dict(*args, **kwargs)


def summary(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, Any]:
    """How two runs' per-step records compare: the paths' agreement within each, the runs' drift apart."""
    n = min(len(a), len(b))
    drift = [abs(a[i]["loss"] - b[i]["loss"]) for i in range(n)]
    first = next((i for i, d in enumerate(drift) if d > 1e-3 * abs(b[i]["loss"])), None)
    return {
        "steps": n,
        "max_grad_rel_diff": max(s["grad_rel_diff"] for s in a[:n] + b[:n]),
        "max_loss_rel_diff": max(abs(s["loss"] - s["twin_loss"]) / abs(s["twin_loss"]) for s in a[:n] + b[:n]),
        "first_step_runs_differ_by_0.1pct": first,
        "mean_abs_loss_gap_by_tenth": [
            sum(drift[i * n // 10 : (i + 1) * n // 10]) / max(1, len(drift[i * n // 10 : (i + 1) * n // 10]))
            for i in range(10)
        ],
    }


def _steps(folder: Path) -> list[dict[str, float]]:
    """The per-step records of a run of this script; ValueError naming the folder when it has none."""
    if not folder.exists():
        raise ValueError(f"--plot: expected a run folder of this script, but {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"--plot: expected a run folder of this script, but {folder} is not a directory")
    path = folder / "steps.json"
    if not path.is_file():
        raise ValueError(f"--plot: expected a run folder of this script, but {folder} has no steps.json")
    try:
        steps = json.loads(path.read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--plot: {path} is not the steps.json of a run of this script") from None
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"--plot: {path} holds no steps")
    return steps


def plot(dir_a: Path, dir_b: Path, png: Path) -> dict[str, Any]:
    """Plot two runs' loss per step and their gradient differences; returns :func:`summary`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = (_steps(d) for d in (dir_a, dir_b))
    if png.is_dir():
        raise ValueError(f"--out: expected the PNG file to write, but {png} is a directory")
    for part in png.parents:
        if part.exists() and not part.is_dir():
            raise ValueError(f"--out: expected a PNG file in a directory, but {part} is a file")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.5), dpi=120, sharex=True)
    for steps, name in ((a, dir_a.name), (b, dir_b.name)):
        top.plot([s["loss"] for s in steps], linewidth=0.8, label=f"{name}: loss that trains")
        bottom.semilogy([s["grad_rel_diff"] for s in steps], linewidth=0.8, label=name)
    top.set_ylabel("CoMCL loss")
    top.legend(fontsize=7)
    top.set_title("two runs that differ only in the loss path (float32 rounding)")
    bottom.set_ylabel("|g_run - g_twin| / |g_twin| (other path)")
    bottom.set_xlabel("pre-training step")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return summary(a, b)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python examples/eyeq/path_divergence.py", description=__doc__.split("\n")[0])
    p.add_argument("--plot", type=Path, nargs=2, default=None, metavar="DIR", help="plot two finished runs (to --out)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="a new folder (with --plot: the PNG file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.plot is not None:
        try:
            print(json.dumps(plot(args.plot[0], args.plot[1], args.out), indent=1))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.config is None:
        print("error: --config is required to run (or --plot DIR DIR)", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"error: --out {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    from examples.eyeq.train import main as train_main

    twins: list[TwinCriterion] = []
    build = pretrain.build_criterion

    def build_twin(method: str, cfg: Any, dim: int, total_steps: int, device: torch.device) -> nn.Module:
        real = build(method, cfg, dim, total_steps, device)
        other = "fused" if cfg.loss_impl == "reference" else "reference"  # the twin takes the other path
        ref_cfg = dataclasses.replace(cfg, loss_impl=other)
        twins.append(TwinCriterion(real, build(method, ref_cfg, dim, total_steps, device)))
        return twins[-1]

    pretrain.build_criterion = build_twin  # type: ignore[assignment]  # a stand-in: same calls, not the class
    try:
        sets = [x for s in args.overrides for x in ("--set", s)]
        rc = train_main(
            [
                "--config",
                str(args.config),
                "--method",
                "comcl",
                "--seed",
                str(args.seed),
                "--out",
                str(args.out / "run"),
                *sets,
            ]
        )
    finally:
        pretrain.build_criterion = build
    if rc != 0:
        return rc  # the pipeline printed why
    steps = twins[-1].steps if twins else []
    (args.out / "steps.json").write_text(
        json.dumps({"argv": sys.argv[1:], "steps": steps}, indent=1) + "\n", encoding="utf-8"
    )
    if steps:
        worst = max(s["grad_rel_diff"] for s in steps)
        gap = max(abs(s["loss"] - s["twin_loss"]) / abs(s["twin_loss"]) for s in steps)
        print(f"{len(steps)} steps: largest relative loss difference {gap:.1e}, gradient {worst:.1e}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
