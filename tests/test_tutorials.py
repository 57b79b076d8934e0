"""Every tutorial in docs/tutorials runs: its python blocks, in order, as one script in a
fresh interpreter (a tutorial that rots fails here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "docs" / "tutorials").glob("*.md"))


def python_blocks(text: str) -> str:
    return "\n\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_code_compiles(path):
    """The fast check (no ``slow`` marker): each tutorial has Python blocks, and they
    parse as one script."""
    code = python_blocks(path.read_text())
    assert code.strip(), f"{path.name} has no ```python block"
    compile(code, str(path), "exec")


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    code = python_blocks(path.read_text())
    if "ghoststep_lab" in code:  # a model of the experiments' package
        pytest.importorskip("ghoststep_lab")
    script = tmp_path / f"{path.stem}.py"
    script.write_text(code)
    env = dict(os.environ, GHOSTSTEP_TUTORIAL_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert any(tmp_path.glob("*.png"))
