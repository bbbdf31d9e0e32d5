"""Draw synthetic images, their degradations at rising severity, and the four views.

Writes ``docs/_static/generated/views_and_degradations.png``: a synthetic fundus photograph
and a synthetic chest X-ray with their degradations at severities 0.25-1.0, then the image
with its lesion boxes and the views V1a, V1b, V2 of one lesion and V3, V4 of one healthy
patch (the X-ray row uses noise, blur, contrast, grid and jpeg together), and a real fundus
photograph (``skimage.data.retina()``, shipped with scikit-image) with the same degradations, beside
a real grayscale retina detail (``skimage.data.microaneurysms()``, its grey value repeated in R, G
and B). The docs build runs every ``docs/scripts/plot_*.py`` before Sphinx.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from skimage import data as skimage_data  # noqa: E402

from mlcl_losses.degrade import FUNDUS_KINDS, FundusDegradation, degrade_fundus, degrade_xray  # noqa: E402
from mlcl_losses.synthetic import SyntheticChestXray, SyntheticFundus  # noqa: E402
from mlcl_losses.views import FourViewSampler  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "_static" / "generated"
SEVERITIES = (0.25, 0.5, 0.75, 1.0)
XRAY_KINDS = ("noise", "blur", "contrast", "grid", "jpeg")


def _show(ax: plt.Axes, image: torch.Tensor, title: str) -> None:
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _first_with_lesions(data: SyntheticFundus) -> int:
    return next(i for i in range(len(data)) if data[i].grade >= 3)


def main() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    fundus_data = SyntheticFundus(n=50, size=256, seed=0)
    fundus = fundus_data[_first_with_lesions(fundus_data)]
    xray = next(s for s in (SyntheticChestXray(n=50, size=256, seed=0)[i] for i in range(50)) if s.boxes.shape[0] >= 2)

    fig, axes = plt.subplots(4, 6, figsize=(15, 11), constrained_layout=True)
    _show(axes[0, 0], fundus.clean_image, f"fundus, DR grade {fundus.grade}")
    for col, sev in enumerate(SEVERITIES, start=1):
        out = degrade_fundus(fundus.clean_image, sev, FUNDUS_KINDS, fov=fundus.fov, seed=1)
        _show(axes[0, col], out, f"illumination+spot+blur, s={sev}")
    _show(
        axes[0, 5],
        degrade_fundus(fundus.clean_image, 0.8, ("illumination",), fov=fundus.fov, seed=4),
        "illumination only, s=0.8",
    )

    _show(axes[1, 0], xray.clean_image, f"chest X-ray, {len(xray.label_names)} findings")
    for x1, y1, x2, y2 in xray.boxes.tolist():
        axes[1, 0].add_patch(mpatches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
    for col, sev in enumerate(SEVERITIES, start=1):
        out = degrade_xray(xray.clean_image, sev, XRAY_KINDS, seed=1)
        _show(axes[1, col], out, f"5 X-ray kinds, s={sev}")
    _show(
        axes[1, 5],
        degrade_xray(xray.clean_image, 0.8, ("underexposure", "stripes"), seed=2),
        "under-exp.+stripes, s=0.8",
    )

    sampler = FourViewSampler(patch_size=48, n_healthy=1)
    boxes = fundus.boxes
    k = boxes.shape[0]
    big = int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())
    views, tags = sampler(
        fundus.clean_image, boxes, degradation=FundusDegradation(severity=0.8), label=fundus.grade, seed=0
    )
    ax = axes[2, 0]
    _show(ax, fundus.clean_image, "lesion boxes (cyan: shown)")
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        colour = "cyan" if i == big else "lime"
        ax.add_patch(
            mpatches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1.2 if i == big else 0.6)
        )
    # views are ordered [V1a x K, V1b x K, V2 x K, V3 x M, V4 x M]
    picks = (big, k + big, 2 * k + big, 3 * k, 3 * k + 1)
    names = ("V1a lesion, high", "V1b lesion, high", "V2 lesion, low", "V3 healthy, high", "V4 healthy, low")
    for col, (index, name) in enumerate(zip(picks, names, strict=True), start=1):
        _show(axes[2, col], views[index], f"{name} (source {int(tags.source[index])})")
    retina = torch.from_numpy(skimage_data.retina()).permute(2, 0, 1).float() / 255.0  # (3, 1411, 1411)
    retina = F.interpolate(retina[None], size=(384, 384), mode="bilinear", antialias=True)[0].clamp(0, 1)
    _show(axes[3, 0], retina, "real photograph (skimage retina)")
    for col, sev in enumerate(SEVERITIES, start=1):
        _show(axes[3, col], degrade_fundus(retina, sev, FUNDUS_KINDS, seed=1), f"real, all 3 kinds, s={sev}")
    detail = torch.from_numpy(skimage_data.microaneurysms()).float()[None] / 255.0  # (1, 102, 102) grey
    detail = detail.expand(3, -1, -1).contiguous()  # grey repeated in R, G and B
    _show(axes[3, 5], degrade_fundus(detail, 0.8, ("illumination", "blur"), seed=2), "real grey detail, illum.+blur")
    path = OUT / "views_and_degradations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(main())
