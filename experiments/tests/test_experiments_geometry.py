"""Quick presets of phase, directions, temperature, calibration and ghostmap, end to end.

Each runs through the real runner into ``tmp_path``; the results must satisfy the
runner contract, and a few scientific facts that hold robustly even at quick size
are checked (the bound's theorem, no collapse inside the disk, normalization
shrinking the temperature spread).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ghoststep.cli import main
from ghoststep_lab.common.results import RESULTS_FILE, read_json, validate_results
from ghoststep_lab.common.runner import build_config, run_experiment


def _run(name, tmp_path):
    threads = torch.get_num_threads()
    out = run_experiment(name, "quick", out=tmp_path / name, progress=False)
    assert torch.get_num_threads() == threads  # the run's thread setting is undone
    validate_results(out.results)
    saved = read_json(out.out_dir / RESULTS_FILE)
    assert saved["meta"]["experiment"] == name and saved["meta"]["preset"] == "quick"
    for fig in out.results["figures"]:
        assert (out.out_dir / fig["file"]).stat().st_size > 1000
    assert out.report_path.read_text().startswith(f"# {name}:")
    for c in out.results["claims"]:
        assert isinstance(c["reproduced"], bool)
        if not c["reproduced"]:
            assert c.get("note"), f"unreproduced claim without a note: {c['claim']}"
    return out.results


def test_paper_presets_are_the_defaults():
    from ghoststep_lab import load_experiment

    for name in ("phase", "directions", "temperature", "calibration"):
        module = load_experiment(name)
        assert module.PRESETS["paper"] == {}
        assert build_config(module.Config, module.PRESETS, "paper") == module.Config()


@pytest.mark.slow
def test_phase_quick(tmp_path):
    res = _run("phase", tmp_path)
    m = res["metrics"]
    r = m["r"]
    assert min(r) == pytest.approx(0.01) and max(r) == pytest.approx(100)
    # inside the disk nobody collapses; far outside everybody does
    assert m["lowest_retained_below_1"] >= 0.9
    for arch in m["architectures"].values():
        assert arch["rho_a"] > 0
        assert math.isfinite(arch["fail_r"]) and arch["fail_r"] > 1
        assert arch["test_loss_ratio"][-1] > 2
        assert arch["test_accuracy"] > 0.8


@pytest.mark.slow
def test_directions_quick(tmp_path):
    res = _run("directions", tmp_path)
    stages = res["metrics"]["stages"]
    assert [s["name"] for s in stages] == ["early", "mid", "late"]
    assert all(s["test_accuracy"] >= s["target_accuracy"] for s in stages)
    assert stages[0]["step"] < stages[1]["step"] < stages[2]["step"]
    for s in stages:
        assert len(s["random"]) == 5
        for d in [s["gradient"], *s["random"]]:
            assert d["hessian_over_rho"] > 1  # the paper's "in every case"
            assert not (d["onset_r"] < 1)  # no loss doubling inside the disk
        # a random step far outside the disk hurts: loss and flips grow with r
        assert s["random_median_loss_ratio"][-1] > s["random_median_loss_ratio"][0]
        assert s["random_median_flip"][-1] > s["random_median_flip"][0]
    # the gradient sweep and its uphill twin share rho_a and curvature
    g, up = stages[-1]["gradient"], stages[-1]["gradient_ascent"]
    assert g["rho_a"] == pytest.approx(up["rho_a"]) and g["curvature"] == pytest.approx(
        up["curvature"]
    )


@pytest.mark.slow
def test_temperature_quick_via_cli(tmp_path, capsys):
    out = tmp_path / "temperature"
    assert (
        main(["run", "temperature", "--preset", "quick", "--out", str(out), "--no-progress"]) == 0
    )
    assert "claims reproduced" in capsys.readouterr().out
    res = json.loads((out / RESULTS_FILE).read_text())
    validate_results(res)
    m = res["metrics"]
    # normalizing by rho_a(T) tightens the onsets across temperatures
    assert m["std_log10_onset_normalized"] < m["std_log10_onset_raw"]
    per_t = m["per_temperature"]
    assert set(per_t) == {"0.25", "1", "4", "16"}
    # rho_a(T) grows with T (pi T / Delta a) and so does the raw onset
    rhos = [per_t[t]["rho_a"] for t in ("0.25", "1", "4", "16")]
    assert rhos == sorted(rhos)


@pytest.mark.slow
def test_calibration_quick(tmp_path):
    res = _run("calibration", tmp_path)
    m = res["metrics"]
    assert isinstance(m["n_uncertified"], int) and m["n_uncertified"] >= 0
    assert m["n_samples_total"] == 400 * 4 * 2
    for e in m["checkpoints"]:
        assert e["min_exact_over_rho_a"] >= 1 - 1e-6  # rho_a <= rho* (theorem)
        assert e["exact_over_rho_a"]["p5"] >= 1 - 1e-6
        assert 0 <= e["top2_above_exact_share"] <= 1
        assert 0 <= e["censored_share"] <= 1
        assert e["exact_batch_over_rho_a_batch"] >= 1 - 1e-6
    assert set(m["pooled"]) == {"gradient", "random"}
    first = res["claims"][0]
    assert first["reproduced"]


def test_ghostmap_quick(tmp_path):
    res = _run("ghostmap", tmp_path)
    stages = res["metrics"]["mlp"]
    assert sorted(stages, key=int) == ["0", "20", "60"]
    for record in stages.values():
        assert record["certified"] == 1.0
        assert record["min_ghost_over_rho_a"] >= 1.0  # no ghost inside the rho_a circle
        quantiles = [record["quantiles"][q] for q in sorted(record["quantiles"], key=float)]
        assert quantiles == sorted(quantiles) and quantiles[0] >= record["min_ghost"]
        assert record["r"] == pytest.approx(1.0 / record["rho_a"])
