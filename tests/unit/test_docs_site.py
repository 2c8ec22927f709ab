"""The documentation site builds with `mkdocs build --strict`, offline, API pages included."""

import html
import inspect
import os
import pathlib
import re
import subprocess
import sys

import titanax as tx

ROOT = pathlib.Path(__file__).resolve().parents[2]
MKDOCS = pathlib.Path(sys.executable).parent / "mkdocs"  # the venv's, next to its python


def text(page: pathlib.Path) -> str:
    """The visible text of an HTML page: inline tags dropped, others a space, spaces collapsed."""
    body = re.sub(r"</?(?:code|span|a|em|strong)\b[^>]*>", "", page.read_text(encoding="utf-8"))
    body = re.sub(r"<[^>]+>", " ", body)
    return " ".join(html.unescape(body).split())


def test_site_builds_strict_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "WARNING" not in log, log

    page = site / "api" / "data_parallel" / "index.html"
    assert page.is_file(), sorted(str(p.relative_to(site)) for p in site.rglob("*.html"))
    raw = page.read_text(encoding="utf-8")
    assert 'id="titanax.data_parallel"' in raw  # the mkdocstrings heading of tx.data_parallel
    shown = text(page)
    doc = inspect.getdoc(tx.data_parallel)
    assert doc
    summary = " ".join(doc.split("\n\n")[0].replace("``", "").split())
    assert summary in shown, (summary, shown[:2000])
    assert "batch_argnums" in shown and "donate" in shown  # the documented arguments

    # Offline by design: no web fonts or other fetches from a CDN in the built pages.
    for built in site.rglob("*.html"):
        assert "fonts.googleapis.com" not in built.read_text(encoding="utf-8"), built
