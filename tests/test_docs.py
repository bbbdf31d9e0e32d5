"""Every Python block of README.md and docs/*.md runs (blocks not meant to run are ```text/```bash)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, code in enumerate(BLOCK.findall(page.read_text()), start=1):
            found.append((f"{page.relative_to(ROOT)}#{number}", code))
    return found


BLOCKS = _blocks()


def test_readme_has_the_training_loop_snippet() -> None:
    assert any(name.startswith("README.md#") for name, _ in BLOCKS)


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_code_block_runs(name: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own documentation


def test_every_fenced_block_is_marked() -> None:
    """An unmarked ``` block would be neither run nor declared not runnable."""
    for page in PAGES:
        fences = re.findall(r"^```(\S*)", page.read_text(), re.M)
        openings = fences[::2]
        assert "" not in openings, f"{page.name}: a code block without a language (use python, text or bash)"


def test_run_times_in_the_pages_come_from_the_results_file() -> None:
    """Every ``<!-- runtime:NAME -->`` figure equals what docs/scripts/runtimes.py renders from docs/runtimes.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtimes", ROOT / "docs" / "scripts" / "runtimes.py")
    assert spec is not None
    assert spec.loader is not None
    runtimes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtimes)
    assert runtimes.check() == []
    marked = [page for page in runtimes.PAGES if runtimes.MARKER.search(page.read_text())]
    assert ROOT / "README.md" in marked
    assert not re.search(r"about (a|one|\d+) minutes? on a 2-core", "\n".join(p.read_text() for p in runtimes.PAGES))
