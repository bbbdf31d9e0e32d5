"""CoMCL pre-trained on proposed, true or random lesion boxes: the downstream effect of the box source.

For each repeat (training seed) on the synthetic fundus data (default config, its own data draw):

1. the pipeline's cross-entropy grader (``--method ce``);
2. Grad-CAM box proposals on its training images graded >= 1 (the defaults of
   ``python -m examples.common.propose_boxes``: ``layer1`` at twice the input size);
3. random boxes: the proposals' boxes (same count and sizes) at uniformly random places;
4. CoMCL (full) pre-training and fine-tuning with the true (rendered) boxes, the proposed boxes and
   the random boxes (``data.synthetic.boxes_json``).

Reports kappa overall and per quality, and paired differences with 95 % t-intervals over the repeats
(:mod:`examples.common.paired`)::

    python examples/eyeq/box_source_comparison.py --seeds 3 --out examples/eyeq/results

Runs go to ``runs/box_sources/`` (finished ones are reused); writes ``OUT/box_sources.json`` and
``OUT/box_sources.md``.
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

from examples.common.box_quality import random_like  # noqa: E402
from examples.common.boxes import SplitBoxes, write_boxes_json  # noqa: E402
from examples.common.cam_boxes import CamSettings, propose_batch, resize_batch  # noqa: E402
from examples.common.paired import paired_differences, paired_table  # noqa: E402
from examples.common.protocol import data_draw_seeds  # noqa: E402
from examples.common.trained import load_trained  # noqa: E402
from examples.eyeq.train import main as train_main  # noqa: E402
from mlcl_losses.synthetic import SyntheticFundus  # noqa: E402

SOURCES = ("true", "proposed", "random")
THREADS: list[str] = []  # e.g. ["--set", "run.torch_threads=1"] (--threads)
GROUPS = ("good", "usable", "reject")


def _run(out: Path, *args: str) -> dict[str, Any]:
    if not (out / "metrics.json").is_file():
        code = train_main(["--out", str(out), "--set", "run.tensorboard=false", *THREADS, *args])
        if code != 0:
            raise RuntimeError(f"training run {out} failed with exit status {code}")
    return json.loads((out / "metrics.json").read_text())


def _box_files(run: Path, seed: int, folder: Path) -> dict[str, Path]:
    """Proposed and random box JSONs for the training draw of ``seed`` (keys ``"<data seed>/<index>"``)."""
    trained = load_trained(run, expect="eyeq")
    sc = trained.config["data"]["synthetic"]
    size = trained.image_size
    train_seed, _ = data_draw_seeds(int(sc["seed"]), seed, bool(sc.get("draw_per_seed", True)))
    data = SyntheticFundus(n=int(sc["n_train"]), size=size, seed=train_seed)
    settings = CamSettings(cam_size=2 * size, min_size=4.0, max_size=0.4 * size)
    proposed, randomised = SplitBoxes(), SplitBoxes()
    g = torch.Generator().manual_seed(seed)
    indices = [i for i in range(len(data)) if data[i].grade >= 1]
    for start in range(0, len(indices), 32):
        chunk = indices[start : start + 32]
        images = resize_batch(torch.stack([(data[i].image * 255).round() / 255 for i in chunk]), 2 * size)
        found = propose_batch(trained.model, images, [[1]] * len(chunk), [(size, size)] * len(chunk), settings, True)
        for i, f in zip(chunk, found, strict=True):
            if len(f.boxes):
                key = f"{train_seed}/{i}"
                proposed.unhealthy[key] = [tuple(b) for b in f.boxes.tolist()]
                proposed.scores[key] = f.scores.tolist()
                randomised.unhealthy[key] = [tuple(b) for b in random_like(f.boxes, (size, size), g).tolist()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"proposed": folder / f"proposed_s{seed}.json", "random": folder / f"random_s{seed}.json"}
    write_boxes_json({"train": proposed}, paths["proposed"])
    write_boxes_json({"train": randomised}, paths["random"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "examples" / "eyeq" / "results")
    p.add_argument("--runs", type=Path, default=Path("runs") / "box_sources")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run (run.torch_threads)")
    args = p.parse_args(argv)
    if args.threads is not None:
        THREADS[:] = ["--set", f"run.torch_threads={args.threads}"]
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    metrics: dict[str, list[dict[str, Any]]] = {s: [] for s in SOURCES}
    for seed in range(args.seeds):
        ce = args.runs / f"ce_s{seed}"
        _run(ce, "--method", "ce", "--seed", str(seed))
        files = _box_files(ce, seed, args.runs / "boxes")
        for source in SOURCES:
            extra = [] if source == "true" else ["--set", f"data.synthetic.boxes_json={files[source]}"]
            m = _run(args.runs / f"{source}_s{seed}", "--method", "comcl", "--seed", str(seed), *extra)
            metrics[source].append(m)
            print(f"seed {seed} {source}: kappa {m['kappa']:.3f}")
    pairs = [("proposed", "true"), ("random", "true"), ("proposed", "random")]
    paired = paired_differences(metrics, GROUPS, pairs)
    summary = {
        s: {q: [m[q] if q == "kappa" else m["per_quality"][q]["kappa"] for m in metrics[s]] for q in ("kappa", *GROUPS)}
        for s in SOURCES
    }
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"seeds": args.seeds, "kappa": summary, "paired": paired, "wall_s": time.perf_counter() - start}
    (args.out / "box_sources.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| boxes | kappa | kappa good | kappa usable | kappa reject |", "|---|---|---|---|---|"]
    for s in SOURCES:
        cells = []
        for q in ("kappa", *GROUPS):
            v = torch.tensor(summary[s][q], dtype=torch.float64)
            cells.append(f"{float(v.mean()):.3f} ± {float(v.std()) if len(v) > 1 else 0.0:.3f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n" + paired_table(paired, GROUPS)
    (args.out / "box_sources.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'box_sources.json'} and {args.out / 'box_sources.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
