"""Measure lesion box proposals on the synthetic chest X-rays, where the finding boxes are known.

Trains the pipeline's own BCE model (``train.py --method ce``, default config; or takes ``--run``),
computes each positive label's Grad-CAM map on its training images (as
``python -m examples.common.propose_boxes`` does on real data) and scores the boxes against the true
boxes of the same label (:mod:`examples.common.box_quality`; a box counts only for its own label),
beside random boxes of the same sizes and labels and a fixed grid (which claims every label)::

    python examples/chestxray/proposal_quality.py --out examples/chestxray/results

Only labels the synthetic generator localises get maps (the others have no true box to find).
Writes ``OUT/proposal_quality.json`` and ``OUT/proposal_quality.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from examples.common.box_quality import (  # noqa: E402
    ImageBoxes,
    grid_boxes,
    match_quality,
    quality_table,
    random_like,
)
from examples.common.cam_boxes import CamSettings, propose_batch, resize_batch  # noqa: E402
from examples.common.protocol import data_draw_seeds  # noqa: E402
from examples.common.trained import load_trained  # noqa: E402
from mlcl_losses.synthetic import CHESTXRAY14_LABELS, SyntheticChestXray  # noqa: E402

SETTINGS = [("layer1", 2), ("layer2", 2), ("layer3", 2), ("layer2", 4)]
IOUS = (0.3, 0.5)


def _samples(config: dict[str, Any], seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
    """``(3-channel image as cached, true boxes, their labels, positive labels)`` of training images with a finding."""
    sc = config["data"]["synthetic"]
    size = int(config["data"]["image_size"])
    train_seed, _ = data_draw_seeds(int(sc["seed"]), seed, bool(sc.get("draw_per_seed", True)))
    data = SyntheticChestXray(n=int(sc["n_train"]), size=size, seed=train_seed)
    samples = [data[i] for i in range(len(data))]
    localised = {int(k) for s in samples for k in s.box_labels.tolist()}
    out = []
    for s in samples:
        targets = [k for k in torch.nonzero(s.labels).flatten().tolist() if k in localised]
        if targets:
            image = ((s.image * 255).round() / 255).expand(3, -1, -1)  # grey repeated in R, G and B
            out.append((image, s.boxes.float().reshape(-1, 4), s.box_labels.long(), targets))
    return out


def measure(trained: Any, samples: list, layer: str, scale: int, draws: int) -> dict[str, Any]:
    size = int(trained.image_size)
    settings = CamSettings(layer=layer, cam_size=scale * size, min_size=4.0, max_size=0.6 * size)
    found = []
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        images = resize_batch(torch.stack([s[0] for s in chunk]), scale * size)
        found += propose_batch(
            trained.model, images, [s[3] for s in chunk], [(size, size)] * len(chunk), settings, False
        )
    names = list(CHESTXRAY14_LABELS)
    cam = match_quality(
        [ImageBoxes(s[1], s[2], f.boxes, f.targets) for s, f in zip(samples, found, strict=True)], names, IOUS
    )
    g = torch.Generator().manual_seed(0)
    rand = [
        match_quality(
            [
                ImageBoxes(s[1], s[2], random_like(f.boxes, (size, size), g), f.targets)
                for s, f in zip(samples, found, strict=True)
            ],
            names,
            IOUS,
        )
        for _ in range(draws)
    ]
    sides = torch.cat([torch.maximum(f.boxes[:, 2] - f.boxes[:, 0], f.boxes[:, 3] - f.boxes[:, 1]) for f in found])
    cell = float(sides.median()) if len(sides) else size / 4
    grid = match_quality([ImageBoxes(s[1], s[2], grid_boxes((size, size), cell)) for s in samples], names, IOUS)
    return {
        "layer": layer,
        "cam_size": settings.cam_size,
        "cam": cam,
        "random": _mean(rand),
        "grid": grid | {"cell": cell},
    }


def _mean(runs: list[Any]) -> Any:
    if isinstance(runs[0], dict):
        return {k: _mean([r[k] for r in runs]) for k in runs[0]}
    return None if runs[0] is None else sum(runs) / len(runs)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown, one table per IoU: recall per label, precision, boxes per image; CAM vs the baselines."""
    return quality_table(results, CHESTXRAY14_LABELS, lambda r: f"{r['layer']} @ {r['cam_size']} px", IOUS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "examples" / "chestxray" / "results")
    p.add_argument("--run", type=Path, default=None, help="an existing ce run (default: train one)")
    p.add_argument("--seed", type=int, default=0, help="training seed of the run (its data draw)")
    p.add_argument("--draws", type=int, default=10, help="draws of the random baseline")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = args.run
    if run is None:
        from examples.chestxray.train import main as train_main

        run = Path("runs") / "chestxray_proposal_quality_ce"
        if not (run / "metrics.json").is_file():
            extra = ["--set", "run.tensorboard=false", "--set", "run.torch_threads=1"]
            code = train_main(["--method", "ce", "--seed", str(args.seed), "--out", str(run), *extra])
            if code != 0:
                return code
    trained = load_trained(run, expect="chestxray")
    samples = _samples(trained.config, args.seed)
    results = []
    for layer, scale in SETTINGS:
        r = measure(trained, samples, layer, scale, args.draws)
        results.append(r)
        print(
            f"{layer} @ {r['cam_size']} px: recall@0.3 {_fmt(r['cam']['recall']['0.3']['all'])} "
            f"(random {_fmt(r['random']['recall']['0.3']['all'])}, grid {_fmt(r['grid']['recall']['0.3']['all'])}), "
            f"precision@0.3 {_fmt(r['cam']['precision']['0.3'])}, {r['cam']['boxes_per_image']:.1f} boxes/image"
        )
    metrics = json.loads((Path(run) / "metrics.json").read_text()) if (Path(run) / "metrics.json").is_file() else {}
    meta = {"run": str(run), "grader_mean_auc": metrics.get("mean_auc"), "n_images": len(samples), "draws": args.draws}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proposal_quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (args.out / "proposal_quality.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
