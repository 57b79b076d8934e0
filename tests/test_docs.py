"""The documentation site (API reference from the docstrings) builds with warnings as
errors: a broken docstring or link fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("radius", "slopes", "directional", "controller", "monitor", "sharding"):
        html = (tmp_path / "api" / page / "index.html").read_text()
        assert f"ghoststep.{page}" in html
    assert "RadiusController" in (tmp_path / "api" / "controller" / "index.html").read_text()
