"""The documentation site (API reference from the docstrings) builds with warnings as
errors: a broken docstring or link fails here. The README's python snippets run verbatim
and import top-level names only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ghoststep

ROOT = Path(__file__).parents[1]
README_SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("radius", "evaluation", "measurement", "controller", "monitor"):
        html = (tmp_path / "api" / page / "index.html").read_text()
        assert f"ghoststep.{page}" in html
    assert "RadiusController" in (tmp_path / "api" / "controller" / "index.html").read_text()


@pytest.mark.parametrize("index", range(len(README_SNIPPETS)))
def test_readme_snippet_uses_top_level_names_only(index):
    for node in ast.walk(ast.parse(README_SNIPPETS[index])):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("ghoststep"):
            assert node.module == "ghoststep"
            assert {a.name for a in node.names} <= set(ghoststep.__all__)
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith("ghoststep.") for a in node.names)


@pytest.mark.parametrize("index", range(len(README_SNIPPETS)))
def test_readme_snippet_runs(index, capsys):
    """Each python snippet runs as pasted; what it prints is checked where it says it."""
    pytest.importorskip("sklearn")
    code = README_SNIPPETS[index]
    with torch.random.fork_rng():  # the snippets seed torch; leave other tests' RNG alone
        exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if "print(m)" in code:
        assert "Measurement(" in out and "rho_a=" in out
    found = re.search(r"accuracy ([\d.]+)%, largest applied r ([\d.]+)", out)
    if found:
        accuracy, largest_r = found.groups()
        assert float(accuracy) > 70  # plain Adam at this learning rate ends at chance
        assert float(largest_r) <= 1.001
