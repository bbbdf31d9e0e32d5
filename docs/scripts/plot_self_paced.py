"""Draw the self-paced weight of each regulariser against hardness at several points of the pace.

Writes ``docs/_static/generated/self_paced_weights.png`` (a 2x2 figure, one panel per
regulariser). The docs build runs every ``docs/scripts/plot_*.py`` before Sphinx.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mlcl_losses.self_paced import self_paced_weights  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "_static" / "generated"
PACES = (0.2, 0.4, 0.6, 0.8, 1.0)
ZETA = 0.1
MIXTURE_C = 1.0
PANELS = {
    "hard": r"hard (Kumar 2010): $v = 1[h < \lambda]$",
    "linear": r"linear (Jiang 2014): $v = \max(0,\ 1 - h/\lambda)$",
    "log": rf"log (Jiang 2014), $\zeta = {ZETA}$",
    "mixture": rf"mixture (Zhao 2015), $c = {MIXTURE_C:g}$",
}


def main() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    h = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)  # cosine-similarity hardness, clamped to [0, 1]
    colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.9, len(PACES)).tolist())
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey=True, constrained_layout=True)
    for ax, (reg, title) in zip(axes.flat, PANELS.items(), strict=True):
        for lam, colour in zip(PACES, colours, strict=True):
            w = self_paced_weights(h, lam, reg, zeta=ZETA, mixture_c=MIXTURE_C)
            # the hard regulariser jumps at h = lambda: draw it as a step, not a slope
            style = "steps-post" if reg == "hard" else "default"
            ax.plot(h, w, color=colour, lw=2, label=rf"$\lambda = {lam:g}$", drawstyle=style)
        ax.set_title(title, fontsize=11)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(r"hardness $h$ (anchor–negative cosine similarity)")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"weight $v^*(h, \lambda)$")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="pace")
    fig.suptitle("Self-paced weights: harder negatives are admitted as the pace $\\lambda$ grows")
    path = OUT / "self_paced_weights.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
