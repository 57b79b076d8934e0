"""The documentation site (API reference from the docstrings) builds with warnings as
errors: a broken docstring or link fails here. The README's python snippets run verbatim."""

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


def test_readme_quickstart_is_the_demo_then_the_tests():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", quickstart, re.DOTALL)
    assert block.split("\n")[:-1] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"  # CI runs the README's test command


def test_readme_has_two_self_contained_snippets():
    assert len(README_SNIPPETS) == 2
    for code in README_SNIPPETS:
        assert "..." not in code  # no placeholders: each snippet runs as pasted
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("ghoststep"):
                assert node.module == "ghoststep"  # top-level names only
                assert {a.name for a in node.names} <= set(ghoststep.__all__)
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("ghoststep.") for a in node.names)


@pytest.mark.parametrize("index", [0, 1], ids=["measure", "controller"])
def test_readme_snippet_runs(index, capsys):
    pytest.importorskip("sklearn")
    code = README_SNIPPETS[index]
    with torch.random.fork_rng():  # the snippets seed torch; leave other tests' RNG alone
        exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if index == 0:
        assert "Measurement(" in out and "rho_a=" in out
    else:
        accuracy, largest_r = re.search(
            r"accuracy ([\d.]+)%, largest applied r ([\d.]+)", out
        ).groups()
        assert float(accuracy) > 70  # plain Adam at this learning rate ends at chance
        assert float(largest_r) <= 1.001
