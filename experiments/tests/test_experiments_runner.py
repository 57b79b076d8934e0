"""The experiment runner: configs, results schema, reports, training helpers."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from ghoststep_lab import EXPERIMENTS, Experiment, load_experiment, names
from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.report import render_merged_report, render_report
from ghoststep_lab.common.results import (
    Claim,
    ResultsError,
    results_problems,
    validate_results,
    write_json,
)
from ghoststep_lab.common.runner import build_config, run_experiment
from ghoststep_lab.common.training import evaluate, median_iqr, train


@dataclass
class ToyConfig:
    steps: int = 100
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    widths: tuple[int, ...] = (8, 16)


TOY_PRESETS = {"quick": {"steps": 5}, "paper": {}}


def test_build_config_layers_defaults_preset_overrides_seeds():
    cfg = build_config(ToyConfig, TOY_PRESETS, "quick")
    assert cfg.steps == 5 and cfg.seeds == [0, 1, 2]
    cfg = build_config(
        ToyConfig,
        TOY_PRESETS,
        "quick",
        overrides={"lr": "0.5", "flag": "true", "widths": "4,5,6", "name": "y"},
        seeds=[7],
    )
    assert cfg == ToyConfig(steps=5, lr=0.5, name="y", flag=True, seeds=[7], widths=(4, 5, 6))
    assert build_config(ToyConfig, TOY_PRESETS, "paper", overrides={"steps": "42"}).steps == 42


def test_build_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        build_config(ToyConfig, TOY_PRESETS, "fast")
    with pytest.raises(ValueError, match="unknown config field"):
        build_config(ToyConfig, TOY_PRESETS, "paper", overrides={"stepz": "1"})
    with pytest.raises(ValueError):
        build_config(ToyConfig, TOY_PRESETS, "paper", overrides={"steps": "many"})

    @dataclass
    class Unseeded:
        a: int = 1

    with pytest.raises(ValueError, match="takes no seeds"):
        build_config(Unseeded, {"paper": {}}, "paper", seeds=[1])


def _good_results():
    return {
        "claims": [
            Claim("c1", "> 4000x", 4203.0, True),
            Claim("c2 | with pipe", 0.5, "0.7", False, note="we differ because"),
        ],
        "figures": [{"file": "a.png", "caption": "A"}, "b.png"],
        "tables": [{"title": "T", "columns": ["x", "y"], "rows": [[1, 2.5]]}],
        "metrics": {"curve": [1.0, float("nan")], "t": torch.tensor([1.0, 2.0])},
        "notes": ["n1"],
        "summary": "s",
    }


def test_validate_results_accepts_contract():
    validate_results(_good_results())
    assert results_problems({"claims": []}) == []


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({}, "missing required key 'claims'"),
        ({"claims": {}}, "must be a list"),
        ({"claims": [{"claim": "x", "paper": 1, "ours": 2}]}, "missing key 'reproduced'"),
        ({"claims": [{"claim": "x", "paper": 1, "ours": 2, "reproduced": "yes"}]}, "bool"),
        ({"claims": [{"claim": "", "paper": 1, "ours": 2, "reproduced": True}]}, "non-empty"),
        (
            {"claims": [{"claim": "x", "paper": [1], "ours": 2, "reproduced": True}]},
            "string or a number",
        ),
        ({"claims": [], "figures": [{"caption": "no file"}]}, "figures[0]"),
        ({"claims": [], "metrics": {"obj": object()}}, "JSON"),
        ("nope", "must be a dict"),
    ],
)
def test_validate_results_rejects(bad, fragment):
    with pytest.raises(ResultsError) as info:
        validate_results(bad)
    assert fragment in str(info.value)


def test_write_json_is_strict(tmp_path):
    path = write_json(tmp_path / "r.json", _good_results())
    data = json.loads(path.read_text())  # strict JSON: no NaN literals
    assert data["metrics"]["curve"] == [1.0, "nan"]
    assert data["metrics"]["t"] == [1.0, 2.0]


def test_render_report_has_claims_table_figures_and_differences():
    results = _good_results()
    results["meta"] = {
        "experiment": "toy",
        "preset": "quick",
        "seeds": [0],
        "versions": {"ghoststep": "0", "torch": "t"},
        "elapsed_s": 1.0,
    }
    text = render_report(results)
    assert text.startswith("# toy")
    assert "| claim | paper | ours | reproduced |" in text
    assert "(1/2 reproduced)" in text
    assert "c2 \\| with pipe" in text  # pipes escaped inside the table
    assert "![A](a.png)" in text and "![](b.png)" in text
    assert "## Where ours differs" in text and "we differ because" in text
    assert "| 1 | 2.5 |" in text


def _install_toy(monkeypatch, run):
    module = types.ModuleType("toy_experiment_for_tests")
    module.Config = ToyConfig
    module.PRESETS = TOY_PRESETS
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(EXPERIMENTS, "toy", Experiment(module.__name__, "a toy", "Fig. 0"))


def test_run_experiment_writes_everything(tmp_path, monkeypatch):
    seen = {}

    def run(config, out_dir, progress):
        seen["config"], seen["progress"] = config, progress
        fig, ax = new_figure()
        ax.plot([0, 1], [1, 0])
        return {
            "claims": [Claim("toy", 1, 1, True)],
            "figures": [save_figure(fig, out_dir, "toy", "toy plot")],
        }

    _install_toy(monkeypatch, run)
    out = run_experiment(
        "toy",
        "quick",
        seeds=[4, 5],
        overrides={"lr": "0.1"},
        runs_root=tmp_path / "runs",
        progress=False,
    )
    assert out.out_dir.parent == tmp_path / "runs" and out.out_dir.name.startswith("toy-")
    assert seen["config"].seeds == [4, 5] and seen["config"].lr == 0.1
    assert seen["progress"] is False
    config = json.loads((out.out_dir / "config.json").read_text())
    assert config["preset"] == "quick" and config["seeds"] == [4, 5]
    assert config["versions"]["torch"] == torch.__version__
    assert config["config"]["steps"] == 5
    results = json.loads((out.out_dir / "results.json").read_text())
    validate_results(results)
    assert results["meta"]["experiment"] == "toy"
    assert (out.out_dir / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![toy plot](toy.png)" in out.report_path.read_text()

    # a second run in the same second gets its own folder
    out2 = run_experiment("toy", "quick", runs_root=tmp_path / "runs", progress=False)
    assert out2.out_dir != out.out_dir

    merged = render_merged_report([out.out_dir, out2.out_dir], tmp_path)
    assert f"![toy plot](runs/{out.out_dir.name}/toy.png)" in merged
    assert merged.count("## toy") == 2


def test_run_experiment_rejects_bad_results(tmp_path, monkeypatch):
    _install_toy(monkeypatch, lambda config, out_dir, progress: {"claims": [{"claim": "x"}]})
    with pytest.raises(ResultsError, match="missing key 'paper'"):
        run_experiment("toy", "quick", out=tmp_path / "o", progress=False)


def test_registry_names_and_lazy_loading():
    assert names() == [
        "phase",
        "directions",
        "spike",
        "archgrid",
        "temperature",
        "transformer",
        "resnet",
        "hessian",
        "ghostmap",
        "calibration",
        "baselines",
        "lrsweep",
        "lm",
        "lmstability",
    ]
    module = load_experiment("hessian")
    for attr in ("Config", "PRESETS", "run"):
        assert hasattr(module, attr)
    assert {"quick", "paper"} <= set(module.PRESETS)
    with pytest.raises(KeyError, match="valid names"):
        load_experiment("nope")


def test_every_experiment_follows_contract():
    import dataclasses
    import importlib.util

    for name, entry in EXPERIMENTS.items():
        assert importlib.util.find_spec(entry.module) is not None, name
        module = load_experiment(name)
        assert dataclasses.is_dataclass(module.Config), name
        assert {"quick", "paper"} <= set(module.PRESETS), name
        for preset in module.PRESETS:
            build_config(module.Config, module.PRESETS, preset)


# ----------------------------------------------------------------------------- training


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 6, generator=g)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    return X, y, X[:40], y[:40]


def _trained(seed, steps=30, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = train(
        model, _tiny_data(), opt, steps, 32, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    return model, opt, losses


def test_train_is_deterministic_and_learns():
    m1, _, l1 = _trained(0)
    m2, _, l2 = _trained(0)
    assert l1 == l2 and len(l1) == 30
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    X, y, _, _ = _tiny_data()
    assert evaluate(m1, X, y).loss < l1[0]
    _, _, l3 = _trained(1)
    assert l3 != l1


def test_train_hooks_schedule_and_early_stop():
    seen = []

    def before(info):
        assert all(p.grad is not None for p in info.model.parameters())
        seen.append(("before", info.step, info.lr))

    def after(info):
        seen.append(("after", info.step, info.lr))
        assert info.inputs.shape == (32, 6)
        return "stop" if info.step == 6 else None

    _, opt, losses = _trained(
        0,
        steps=50,
        before_step=before,
        on_step=after,
        lr_schedule=lambda s: 1000.0 if s >= 5 else 1.0,
    )
    assert len(losses) == 7
    assert seen[0] == ("before", 0, pytest.approx(1e-2))
    assert ("after", 5, pytest.approx(10.0)) in seen
    assert opt.param_groups[0]["lr"] == pytest.approx(10.0)


def test_train_accepts_torch_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, _tiny_data(), opt, 4, 200, lr_schedule=sched)  # full batch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_evaluate_restores_mode_and_counts():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model.train()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    ev = evaluate(model, X, y)
    assert model.training
    assert ev.accuracy == pytest.approx(2 / 3)
    assert math.isfinite(ev.loss)


def test_median_iqr():
    assert median_iqr([1, 2, 3, 4, 5]) == (3.0, 2.0, 4.0)
    med, lo, hi = median_iqr([[0.0, 10.0], [1.0, 20.0], [2.0, float("nan")]])
    assert med.tolist() == [1.0, 15.0] and lo.tolist()[0] == 0.5 and hi.tolist()[0] == 1.5
    with pytest.raises(ValueError):
        median_iqr([])
