"""Apply a trained EyeQ run (DR grade and its probability per image); refuses a run of the other pipeline.

::

    python examples/eyeq/predict.py runs/eyeq images/ --out predictions.csv

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
    return predict.main(argv, pipeline="eyeq", prog="python examples/eyeq/predict.py")


if __name__ == "__main__":
    sys.exit(main())
