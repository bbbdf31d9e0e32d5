"""Draw the overview figure: the four views of a synthetic fundus patch and the three CoMCL levels.

Run by docs/conf.py on every build; writes docs/_static/generated/overview_levels.png.
The patches are real outputs of the library (SyntheticFundus, FundusDegradation, FourViewSampler),
and the arrows are read off ``comcl_levels()`` and ``level_masks``, so the figure follows the code.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from mlcl_losses import FourViewSampler, Kind, Quality, comcl_levels, level_masks  # noqa: E402
from mlcl_losses.degrade import FundusDegradation  # noqa: E402
from mlcl_losses.synthetic import SyntheticFundus  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "_static" / "generated" / "overview_levels.png"
LEVEL_COLOURS = {"lesion": "tab:red", "quality": "tab:orange", "healthy": "tab:blue"}


def _views() -> dict[str, torch.Tensor]:
    """One lesion patch (V1a, V1b, V2) and one healthy patch (V3, V4) of a mild-DR synthetic image."""
    data = SyntheticFundus(n=64, size=256, seed=3)
    sample = next(s for s in (data[i] for i in range(len(data))) if s.grade in (1, 2) and len(s.boxes) > 0)
    sampler = FourViewSampler(patch_size=64, n_healthy=1)
    out = sampler(
        sample.clean_image,
        sample.boxes,
        degradation=FundusDegradation(severity=0.8, kinds=("illumination", "spot", "blur")),
        seed=0,
    )
    k = len(sample.boxes)  # views come grouped: V1a x K, V1b x K, V2 x K, V3 x M, V4 x M (M = 1)
    picks = {"V1a": 0, "V1b": k, "V2": 2 * k, "V3": 3 * k, "V4": 3 * k + 1}
    return {name: out.views[i] for name, i in picks.items()}


def main() -> None:
    views = _views()
    # Positions of the views on the canvas (x, y), lesion row on top, quality columns.
    pos = {"V1a": (0.0, 1.15), "V1b": (0.0, 0.3), "V2": (1.6, 0.72), "V3": (0.0, -0.85), "V4": (1.6, -0.85)}
    caption = {
        "V1a": "V1a: lesion, high",
        "V1b": "V1b: lesion, high",
        "V2": "V2: lesion, low",
        "V3": "V3: healthy, high",
        "V4": "V4: healthy, low",
    }
    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    ax.set_xlim(-0.6, 4.6)
    ax.set_ylim(-1.45, 1.6)
    ax.axis("off")
    size = 0.42
    for name, (x, y) in pos.items():
        img = views[name].permute(1, 2, 0).clamp(0, 1).numpy()
        ax.imshow(img, extent=(x - size / 2, x + size / 2, y - size / 2, y + size / 2), zorder=2)
        ax.text(x, y - size / 2 - 0.07, caption[name], ha="center", va="top", fontsize=8.5)

    # Read the arrows off the levels: tags of the five views in the order above.
    from mlcl_losses import ViewTags

    tags = ViewTags(
        kind=[Kind.LESION] * 3 + [Kind.HEALTHY] * 2,
        quality=[Quality.HIGH, Quality.HIGH, Quality.LOW, Quality.HIGH, Quality.LOW],
        source=[0, 0, 0, 1, 1],
    )
    order = list(pos)
    levels = comcl_levels()
    for level, masks in zip(levels, level_masks(tags, levels), strict=True):
        colour = LEVEL_COLOURS[level.name]
        for i, j in masks.positives.nonzero().tolist():
            _arrow(ax, pos[order[i]], pos[order[j]], colour, "-", size)
        for i, j in masks.negatives.nonzero().tolist():
            _arrow(ax, pos[order[i]], pos[order[j]], colour, (0, (3, 2)), size, rad=0.25)

    legend_x = 2.5
    ax.text(legend_x, 1.45, "CoMCL levels (comcl_levels())", fontsize=10, weight="bold", va="top")
    rows = [
        ("lesion", "anchors V1 -> positive V1 (other view), negatives V3, V4"),
        ("quality", "anchors V2 -> positives V1, negatives V3, V4"),
        ("healthy", "anchors V4 -> positive V3, negatives V1, V2"),
    ]
    for k, (name, text) in enumerate(rows):
        y = 1.2 - 0.3 * k
        ax.plot([legend_x, legend_x + 0.25], [y, y], color=LEVEL_COLOURS[name], lw=2)
        ax.text(legend_x + 0.32, y, f"{name}: {text}", fontsize=8, va="center", wrap=True)
    ax.plot([legend_x, legend_x + 0.25], [0.15, 0.15], color="0.3", lw=1.5)
    ax.text(legend_x + 0.32, 0.15, "solid: positive pair (pulled together)", fontsize=8, va="center")
    ax.plot([legend_x, legend_x + 0.25], [-0.05, -0.05], color="0.3", lw=1.5, ls=(0, (3, 2)))
    ax.text(legend_x + 0.32, -0.05, "dashed: negative pair (pushed apart)", fontsize=8, va="center")
    ax.text(
        legend_x,
        -0.45,
        "Low-quality views (V2, V4) are cut from a degraded copy\n"
        "of the same image (illumination, spots, blur, after\n"
        "Shen et al. 2020); arrows point from anchor to partner.",
        fontsize=8,
        va="top",
    )
    ax.set_title("Four views and three levels of CoMCL (synthetic fundus patch)", fontsize=11)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _arrow(ax: plt.Axes, a: tuple[float, float], b: tuple[float, float], colour: str, style, size: float, rad=0.12):
    arrow = FancyArrowPatch(
        a,
        b,
        arrowstyle="-|>",
        mutation_scale=10,
        color=colour,
        lw=1.3,
        linestyle=style,
        connectionstyle=f"arc3,rad={rad}",
        shrinkA=size * 60,
        shrinkB=size * 60,
        zorder=1,
        alpha=0.85,
    )
    ax.add_patch(arrow)


if __name__ == "__main__":
    main()
