"""The experiments' subcommands of ``ghoststep`` (run, list, report, demo), in-process
through the library's ``main(argv)``, plus the console script."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ghoststep.cli import main
from ghoststep_lab import EXPERIMENTS
from ghoststep_lab.common.results import validate_results


def test_the_library_cli_takes_its_lab_subcommands_from_here():
    from ghoststep.cli import lab_commands
    from ghoststep_lab.cli import COMMANDS

    assert lab_commands() == COMMANDS
    assert list(COMMANDS) == ["run", "list", "report", "demo"]


def test_console_script_run_help():
    exe = Path(sys.executable).parent / "ghoststep"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ghoststep.cli"]
    proc = subprocess.run(cmd + ["run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--preset" in proc.stdout and "--seeds" in proc.stdout


def test_list_prints_every_experiment(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(EXPERIMENTS)
    assert all(len(line.split()) > 3 for line in lines)  # a description follows each name


def test_unknown_experiment_exits_2_listing_valid_names(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "nonsense", "--preset", "quick"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "nonsense" in err
    for name in EXPERIMENTS:
        assert name in err


@pytest.mark.slow
def test_run_hessian_quick_writes_run_folder(tmp_path, capsys):
    out = tmp_path / "hes"
    assert main(["run", "hessian", "--preset", "quick", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert str(out / "report.md") in stdout
    for name in ("config.json", "results.json", "report.md", "fig13_hessian_vs_radius.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert all(c["reproduced"] for c in results["claims"])
    headline = results["claims"][0]
    assert "4000" in headline["claim"] and float(headline["ours"].rstrip("x")) > 4000
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "quick" and config["experiment"] == "hessian"
    assert config["versions"]["ghoststep"]
    report = (out / "report.md").read_text()
    assert "![" in report and "fig13_hessian_vs_radius.png" in report
    assert "| claim | paper | ours | reproduced |" in report


def test_run_spike_prints_its_headline(tmp_path, capsys):
    """What `make demo` ends with: accuracy through the spike, the largest applied r, and
    where the report and figure are; the claim count stays in the report."""
    out = tmp_path / "spike"
    argv = ["run", "spike", "--preset", "quick", "--set", "base_lrs=0.01", "--no-progress"]
    assert main(argv + ["--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "claims reproduced" not in "\n".join(lines)
    row = next(line for line in lines if line.strip().startswith("eta0 0.01"))
    assert "plain Adam" in row and "controller" in row and row.count("%") == 6
    r_ctrl = next(
        line for line in lines if line.startswith("largest applied r") and "contr" in line
    )
    assert float(r_ctrl.rsplit(":", 1)[1]) <= 1.0 + 1e-6
    assert lines[-2:] == [f"report: {out / 'report.md'}", f"figure: {out / 'fig6_spike.png'}"]


def test_run_errors_are_clean(tmp_path, capsys):
    assert main(["run", "hessian", "--preset", "nope", "--out", str(tmp_path / "a")]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert main(["run", "hessian", "--set", "bogus=1", "--out", str(tmp_path / "b")]) == 1
    assert "bogus" in capsys.readouterr().err
    assert main(["run", "hessian", "--set", "novalue", "--out", str(tmp_path / "c")]) == 1
    assert "key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_report_merges_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "hessian", "--preset", "quick", "--no-progress"]) == 0
    shutil.copytree(next(Path("runs").iterdir()), Path("runs") / "hessian-copy")
    assert main(["report"]) == 0
    text = Path("report.md").read_text()
    assert text.count("## hessian") == 2
    assert "(runs/hessian-copy/fig13_hessian_vs_radius.png)" in text

    stored = Path("runs/hessian-copy/results.json")  # kept compressed, as in docs/results
    with gzip.open(f"{stored}.gz", "wb") as f:
        f.write(stored.read_bytes())
    stored.unlink()
    assert main(["report", "runs/hessian-copy", "--out", "merged"]) == 0
    text = Path("merged/report.md").read_text()
    assert "(../runs/hessian-copy/fig13_hessian_vs_radius.png)" in text
    capsys.readouterr()
    assert main(["report", "nowhere"]) == 1
    assert "results.json" in capsys.readouterr().err


def test_report_without_runs_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 1
    assert "no runs" in capsys.readouterr().err


def test_demo_prints_table(capsys):
    assert main(["demo", "--steps", "30", "--every", "10"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [0, 10, 20, 29]
    assert "rho_a" in out
    largest = float(out.split("largest r of the last 30 steps:")[1].split()[0])
    assert largest >= max(float(r.split()[-1]) for r in rows) - 1e-3  # printed rounded
