"""Every script in examples/ runs end to end (few steps, CPU, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--out", str(tmp_path / "out"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_plain_loop_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    out = _run("plain_loop.py", tmp_path, "--steps", "12")
    assert "steps clipped" in out
    history = tmp_path / "out" / "radius.csv"
    assert len(history.read_text().splitlines()) == 13  # header + 12 steps

    pytest.importorskip("matplotlib")
    from ghoststep.cli import main

    assert main(["plot", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "history.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_lightning_digits(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out = _run("lightning_digits.py", tmp_path, "--steps", "8")
    assert "8 steps" in out
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0]
    assert "ghoststep/r_after" in header


@pytest.mark.slow
def test_hf_trainer_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _run("hf_trainer_tiny.py", tmp_path, "--steps", "6")
    assert "6 steps" in out
    assert "ghoststep/rho_a" in (tmp_path / "out" / "log_history.json").read_text()
