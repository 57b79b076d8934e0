"""Fixtures shared by the experiments' tests."""

from __future__ import annotations

import pytest
import torch

from ghoststep_lab.common.results import validate_results
from ghoststep_lab.common.runner import run_experiment


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: the models are tiny, and the suite runs two pytest
    workers on two cores, where torch's own thread pools would oversubscribe them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
