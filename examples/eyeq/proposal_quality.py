"""Measure lesion box proposals on the synthetic fundus data, where the true boxes are known.

Trains the pipeline's own cross-entropy grader (``train.py --method ce``, default config; or takes
``--run``), proposes boxes from its Grad-CAM maps on the training images graded >= 1 (as
``python -m examples.common.propose_boxes`` does on real data) for several map stages and sizes,
and scores them against the true boxes per lesion kind (:mod:`examples.common.box_quality`), beside
random boxes of the same sizes and a fixed grid::

    python examples/eyeq/proposal_quality.py --out examples/eyeq/results

Writes ``OUT/proposal_quality.json`` and ``OUT/proposal_quality.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
from mlcl_losses.synthetic import FUNDUS_LESIONS, SyntheticFundus  # noqa: E402

#: (map stage, cam_size as a multiple of the input size, thresholds)
SETTINGS = [
    *[(layer, scale, (0.5,)) for layer in ("layer2", "layer3") for scale in (1, 2, 4)],
    ("layer1", 2, (0.5,)),
    ("layer2", 2, (0.3, 0.5, 0.7)),
]
IOUS = (0.3, 0.5)


def _samples(config: dict[str, Any], seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(image (3, S, S) as the cache stores it, true boxes, kinds)`` of the run's training images graded >= 1."""
    sc = config["data"]["synthetic"]
    size = int(config["data"]["image_size"])
    train_seed, _ = data_draw_seeds(int(sc["seed"]), seed, bool(sc.get("draw_per_seed", True)))
    data = SyntheticFundus(n=int(sc["n_train"]), size=size, seed=train_seed)
    out = []
    for i in range(len(data)):
        s = data[i]
        if s.grade >= 1:
            image = (s.image * 255).round() / 255  # the uint8 cache the pipeline trains on
            out.append((image, s.boxes.float(), s.lesion_kinds))
    return out


def _proposals(trained: Any, samples: list, settings: CamSettings, batch: int = 32) -> list[torch.Tensor]:
    size = int(trained.image_size)
    boxes = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images = resize_batch(torch.stack([s[0] for s in chunk]), settings.cam_size or size)
        found = propose_batch(trained.model, images, [[1]] * len(chunk), [(size, size)] * len(chunk), settings, True)
        boxes += [f.boxes for f in found]
    return boxes


def measure(
    trained: Any, samples: list, layer: str, scale: int, thresholds: tuple[float, ...], draws: int
) -> dict[str, Any]:
    """Quality of one setting and of its two baselines."""
    size = int(trained.image_size)
    settings = CamSettings(
        layer=layer, cam_size=scale * size, thresholds=thresholds, min_size=4.0, max_size=0.4 * size, nms_iou=0.3
    )
    t0 = time.perf_counter()
    proposed = _proposals(trained, samples, settings)
    seconds = time.perf_counter() - t0
    names = list(FUNDUS_LESIONS)
    cam = match_quality([ImageBoxes(s[1], s[2], p) for s, p in zip(samples, proposed, strict=True)], names, IOUS)
    g = torch.Generator().manual_seed(0)
    random_runs = [
        match_quality(
            [ImageBoxes(s[1], s[2], random_like(p, (size, size), g)) for s, p in zip(samples, proposed, strict=True)],
            names,
            IOUS,
        )
        for _ in range(draws)
    ]
    sides = torch.cat([torch.maximum(p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]) for p in proposed] or [torch.zeros(0)])
    cell = float(sides.median()) if len(sides) else size / 4
    grid = grid_boxes((size, size), cell)
    grid_q = match_quality([ImageBoxes(s[1], s[2], grid) for s in samples], names, IOUS)
    return {
        "layer": layer,
        "cam_size": settings.cam_size,
        "thresholds": list(thresholds),
        "seconds": seconds,
        "cam": cam,
        "random": _mean(random_runs),
        "grid": grid_q | {"cell": cell},
    }


def _mean(runs: list[Any]) -> Any:
    """Element-wise mean of nested dicts of numbers (``None`` stays ``None``)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _mean([r[k] for r in runs]) for k in first}
    if first is None:
        return None
    return sum(runs) / len(runs)


def _setting(r: dict[str, Any]) -> str:
    return f"{r['layer']} @ {r['cam_size']} px, t={'/'.join(f'{t:g}' for t in r['thresholds'])}"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown, one table per IoU: recall per kind, precision, boxes per image; CAM vs the baselines."""
    return quality_table(results, FUNDUS_LESIONS, _setting, IOUS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "examples" / "eyeq" / "results")
    p.add_argument("--run", type=Path, default=None, help="an existing ce run (default: train one under OUT)")
    p.add_argument("--seed", type=int, default=0, help="training seed of the run (its data draw)")
    p.add_argument("--draws", type=int, default=10, help="draws of the random baseline")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = args.run
    if run is None:
        from examples.eyeq.train import main as train_main

        run = Path("runs") / "proposal_quality_ce"
        if not (run / "metrics.json").is_file():
            code = train_main(
                ["--method", "ce", "--seed", str(args.seed), "--out", str(run), "--set", "run.tensorboard=false"]
            )
            if code != 0:
                return code
    trained = load_trained(run, expect="eyeq")
    samples = _samples(trained.config, args.seed)
    results = []
    for layer, scale, thresholds in SETTINGS:
        results.append(measure(trained, samples, layer, scale, thresholds, args.draws))
        r = results[-1]
        print(
            f"{_setting(r)}: recall@0.3 {_fmt(r['cam']['recall']['0.3']['all'])} "
            f"(random {_fmt(r['random']['recall']['0.3']['all'])}, grid {_fmt(r['grid']['recall']['0.3']['all'])}), "
            f"precision@0.3 {_fmt(r['cam']['precision']['0.3'])}, {r['cam']['boxes_per_image']:.1f} boxes/image"
        )
    meta = {
        "run": str(run),
        "grader_metrics": json.loads((Path(run) / "metrics.json").read_text())
        if (Path(run) / "metrics.json").is_file()
        else None,
        "n_images": len(samples),
        "image_size": trained.image_size,
        "min_size": 4.0,
        "max_size_fraction": 0.4,
        "nms_iou": 0.3,
        "random_draws": args.draws,
        "machine": "see RESULTS.md",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proposal_quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (args.out / "proposal_quality.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"wrote {args.out / 'proposal_quality.json'} and {args.out / 'proposal_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
