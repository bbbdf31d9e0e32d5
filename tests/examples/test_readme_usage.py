"""The command-line usage block of each pipeline's README names every option of its ``train.py --help``."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _usage_block(readme: str, script: str) -> str:
    """The fenced block of the README's "Command line" section that starts with ``python <script>``."""
    match = re.search(rf"```bash\n(python {re.escape(script)} \[.*?)```", readme, re.DOTALL)
    assert match is not None, f"no usage block for {script}"
    return match.group(1)


@pytest.mark.parametrize("pipeline", ["eyeq", "chestxray"])
def test_readme_usage_lists_every_option_of_help(pipeline: str, capsys: pytest.CaptureFixture[str]) -> None:
    train = importlib.import_module(f"examples.{pipeline}.train")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]  # argparse's usage paragraph
    documented = set(
        OPTION.findall(
            _usage_block((REPO / "examples" / pipeline / "README.md").read_text(), f"examples/{pipeline}/train.py")
        )
    )
    assert documented == set(OPTION.findall(usage)) - {"--help"}
