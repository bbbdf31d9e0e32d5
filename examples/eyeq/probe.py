"""Probe the pre-trained encoders of a finished (or running) EyeQ comparison, frozen, without fine-tuning.

``--compare`` probes every encoder it pre-trains; this command probes the encoders of a comparison
folder afterwards (e.g. a comparison run before the probes existed), read-only: it loads each
``PRETRAINED/<method folder>/seed<N>/encoder.pt`` (weights-only; method and seed checked), rebuilds
that repeat's data draw from the comparison's ``config.yaml`` and runs the probes of
:mod:`examples.common.probes` on the repeat's held-out test images, and on the repeat's initial
encoder (the reference without pre-training, row ``ce``)::

    python examples/eyeq/probe.py --config runs/compare/config.yaml --pretrained runs/compare/pretrain \\
        --out runs/compare-probes [--results-md examples/eyeq/RESULTS.md]

Writes ``OUT/probes.json`` (per method and repeat, the paired differences CoMCL − each other
pre-training method with 95 % t-intervals, the command, machine, wall time and torch threads),
``OUT/probes.md``, ``OUT/paired_probes.png`` and a cache per encoder
(``OUT/<folder>/seed<N>/probes.json``). With ``--results-md`` the text between
``<!-- probes:begin -->`` and ``<!-- probes:end -->`` in that file is replaced by ``probes.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.common.config import ConfigError, load_config  # noqa: E402

BEGIN, END = "<!-- probes:begin -->", "<!-- probes:end -->"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python examples/eyeq/probe.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the comparison's config.yaml")
    p.add_argument("--pretrained", type=Path, required=True, help="its folder of pre-trained encoders")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--results-md", type=Path, default=None, help="Markdown file whose probes section to replace")
    return p


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``section``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one {BEGIN!r} followed by one {END!r} in the results file")
    return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _m: f"{BEGIN}\n{section}{END}", text, flags=re.S)


def probe_folder(cfg: Any, pretrained: Path, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Probes of every ``encoder.pt`` under ``pretrained`` and of each repeat's initial encoder (``ce``).

    Returns:
        method -> ``[{"seed", "probes"}]`` by seed.
    """
    from examples.common.pretrain import PRETRAIN_METHODS
    from examples.common.probe_report import probe_encoder, probe_initial
    from examples.common.protocol import pretrain_folder
    from examples.eyeq.data import build_data

    found = {
        m: sorted(
            (int(d.name.removeprefix("seed")), d / "encoder.pt")
            for d in (pretrained / pretrain_folder(m, cfg.finetune)).glob("seed*")
            if (d / "encoder.pt").is_file() and d.name.removeprefix("seed").isdigit()
        )
        for m in PRETRAIN_METHODS
    }
    runs: dict[str, list[dict[str, Any]]] = {"ce": []} | {m: [] for m in found if found[m]}
    for seed in sorted({s for files in found.values() for s, _ in files}):
        data = build_data(cfg, seed)
        print(f"probing the initial encoder of seed {seed}")
        cache = out / "initial" / f"seed{seed}" / "probes.json"
        runs["ce"].append({"seed": seed, "probes": probe_initial(seed, cfg.model, data, cache, cfg.run.device)})
        for m, files in found.items():
            for s, path in files:
                if s == seed:
                    print(f"probing {path}")
                    cache = out / path.parent.parent.name / path.parent.name / "probes.json"
                    probes = probe_encoder(path, m, s, cfg.model, data, cfg.run.device, cache)
                    runs[m].append({"seed": s, "probes": probes})
    return runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from examples.eyeq.train import EyeQConfig

    try:
        cfg = load_config(EyeQConfig, args.config, args.overrides)
        if not args.pretrained.is_dir():
            raise ConfigError(f"--pretrained: {str(args.pretrained)!r} is not a folder")
        if args.results_md is not None:
            replace_section(args.results_md.read_text(encoding="utf-8"), "")  # fail before the work
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from examples.common.probe_report import probe_section, probe_summary
    from examples.common.protocol import machine_description
    from examples.common.runlog import write_json
    from examples.common.task import METHOD_LABELS

    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    start = time.perf_counter()
    runs = probe_folder(cfg, args.pretrained, args.out)
    if not runs:
        print(f"error: no encoder.pt under {args.pretrained}", file=sys.stderr)
        return 2
    section = probe_section(runs, args.out, dict(METHOD_LABELS))
    summary = probe_summary(runs) | {
        "runs": runs,
        "command": " ".join(["python examples/eyeq/probe.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_description(),
        "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
    }
    write_json(args.out / "probes.json", summary)
    (args.out / "probes.md").write_text(section.lstrip("\n"), encoding="utf-8")
    if args.results_md is not None:
        text = args.results_md.read_text(encoding="utf-8")
        args.results_md.write_text(replace_section(text, section.lstrip("\n")), encoding="utf-8")
    print(section)
    print(f"wrote {args.out / 'probes.json'}, {args.out / 'probes.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
