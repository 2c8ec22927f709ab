"""Every ```python block of README.md and docs/*.md runs, page by page, in order."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(page):
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks(page)):
        exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)


def test_readme_has_a_quickstart_and_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make example" in text and "make test" in text
    assert len(blocks(ROOT / "README.md")[0].splitlines()) <= 30
