"""Fixtures shared by the experiment tests."""

from __future__ import annotations

import pytest

from ghoststep.experiments.common.results import validate_results
from ghoststep.experiments.common.runner import run_experiment


@pytest.fixture
def run_quick(tmp_path):
    """``run_quick(name)``: the experiment's quick preset into ``tmp_path / name``, its
    results schema-checked and its files (config, results, report, figures) present;
    returns the results dict."""

    def run(name: str) -> dict:
        out = run_experiment(name, "quick", out=tmp_path / name, progress=False)
        validate_results(out.results)
        for fname in ("config.json", "results.json", "report.md"):
            assert (out.out_dir / fname).is_file()
        for fig in out.results["figures"]:
            assert (out.out_dir / fig["file"]).is_file()
        assert out.results["claims"]
        return out.results

    return run
