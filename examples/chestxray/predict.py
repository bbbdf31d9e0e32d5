"""Apply a trained ChestX-ray14 run (the 14 label probabilities per image); refuses a run of the other pipeline.

::

    python examples/chestxray/predict.py runs/chestxray images/ --out predictions.csv

Same options as ``python -m examples.common.predict`` (see there).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.common import predict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return predict.main(argv, pipeline="chestxray", prog="python examples/chestxray/predict.py")


if __name__ == "__main__":
    sys.exit(main())
